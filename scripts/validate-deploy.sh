#!/usr/bin/env bash
# Validates deploy/ offline: the Kubernetes manifests (kustomize), the Prometheus rules and
# their unit tests, and the Grafana dashboard. Needs Go, Python 3 and, on the first run only,
# the Go module proxy and PyPI; every tool is cached under
# ${AUDIT_CACHE_DIR:-~/.cache/audit-consumer}/tools, so later runs need no network.
#
#   scripts/validate-deploy.sh                 run every check (exit 1 if any failed)
#   scripts/validate-deploy.sh --sync-rules    regenerate deploy/k8s/base/prometheusrule.yaml
#                                              from deploy/prometheus/alerts.yaml, then check
#
# Steps:
#   1. render   kustomize build of deploy/k8s/base and every deploy/k8s/overlays/*
#               (`kubectl kustomize` when kubectl is installed, else kustomize built from the
#               Go module proxy)
#   2. schema   kubernetes-validate (PyPI, ships the Kubernetes JSON schemas) --strict against
#               Kubernetes $KUBE_VERSIONS; the Prometheus Operator CRs (PodMonitor,
#               PrometheusRule) have no schema there and are checked by step 3 instead
#   3. policy   this script's own checks of the rendered output, for each workload described
#               in WORKLOADS (audit-consumer: `run`; audit-api: `serve`) with the same rigor:
#               role (args), replicas, init containers, security context, probes (paths, port),
#               resources, graceful stop (consumer: grace period vs SHUTDOWN_TIMEOUT; API: preStop
#               pause + one request's timeouts), every env var known to the daemon (README
#               configuration table + the deploy-only extras), secrets only as *_FILE paths into
#               mounted Secrets whose keys exist, the API's own logins; then the objects around
#               the pods: each Service, PDB, NetworkPolicy and PodMonitor selects exactly one
#               workload, on that workload's port; NetworkPolicy ingress only on it, egress to
#               DNS, Kafka, immudb, PostgreSQL (and the identity provider for the API), peers
#               narrowed in overlays; across workloads: one image, no shared Secret or
#               ServiceAccount, API_ACCESS_TOPIC consumed by the consumer, the alerts' jobs;
#               PrometheusRule == alerts.yaml
#   4. lint     kube-linter (Go module proxy) on the rendered output
#   5. rules    promtool check rules + promtool test rules (promtool built from the pinned
#               wrapper module deploy/prometheus/tools)
#   6. grafana  python3 -m json.tool and structural checks of deploy/grafana/*.json
#   7. metrics  every metric (and label matcher) used by the alerts and the dashboard is in
#               the contract deploy/prometheus/metrics.txt
#
#   scripts/validate-deploy.sh --scrape=FILE   also `promtool check metrics` a saved /metrics scrape
# Knobs: AUDIT_CACHE_DIR; VALIDATE_STRICT=1 (a tool that cannot be obtained fails the run
# instead of being skipped); VALIDATE_KUSTOMIZE=go (build kustomize even if kubectl exists);
# VALIDATE_RETRY_TOOLS=1 (retry kube-linter's download even if it failed within 24 h);
# KUBE_LINTER / PROMTOOL / KUSTOMIZE (use that binary). Go builds run under `nice` and honour
# GOFLAGS (e.g. GOFLAGS=-p=1 on a busy machine).
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"

KUBERNETES_VALIDATE_VERSION=1.37.0
KUBE_VERSIONS=(1.31.0 1.37.0)
KUSTOMIZE_VERSION=v5.8.2 # v5.8.3 needs Go >= 1.27
KUBE_LINTER_VERSION=latest # the proxy refuses every version of it here; see the report below
PROMTOOL_MODULE_DIR=deploy/prometheus/tools
PROMETHEUS_VERSION=$(awk '$1 == "require" && $2 == "github.com/prometheus/prometheus" { print $3 }' "$PROMTOOL_MODULE_DIR/go.mod")

CACHE_DIR=${AUDIT_CACHE_DIR:-${HOME:?HOME is not set}/.cache/audit-consumer}
case $CACHE_DIR in /*) ;; *) CACHE_DIR="$PWD/$CACHE_DIR" ;; esac
TOOLS="$CACHE_DIR/tools"
mkdir -p "$TOOLS"

SYNC_RULES=
SCRAPES=()
for arg in "$@"; do
    case $arg in
        --sync-rules) SYNC_RULES=1 ;;
        --scrape=*) SCRAPES+=("${arg#--scrape=}") ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/validate-deploy.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------------------
# reporting

STARTED=${EPOCHREALTIME/./}
now_us() { echo "${EPOCHREALTIME/./}"; }
secs() { local us=$(($(now_us) - $1)); printf '%d.%ds' $((us / 1000000)) $((us % 1000000 / 100000)); }
log() { printf '[validate] %s\n' "$*" >&2; }
RESULTS=()
FAILED=0
SKIPPED=0
pass() { RESULTS+=("PASS  $1"); log "PASS  $1"; }
fail() { RESULTS+=("FAIL  $1"); log "FAIL  $1"; FAILED=$((FAILED + 1)); }
skip() { # what why
    if [[ ${VALIDATE_STRICT:-0} == 1 ]]; then
        fail "$1 (VALIDATE_STRICT=1: $2)"
    else
        RESULTS+=("SKIP  $1: $2"); log "SKIP  $1: $2"; SKIPPED=$((SKIPPED + 1))
    fi
}
# Run a step, show its output indented, record pass/fail.
step() { # label command...
    local label=$1 t0 rc=0
    shift
    t0=$(now_us)
    "$@" >"$WORK/step.log" 2>&1 || rc=$?
    sed 's/^/    /' "$WORK/step.log" >&2
    if ((rc == 0)); then pass "$label ($(secs "$t0"))"; else fail "$label (exit $rc)"; fi
    return 0
}

# ---------------------------------------------------------------------------------------
# tools (each built or installed once into $TOOLS)

go_build() { # log-file go-args... : a Go build at low priority
    local logf=$1
    shift
    if ! command -v go >/dev/null; then
        echo "go is not installed" >"$logf"
        return 1
    fi
    timeout "${GO_BUILD_TIMEOUT:-3600}" nice -n 19 \
        env CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false" go "$@" >"$logf" 2>&1
}

# A failed download is remembered for a day so that warm runs stay fast and offline.
recently_failed() { # stamp-file
    [[ ${VALIDATE_RETRY_TOOLS:-0} != 1 && -f $1 && -n $(find "$1" -mmin -1440 2>/dev/null) ]]
}

PY=
ensure_python() {
    local venv="$TOOLS/python-kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
    PY="$venv/bin/python"
    [[ -f $venv/.complete ]] && return 0
    command -v python3 >/dev/null || { log "python3 is required"; exit 1; }
    log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION (PyPI) into $venv"
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >"$WORK/venv.log" 2>&1; then
        # Debian's python3 has no ensurepip without the python3-venv package.
        rm -rf "$venv"
        if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
            log "python3 -m venv failed; installing python3-venv (apt)"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
            python3 -m venv "$venv"
        else
            cat "$WORK/venv.log" >&2
            log "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"
            exit 1
        fi
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2
    touch "$venv/.complete"
}

KUSTOMIZE_CMD=()
KUSTOMIZE_DESC=
ensure_kustomize() {
    if [[ -n ${KUSTOMIZE:-} ]]; then
        KUSTOMIZE_CMD=("$KUSTOMIZE" build)
        KUSTOMIZE_DESC="$KUSTOMIZE ($("$KUSTOMIZE" version 2>/dev/null | head -n1))"
        return 0
    fi
    if [[ ${VALIDATE_KUSTOMIZE:-} != go ]] && command -v kubectl >/dev/null \
        && kubectl kustomize --help >/dev/null 2>&1; then
        KUSTOMIZE_CMD=(kubectl kustomize)
        KUSTOMIZE_DESC="kubectl kustomize ($(kubectl version --client 2>/dev/null | grep -i kustomize | tr -d '\n'))"
        return 0
    fi
    local dir="$TOOLS/kustomize-$KUSTOMIZE_VERSION"
    if [[ ! -x $dir/kustomize ]]; then
        log "building kustomize $KUSTOMIZE_VERSION from the Go module proxy"
        rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
        if ! GOBIN="$dir.tmp" go_build "$WORK/kustomize-build.log" install -trimpath \
            "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"; then
            tail -n 20 "$WORK/kustomize-build.log" >&2
            rm -rf "$dir.tmp"
            return 1
        fi
        rm -rf "$dir" && mv "$dir.tmp" "$dir"
    fi
    KUSTOMIZE_CMD=("$dir/kustomize" build)
    KUSTOMIZE_DESC="kustomize $KUSTOMIZE_VERSION (Go module proxy)"
}

PROMTOOL_BIN=
PROMTOOL_ERR=
ensure_promtool() {
    if [[ -n ${PROMTOOL:-} ]]; then PROMTOOL_BIN=$PROMTOOL; return 0; fi
    # The recipe (go.mod + go.sum) names the cache entry: a change of pin rebuilds.
    local hash dir
    hash=$(cat "$PROMTOOL_MODULE_DIR/go.mod" "$PROMTOOL_MODULE_DIR/go.sum" | sha256sum | cut -c1-12)
    dir="$TOOLS/promtool-$PROMETHEUS_VERSION-$hash"
    if [[ ! -x $dir/promtool ]]; then
        log "building promtool $PROMETHEUS_VERSION from the Go module proxy (first run only; minutes)"
        rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
        if ! (cd "$PROMTOOL_MODULE_DIR" && go_build "$WORK/promtool-build.log" build -mod=readonly -trimpath \
            -ldflags "-s -w -X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION#v}" \
            -o "$dir.tmp/promtool" github.com/prometheus/prometheus/cmd/promtool); then
            tail -n 20 "$WORK/promtool-build.log" >&2
            PROMTOOL_ERR="go build failed: $(tail -n1 "$WORK/promtool-build.log")"
            rm -rf "$dir.tmp"
            return 1
        fi
        rm -rf "$dir" && mv "$dir.tmp" "$dir"
    fi
    PROMTOOL_BIN="$dir/promtool"
}

KUBE_LINTER_BIN=
KUBE_LINTER_ERR=
ensure_kube_linter() {
    if [[ -n ${KUBE_LINTER:-} ]]; then KUBE_LINTER_BIN=$KUBE_LINTER; return 0; fi
    if command -v kube-linter >/dev/null; then KUBE_LINTER_BIN=$(command -v kube-linter); return 0; fi
    local dir="$TOOLS/kube-linter-$KUBE_LINTER_VERSION"
    if [[ -x $dir/kube-linter ]]; then KUBE_LINTER_BIN="$dir/kube-linter"; return 0; fi
    if recently_failed "$dir.failed"; then
        KUBE_LINTER_ERR="cannot be obtained (cached result from $(date -r "$dir.failed" '+%F %R'): $(tail -n1 "$dir.failed")); VALIDATE_RETRY_TOOLS=1 retries"
        return 1
    fi
    log "building kube-linter ($KUBE_LINTER_VERSION) from the Go module proxy"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    if ! GOBIN="$dir.tmp" go_build "$WORK/kube-linter-build.log" install -trimpath \
        "golang.stackrox.io/kube-linter/cmd/kube-linter@$KUBE_LINTER_VERSION"; then
        grep -v '^go: downloading' "$WORK/kube-linter-build.log" | tail -n 3 >"$dir.failed" || true
        KUBE_LINTER_ERR="go install golang.stackrox.io/kube-linter/cmd/kube-linter@$KUBE_LINTER_VERSION failed: $(tail -n1 "$dir.failed")"
        rm -rf "$dir.tmp"
        return 1
    fi
    rm -rf "$dir" "$dir.failed" && mv "$dir.tmp" "$dir"
    KUBE_LINTER_BIN="$dir/kube-linter"
}

# ---------------------------------------------------------------------------------------
# PrometheusRule = header + alerts.yaml (minus its leading comment block) under `spec:`

render_prometheusrule() {
    cat <<'EOF'
# GENERATED from deploy/prometheus/alerts.yaml by `scripts/validate-deploy.sh --sync-rules`.
# Do not edit: change alerts.yaml (checked by promtool) and regenerate.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: audit-consumer
  labels:
    app.kubernetes.io/name: audit-consumer
    app.kubernetes.io/instance: audit-consumer
spec:
EOF
    awk 'body || !/^(#|$)/ { body = 1; if ($0 == "") print ""; else print "  " $0 }' deploy/prometheus/alerts.yaml
}
PROMETHEUSRULE=deploy/k8s/base/prometheusrule.yaml
if [[ -n $SYNC_RULES ]]; then
    render_prometheusrule >"$PROMETHEUSRULE"
    log "wrote $PROMETHEUSRULE"
fi

# ---------------------------------------------------------------------------------------
# the Python half of the checks (runs in the kubernetes-validate venv, which has PyYAML)

write_helper() {
    cat >"$1" <<'PYTHON'
"""Python half of scripts/validate-deploy.sh (runs in the kubernetes-validate venv: PyYAML)."""
import json
import re
import sys

import yaml

ERRORS = []


def err(msg):
    ERRORS.append(msg)


def finish(ok_msg):
    for e in ERRORS:
        print(f"ERROR: {e}")
    if ERRORS:
        print(f"{len(ERRORS)} problem(s)")
        sys.exit(1)
    print(ok_msg)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# ---------------------------------------------------------------------------------------
# split: core kinds (schema-validated) vs Prometheus Operator custom resources

def cmd_split(rendered, core_out, crs_out):
    docs = load_all(rendered)
    core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    crs = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    with open(core_out, "w") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    with open(crs_out, "w") as f:
        yaml.safe_dump_all(crs, f, sort_keys=False)


# ---------------------------------------------------------------------------------------
# policy: what kube-linter would say, plus what only this project knows

KNOWN_EXTRA_ENV = {
    "AUDIT_CONFIG_FILE": "config file path (README)",
    "POSTGRES_MIGRATE_USERNAME": "deploy-only: the migrate init container's PostgreSQL role",
    "POSTGRES_READER_USERNAME": "deploy-only: the read API's PostgreSQL login (role audit_reader)",
    "IMMUDB_READER_USERNAME": "deploy-only: the read API's immudb user (read permission)",
    "KAFKA_API_SASL_USERNAME": "deploy-only: the read API's Kafka user (WRITE on API_ACCESS_TOPIC)",
}

PROBES = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}

# How long `serve` waits for the broker to acknowledge a read's access event
# (ACK_TIMEOUT in src/api/access.rs); part of the longest request a graceful stop must allow.
ACCESS_ACK_SECONDS = 10

# The workloads of deploy/k8s: what the policy expects of each Deployment and of the objects
# around it. Every rendered Deployment must be one of these, and each of these must be rendered.
WORKLOADS = {
    # The write side: one consumer group, static size (partitions are spread over three).
    "audit-consumer": {
        "container": "audit-consumer",
        "args": ["run"],
        "replicas": (3, 3),
        "init_containers": ["migrate"],
        "port_name": "http",
        "port_env": "HEALTH_PORT",
        "port_default": 8080,
        "metrics_port_env": "METRICS_PORT",
        # Also pinned in README "Kubernetes" and AuditConsumerMemoryNearLimit (512Mi).
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"},
                      "limits": {"cpu": "500m", "memory": "512Mi"}},
        "job": "audit-consumer",
        "secret_files": ["IMMUDB_PASSWORD_FILE", "POSTGRES_PASSWORD_FILE"],
        "stop": "drain",  # SHUTDOWN_TIMEOUT below terminationGracePeriodSeconds
        "service_required": False,
        "identity_provider": False,
        "logins": {},
    },
    # The read side: stateless, at least two replicas, its own logins.
    "audit-api": {
        "container": "audit-api",
        "args": ["serve"],
        "replicas": (2, None),
        "init_containers": [],
        "port_name": "http-api",
        "port_env": "API_PORT",
        "port_default": 8090,
        "metrics_port_env": None,
        # Provisional until benches/api.rs measures the API (api-deployment.yaml says so).
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"cpu": "1", "memory": "256Mi"}},
        "job": "audit-api",
        "secret_files": ["API_CURSOR_KEY_FILE", "IMMUDB_PASSWORD_FILE", "POSTGRES_PASSWORD_FILE"],
        "stop": "requests",  # in-flight requests finish: preStop pause + one request's timeouts
        "service_required": True,
        "identity_provider": True,
        # variable `serve` reads -> the ConfigMap key it must come from (least privilege)
        "logins": {"POSTGRES_USERNAME": "POSTGRES_READER_USERNAME",
                   "IMMUDB_USERNAME": "IMMUDB_READER_USERNAME",
                   "KAFKA_SASL_USERNAME": "KAFKA_API_SASL_USERNAME"},
    },
}


def readme_env(readme):
    """Every environment variable of the README configuration table, and the secret ones."""
    names, secret = set(), set()
    for line in open(readme):
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2:
            continue
        found = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[1])
        names.update(found)
        if len(cells) > 2 and "(secret" in cells[2]:
            secret.update(n for n in found if not n.endswith("_FILE"))
    return names, secret


def duration_seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2)
    return n / 1000 if unit == "ms" else n * {"s": 1, "m": 60, "h": 3600}[unit]


def selector_matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def url_port(url):
    """(scheme, port) of an http(s) URL, the port defaulting to the scheme's."""
    m = re.fullmatch(r"(https?)://([^/:?#]+)(?::(\d+))?([/?#].*)?", url or "")
    if not m:
        return None, None
    return m.group(1), int(m.group(3) or (443 if m.group(1) == "https" else 80))


def cmd_policy(rendered, readme, alerts, name):
    docs = load_all(rendered)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    known_env, secret_env = readme_env(readme)
    if len(known_env) < 30:
        err(f"found only {len(known_env)} variables in the README configuration table")
    if not {"POSTGRES_PASSWORD", "API_CURSOR_KEY"} <= secret_env:
        err(f"the README configuration table marks only {sorted(secret_env)} as secrets")
    known_env |= set(KNOWN_EXTRA_ENV)
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in by_kind.get("ConfigMap", [])}
    secrets = {d["metadata"]["name"]: set((d.get("data") or {}).keys()) | set((d.get("stringData") or {}).keys())
               for d in by_kind.get("Secret", [])}
    service_accounts = {d["metadata"]["name"] for d in by_kind.get("ServiceAccount", [])}
    overlay = name != "base"
    with open(alerts) as f:
        alerts_text = f.read()

    # --- which Deployment is which workload ----------------------------------------------
    deployments = {}
    for dep in by_kind.get("Deployment", []):
        dname = dep["metadata"]["name"]
        if dname not in WORKLOADS:
            err(f"Deployment/{dname}: not a known workload ({', '.join(WORKLOADS)}); describe it in WORKLOADS first")
        elif dname in deployments:
            err(f"Deployment/{dname}: rendered twice")
        else:
            deployments[dname] = dep
    for wname in WORKLOADS:
        if wname not in deployments:
            err(f"no Deployment {wname}")
    if ERRORS:
        return finish("")

    # Facts about each workload gathered below, for the objects around it and the cross-checks.
    pod_labels = {w: d["spec"]["template"]["metadata"].get("labels", {}) for w, d in deployments.items()}
    main_env = {}      # workload -> effective environment of its main container
    env_refs = {}      # workload -> {variable: (ConfigMap, key)} of configMapKeyRef variables
    ports = {}         # workload -> {containerPort name: number} of its main container
    app_port = {}      # workload -> the port its probes, Service, NetworkPolicy and monitor use
    secret_users = {}  # Secret -> workloads that mount it
    images = {}        # image -> containers

    def env_of(where, c, refs):
        env = {}
        for ref in c.get("envFrom", []):
            cm = ref.get("configMapRef", {}).get("name")
            if cm is not None:
                if cm not in configmaps:
                    err(f"{where}: envFrom ConfigMap {cm!r} is not rendered")
                env.update(configmaps.get(cm, {}))
            if "secretRef" in ref:
                err(f"{where}: envFrom a Secret puts secrets into the environment; mount it and use *_FILE")
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
                continue
            src = e.get("valueFrom", {})
            if "configMapKeyRef" in src:
                ref = src["configMapKeyRef"]
                if ref["key"] not in configmaps.get(ref["name"], {}):
                    err(f"{where}: {e['name']} refers to missing ConfigMap key {ref['name']}/{ref['key']}")
                env[e["name"]] = configmaps.get(ref["name"], {}).get(ref["key"])
                refs[e["name"]] = (ref["name"], ref["key"])
            elif "secretKeyRef" in src:
                err(f"{where}: {e['name']} takes a Secret into the environment; mount it and use *_FILE")
                env[e["name"]] = src
            else:
                env[e["name"]] = src
        return env

    # --- each workload: pod, containers, main container -----------------------------------
    for wname, dep in deployments.items():
        want = WORKLOADS[wname]
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        labels = pod_labels[wname]
        where = f"Deployment/{wname}"

        low, high = want["replicas"]
        replicas = spec.get("replicas", 1)
        if replicas < low or (high is not None and replicas > high):
            err(f"{where}: replicas {replicas}, expected " + (f"{low}" if low == high else f"at least {low}"))
        if not selector_matches(spec["selector"].get("matchLabels"), labels):
            err(f"{where}: selector does not match the pod template labels")
        if pod.get("automountServiceAccountToken") is not False:
            err(f"{where}: automountServiceAccountToken must be false")
        if pod.get("enableServiceLinks") is not False:
            err(f"{where}: enableServiceLinks must be false (a Service named postgres would set POSTGRES_PORT)")
        sa = pod.get("serviceAccountName")
        if sa not in service_accounts:
            err(f"{where}: serviceAccountName {sa!r} is not rendered")
        psc = pod.get("securityContext", {})
        for key, value in (("runAsNonRoot", True), ("runAsUser", 10001), ("fsGroup", 10001)):
            if psc.get(key) != value:
                err(f"{where}: pod securityContext.{key} is {psc.get(key)!r}, expected {value!r}")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            err(f"{where}: pod seccompProfile must be RuntimeDefault")
        spread = pod.get("topologySpreadConstraints", [])
        anti = pod.get("affinity", {}).get("podAntiAffinity")
        if not any(c.get("topologyKey") == "kubernetes.io/hostname" for c in spread) and not anti:
            err(f"{where}: no spreading across nodes (topologySpreadConstraints or podAntiAffinity)")

        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "secret" in v:
                secret_users.setdefault(v["secret"]["secretName"], set()).add(wname)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        containers = pod.get("containers", [])
        inits = pod.get("initContainers", [])
        init_names = [c["name"] for c in inits]
        if init_names != want["init_containers"]:
            err(f"{where}: init containers {init_names}, expected {want['init_containers']}"
                + ("" if want["init_containers"] else " (stateless: migrations belong to the consumer)"))
        main = next((c for c in containers if c["name"] == want["container"]), None)
        if main is None:
            err(f"{where}: no container named {want['container']}")
            continue
        if len(containers) != 1:
            err(f"{where}: containers {[c['name'] for c in containers]}, expected only {want['container']}")

        for c in containers + inits:
            cw = f"{where}/{c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                err(f"{cw}: allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                err(f"{cw}: readOnlyRootFilesystem must be true")
            if sc.get("privileged"):
                err(f"{cw}: privileged")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                err(f"{cw}: capabilities must drop ALL")
            if sc.get("capabilities", {}).get("add"):
                err(f"{cw}: adds capabilities")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        err(f"{cw}: resources.{kind}.{r} unset")
            image = c.get("image", "")
            images.setdefault(image, []).append(cw)
            if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
                err(f"{cw}: image {image!r} has no pinned tag")
            if overlay and "set-by-overlay" in image:
                err(f"{cw}: the overlay does not set the image (images: in kustomization.yaml)")
            refs = {}
            env = env_of(cw, c, refs)
            for var in env:
                base_var = var[:-5] if var.endswith("_FILE") else var
                if var in known_env or base_var in known_env or var.startswith("KAFKA_PROP_"):
                    continue
                err(f"{cw}: environment variable {var} is not read by the daemon (README configuration table)")
            for var in sorted(secret_env & set(env)):
                err(f"{cw}: {var} is a secret: set {var}_FILE to a file of a mounted Secret instead")
            mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts", [])}
            for m in mounts.values():
                if m["name"] not in volumes:
                    err(f"{cw}: volumeMount {m['name']} has no volume")
                elif "secret" in volumes[m["name"]] and m.get("readOnly") is not True:
                    err(f"{cw}: Secret volume {m['name']} is not mounted readOnly")
            for var, value in env.items():
                if not var.endswith("_FILE") or not isinstance(value, str):
                    continue
                directory, _, key = value.rpartition("/")
                m = mounts.get(directory)
                if m is None:
                    err(f"{cw}: {var}={value}: no volume is mounted at {directory}")
                    continue
                vol = volumes.get(m["name"], {})
                if "secret" not in vol:
                    err(f"{cw}: {var} points into volume {m['name']}, which is not a Secret")
                    continue
                secret = vol["secret"]["secretName"]
                if overlay:
                    if secret not in secrets:
                        err(f"{cw}: {var}: Secret {secret} is not rendered by this overlay")
                    elif key not in secrets[secret]:
                        err(f"{cw}: {var}: Secret {secret} has no key {key!r}")
            if c is not main:
                continue

            # the main container: its role, ports, probes, stop, logins
            main_env[wname], env_refs[wname] = env, refs
            if c.get("args") != want["args"] or c.get("command"):
                err(f"{cw}: args {c.get('args')!r}" + (f", command {c.get('command')!r}" if c.get("command") else "")
                    + f", expected args {want['args']!r} (same image, the role is chosen by the argument)")
            if env.get("INSTANCE_ID", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
                err(f"{cw}: INSTANCE_ID must come from the pod name (downward API)")
            if "KAFKA_GROUP_INSTANCE_ID" in env:
                err(f"{cw}: KAFKA_GROUP_INSTANCE_ID set: no static membership in a Deployment (pods are renamed by every rollout)")
            ports[wname] = cports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            try:
                port = int(env.get(want["port_env"], want["port_default"]))
            except (TypeError, ValueError):
                err(f"{cw}: {want['port_env']} {env.get(want['port_env'])!r} is not a port")
                continue
            app_port[wname] = port
            if cports.get(want["port_name"]) != port:
                err(f"{cw}: containerPort {want['port_name']} {cports.get(want['port_name'])} != {want['port_env']} {port}")
            if want["metrics_port_env"]:
                metrics_port = int(env.get(want["metrics_port_env"], port))
                if metrics_port != port and metrics_port not in cports.values():
                    err(f"{cw}: {want['metrics_port_env']} {metrics_port} has no containerPort")
            for k, path in PROBES.items():
                p = c.get(k)
                if not p:
                    err(f"{cw}: no {k}")
                    continue
                get = p.get("httpGet", {})
                if get.get("path") != path:
                    err(f"{cw}: {k} path {get.get('path')!r}, expected {path}")
                if get.get("port") not in (want["port_name"], port):
                    err(f"{cw}: {k} port {get.get('port')!r} is not {want['port_name']} ({want['port_env']} {port})")
            lp = c.get("livenessProbe") or {}
            if lp.get("periodSeconds", 10) * lp.get("failureThreshold", 3) < 30:
                err(f"{cw}: livenessProbe gives up in under 30 s")
            res = c.get("resources", {})
            for kind, vals in want["resources"].items():
                for r, v in vals.items():
                    if str(res.get(kind, {}).get(r)) != v:
                        err(f"{cw}: resources.{kind}.{r} is {res.get(kind, {}).get(r)!r}, expected {v}")
            needed_files = list(want["secret_files"])
            if str(env.get("KAFKA_SECURITY_PROTOCOL", "plaintext")).lower().startswith("sasl"):
                needed_files.append("KAFKA_SASL_PASSWORD_FILE")
            for var in needed_files:
                if not isinstance(env.get(var), str):
                    err(f"{cw}: {var} unset (a file of a mounted Secret)")

            if want["stop"] == "drain":
                shutdown = duration_seconds(str(env.get("SHUTDOWN_TIMEOUT", "25s")))
                if shutdown is None:
                    err(f"{cw}: SHUTDOWN_TIMEOUT {env.get('SHUTDOWN_TIMEOUT')!r} is not a duration")
                elif not grace > shutdown + 5:
                    err(f"{cw}: terminationGracePeriodSeconds {grace} must exceed SHUTDOWN_TIMEOUT ({shutdown:g}s) with margin")
            else:
                # The endpoint removal must reach the proxies before the listener closes, and
                # the longest request (its timeouts in sequence) must finish after SIGTERM.
                pause = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
                if not isinstance(pause, int) or pause < 1:
                    err(f"{cw}: no lifecycle.preStop.sleep (new requests would reach a closing listener)")
                    pause = 0
                request = 0
                for var, default in (("API_QUERY_TIMEOUT", "10s"), ("IMMUDB_REQUEST_TIMEOUT", "10s")):
                    s = duration_seconds(str(env.get(var, default)))
                    if s is None:
                        err(f"{cw}: {var} {env.get(var)!r} is not a duration")
                        s = 0
                    request += s
                request += ACCESS_ACK_SECONDS
                if not grace >= pause + request + 5:
                    err(f"{cw}: terminationGracePeriodSeconds {grace} does not cover the preStop pause ({pause}s) "
                        f"and one request's timeouts (API_QUERY_TIMEOUT + IMMUDB_REQUEST_TIMEOUT + "
                        f"{ACCESS_ACK_SECONDS}s access ack = {request:g}s) with 5 s of margin")
            for var, key in want["logins"].items():
                if refs.get(var, (None, None))[1] != key:
                    err(f"{cw}: {var} must come from ConfigMap key {key} (its own login), not {refs.get(var) or env.get(var)!r}")
            if want["identity_provider"]:
                for var in ("OIDC_ISSUER", "OIDC_JWKS_URL"):
                    if var not in env and var == "OIDC_JWKS_URL":
                        continue
                    scheme, _ = url_port(env.get(var))
                    if scheme != "https":
                        err(f"{cw}: {var} {env.get(var)!r} is not an https:// URL")

    # --- across workloads -------------------------------------------------------------------
    if len(images) > 1:
        err("the workloads run different images: " + "; ".join(f"{i} ({', '.join(c)})" for i, c in images.items()))
    for secret, users in secret_users.items():
        if len(users) > 1:
            err(f"Secret {secret} is mounted by {sorted(users)}: each workload has its own credentials")
    sas = [deployments[w]["spec"]["template"]["spec"].get("serviceAccountName") for w in deployments]
    if len(set(sas)) != len(sas):
        err(f"the workloads share a ServiceAccount ({sas}): each has its own identity")
    for a in deployments:
        for b in deployments:
            if a < b and (selector_matches(deployments[a]["spec"]["selector"].get("matchLabels"), pod_labels[b])
                          or selector_matches(deployments[b]["spec"]["selector"].get("matchLabels"), pod_labels[a])):
                err(f"Deployments {a} and {b} select each other's pods")
    if "audit-api" in main_env and "audit-consumer" in main_env:
        api, consumer = main_env["audit-api"], main_env["audit-consumer"]
        topic = api.get("API_ACCESS_TOPIC", "audit.access.v1")
        topics = [t.strip() for t in str(consumer.get("KAFKA_TOPICS", "")).split(",")]
        if topic not in topics:
            err(f"API_ACCESS_TOPIC {topic} is not in the consumer's KAFKA_TOPICS: reads would never reach the trail")
        for var in WORKLOADS["audit-api"]["logins"]:
            if api.get(var) is not None and api.get(var) == consumer.get(var):
                err(f"audit-api's {var} is the consumer's ({api.get(var)!r}): the read side needs its own login")

    # --- the objects around the pods: each selects exactly one workload -------------------
    def selected(sel, what):
        hits = [w for w in deployments if selector_matches(sel, pod_labels[w])]
        if len(hits) != 1:
            err(f"{what}: selects the pods of {hits or 'no workload'}, expected exactly one workload")
            return None
        return hits[0]

    def is_app_port(w, value):
        return w in app_port and value in (WORKLOADS[w]["port_name"], app_port[w])

    services_of = {w: [] for w in deployments}
    for svc in by_kind.get("Service", []):
        sw = f"Service/{svc['metadata']['name']}"
        w = selected(svc["spec"].get("selector"), sw)
        if w is None:
            continue
        services_of[w].append(svc)
        for p in svc["spec"].get("ports", []):
            tp = p.get("targetPort", p["port"])
            if not is_app_port(w, tp):
                err(f"{sw}: targetPort {tp!r} is not {w}'s port {WORKLOADS[w]['port_name']}")
    for w, svcs in services_of.items():
        if WORKLOADS[w]["service_required"] and not any(s["spec"].get("clusterIP") != "None" for s in svcs):
            err(f"{w}: no Service with a cluster IP for its clients")

    pdbs_of = {w: [] for w in deployments}
    for pdb in by_kind.get("PodDisruptionBudget", []):
        pw = f"PodDisruptionBudget/{pdb['metadata']['name']}"
        w = selected(pdb["spec"]["selector"].get("matchLabels"), pw)
        if w is None:
            continue
        pdbs_of[w].append(pdb)
        if pdb["spec"].get("maxUnavailable") != 1:
            err(f"{pw}: maxUnavailable must be 1")
        if pdb["spec"].get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
            err(f"{pw}: unhealthyPodEvictionPolicy must be AlwaysAllow (a store outage makes every pod not ready)")
    for w, found in pdbs_of.items():
        if len(found) != 1:
            err(f"{w}: expected one PodDisruptionBudget, found {len(found)}")

    # job label each workload's metrics get, by PodMonitor, or ServiceMonitor on its Service
    jobs_of = {w: [] for w in deployments}
    for mon in by_kind.get("PodMonitor", []):
        mw = f"PodMonitor/{mon['metadata']['name']}"
        w = selected(mon["spec"]["selector"].get("matchLabels"), mw)
        if w is None:
            continue
        for ep in mon["spec"].get("podMetricsEndpoints", []):
            if ep.get("port") not in ports.get(w, {}):
                err(f"{mw}: port {ep.get('port')!r} is not a container port of {w}")
            if ep.get("path", "/metrics") != "/metrics":
                err(f"{mw}: path {ep.get('path')!r}")
        jobs_of[w].append(pod_labels[w].get(mon["spec"].get("jobLabel")))
    for mon in by_kind.get("ServiceMonitor", []):
        mw = f"ServiceMonitor/{mon['metadata']['name']}"
        for w, svcs in services_of.items():
            for svc in svcs:
                if selector_matches(mon["spec"]["selector"].get("matchLabels"), svc["metadata"].get("labels", {})):
                    job_label = mon["spec"].get("jobLabel")
                    jobs_of[w].append(svc["metadata"].get("labels", {}).get(job_label) if job_label
                                      else svc["metadata"]["name"])
    for w, jobs in jobs_of.items():
        want_job = WORKLOADS[w]["job"]
        if len(jobs) != 1:
            err(f"{w}: scraped by {len(jobs)} PodMonitors/ServiceMonitors, expected one")
        elif jobs[0] != want_job:
            err(f"{w}: its monitor gives job={jobs[0]!r}, not job=\"{want_job}\" (the alerts select it)")
        if f'up{{job="{want_job}"}}' not in alerts_text:
            err(f"{w}: no alert on up{{job=\"{want_job}\"}} in {alerts}")
    for job in sorted(set(re.findall(r'job="([^"]+)"', alerts_text))):
        if job not in {spec["job"] for spec in WORKLOADS.values()}:
            err(f"{alerts}: job=\"{job}\" is not the job of any workload's monitor")

    rules = by_kind.get("PrometheusRule", [])
    want_rules = yaml.safe_load(alerts_text)
    if len(rules) != 1 or rules[0]["spec"] != want_rules:
        err("PrometheusRule spec differs from deploy/prometheus/alerts.yaml (run --sync-rules)")

    policies_of = {w: [] for w in deployments}
    for np in by_kind.get("NetworkPolicy", []):
        nw = f"NetworkPolicy/{np['metadata']['name']}"
        w = selected(np["spec"]["podSelector"].get("matchLabels"), nw)
        if w is None:
            continue
        policies_of[w].append(np)
        env = main_env.get(w, {})
        if set(np["spec"].get("policyTypes", [])) != {"Ingress", "Egress"}:
            err(f"{nw}: policyTypes must be Ingress and Egress")
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []) or [{"port": None}]:
                if not is_app_port(w, p["port"]):
                    err(f"{nw}: ingress admits port {p['port']!r}, only {w}'s port {WORKLOADS[w]['port_name']} is expected")
            if overlay and not rule.get("from"):
                err(f"{nw}: an ingress rule admits every peer; the overlay should narrow it (from:)")
        egress = np["spec"].get("egress", [])
        egress_ports = {(p.get("protocol", "TCP"), p.get("port")) for r in egress for p in r.get("ports", []) or []}
        if any(not r.get("ports") for r in egress):
            err(f"{nw}: an egress rule without ports allows everything")
        if overlay and any(not r.get("to") for r in egress):
            err(f"{nw}: an egress rule reaches every peer; the overlay should narrow it (to:)")
        needed = {("UDP", 53): "DNS", ("TCP", int(env.get("IMMUDB_PORT", 3322))): "IMMUDB_PORT",
                  ("TCP", int(env.get("POSTGRES_PORT", 5432))): "POSTGRES_PORT"}
        for broker in str(env.get("KAFKA_BROKERS", "")).split(","):
            if ":" in broker:
                needed[("TCP", int(broker.rsplit(":", 1)[1]))] = f"KAFKA_BROKERS ({broker})"
        if WORKLOADS[w]["identity_provider"]:
            # Without OIDC_JWKS_URL the keys' address comes from the issuer's discovery document.
            var = "OIDC_JWKS_URL" if env.get("OIDC_JWKS_URL") else "OIDC_ISSUER"
            _, port = url_port(env.get(var))
            if port:
                needed[("TCP", port)] = f"the identity provider ({var} {env.get(var)})"
        for key, what in needed.items():
            if key not in egress_ports:
                err(f"{nw}: egress does not allow {key[0]}/{key[1]} ({what})")
        extra = egress_ports - set(needed) - {("TCP", 53)}
        if extra and overlay:
            print(f"note: {nw}: egress also allows {sorted(extra, key=str)}")
    for w, found in policies_of.items():
        if len(found) != 1:
            err(f"{w}: expected one NetworkPolicy selecting its pods, found {len(found)}")

    if overlay:
        for d in docs:
            if d["kind"] == "Namespace":
                continue
            if not d["metadata"].get("namespace"):
                err(f"{d['kind']}/{d['metadata']['name']}: no namespace set by the overlay")
    kinds = ", ".join(f"{k}×{len(v)}" if len(v) > 1 else k for k, v in sorted(by_kind.items()))
    finish(f"{name}: workloads {', '.join(deployments)}; {kinds}: ok")


# ---------------------------------------------------------------------------------------
# dashboard structure

def cmd_dashboard(path):
    with open(path) as f:
        d = json.load(f)
    if d.get("schemaVersion", 0) < 36:
        err(f"schemaVersion {d.get('schemaVersion')} is old (< 36)")
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        err("no `datasource` variable of type datasource (prometheus)")
    ids = set()
    titles = []
    occupied = {}
    for p in d.get("panels", []):
        if p.get("id") in ids:
            err(f"duplicate panel id {p.get('id')}")
        ids.add(p.get("id"))
        titles.append(p.get("title"))
        g = p.get("gridPos", {})
        for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
            for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
                if (x, y) in occupied:
                    err(f"panel {p.get('title')!r} overlaps {occupied[(x, y)]!r}")
                    break
                occupied[(x, y)] = p.get("title")
            else:
                continue
            break
        if g.get("x", 0) + g.get("w", 0) > 24:
            err(f"panel {p.get('title')!r} is wider than the grid")
        if p.get("type") == "row":
            continue
        refs = [p.get("datasource")] + [t.get("datasource") for t in p.get("targets", [])]
        for r in refs:
            if not r or r.get("uid") != "${datasource}":
                err(f"panel {p.get('title')!r}: datasource {r!r} is not ${{datasource}}")
        if not p.get("targets"):
            err(f"panel {p.get('title')!r} has no query")
    want = ["throughput", "lag", "latency", "dlq|dead-letter", "circuit", "immudb|verification", "memory", "cpu",
            "api request", "api latency", "access event"]
    for w in want:
        if not any(re.search(w, (t or ""), re.I) for t in titles):
            err(f"no panel about {w}")
    finish(f"{path}: {len(ids)} panels, variables {', '.join(variables)}: ok")


# ---------------------------------------------------------------------------------------
# metrics: every name and label matcher used must be in the contract

AGG_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OPERATORS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end", "@"}
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint"}
TOKEN = re.compile(r"""
    (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<braces>\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\})
  | (?P<range>\[[^\]]*\])
  | (?P<num>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)(?:ms|s|m|h|d|w|y)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<var>\$\{?[a-zA-Z_][a-zA-Z0-9_]*\}?)
  | (?P<space>\s+)
  | (?P<punct>[()\[\],+\-*/%^=!<>~@])
""", re.X)
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')


def selectors(expr):
    """(metric name, [label names matched]) for every vector selector in a PromQL expression."""
    out = []
    tokens = []
    pos = 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot tokenize at {expr[pos:pos + 20]!r}")
        pos = m.end()
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, None)
        if kind == "ident" and text in AGG_KEYWORDS and nxt[1] == "(":
            while i < len(tokens) and tokens[i][1] != ")":  # skip the label list
                i += 1
        elif kind == "ident" and (nxt[1] == "(" or nxt[1] in ("by", "without")):
            pass  # function or aggregation (`sum by (x) (...)`)
        elif kind == "ident" and text not in OPERATORS and text not in AGG_KEYWORDS:
            labels = []
            if nxt[0] == "braces":
                labels = [m.group(1) for m in MATCHER.finditer(nxt[1])]
                i += 1
            out.append((text, labels))
        i += 1
    return out


def load_contract(path):
    contract = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, kind, labels = line.split()
        contract[name] = (kind, set() if labels == "-" else set(labels.split(",")))
    return contract


def cmd_metrics(contract_path, alerts_path, *dashboards):
    contract = load_contract(contract_path)
    exprs = []  # (where, expr, label that label_values() reads)
    with open(alerts_path) as f:
        groups = yaml.safe_load(f)["groups"]
    recorded = {}
    for g in groups:
        for r in g["rules"]:
            if "record" in r:
                recorded[r["record"]] = r["expr"]
            exprs.append((f"{alerts_path}: {r.get('alert') or r.get('record')}", r["expr"], None))
    for path in dashboards:
        with open(path) as f:
            d = json.load(f)

        def walk(panels):
            for p in panels:
                for t in p.get("targets", []):
                    if t.get("expr"):
                        exprs.append((f"{path}: panel {p.get('title')!r}", t["expr"], None))
                walk(p.get("panels", []))

        walk(d.get("panels", []))
        for v in d.get("templating", {}).get("list", []):
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", q or "")
            if m:
                exprs.append((f"{path}: variable {v['name']}", m.group(1), m.group(2)))
    used = set()
    for where, expr, extra_label in exprs:
        try:
            found = selectors(expr)
            if extra_label and found:  # label_values(metric, label): the label must exist
                found[0] = (found[0][0], found[0][1] + [extra_label])
        except ValueError as e:
            err(f"{where}: {e}")
            continue
        if not found:
            err(f"{where}: no metric in {expr!r}")
        for name, labels in found:
            base, suffix = name, ""
            for s in ("_bucket", "_count", "_sum"):
                if name.endswith(s) and name[: -len(s)] in contract and contract[name[: -len(s)]][0] == "histogram":
                    base, suffix = name[: -len(s)], s
            if base in recorded:
                continue
            if base not in contract:
                err(f"{where}: metric {name} is not in the contract ({contract_path})")
                continue
            kind, allowed = contract[base]
            if kind == "histogram" and not suffix:
                err(f"{where}: histogram {base} used without _bucket/_count/_sum")
            used.add(base)
            allowed = allowed | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
            for label in labels:
                if label not in allowed:
                    err(f"{where}: {name} has no label {label!r} (contract: {sorted(contract[base][1]) or 'none'})")
    unused = [n for n, (k, _) in contract.items() if n not in used]
    if unused:
        print(f"note: contract metrics shown nowhere: {', '.join(unused)}")
    finish(f"{len(exprs)} expressions, {len(used)} of {len(contract)} contract metrics used, all known: ok")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"split": cmd_split, "policy": cmd_policy, "dashboard": cmd_dashboard, "metrics": cmd_metrics}[cmd](*args)
PYTHON
}

# ---------------------------------------------------------------------------------------
# the checks

log "tools cache: $TOOLS"
t0=$(now_us)
ensure_python
log "python: $("$PY" -c 'import sys; print(sys.version.split()[0])'), kubernetes-validate $KUBERNETES_VALIDATE_VERSION ($(secs "$t0"))"

# The Python half of the checks is write_helper, above.
HELPER="$WORK/helper.py"
write_helper "$HELPER"
helper() { "$PY" "$HELPER" "$@"; }

# 1. render ------------------------------------------------------------------------------
t0=$(now_us)
RENDERED=()
if ensure_kustomize; then
    log "kustomize: $KUSTOMIZE_DESC ($(secs "$t0"))"
    for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
        dir=${dir%/}
        [[ -f $dir/kustomization.yaml ]] || continue
        out="$WORK/rendered-$(basename "$dir").yaml"
        if "${KUSTOMIZE_CMD[@]}" "$dir" >"$out" 2>"$WORK/render.err"; then
            pass "render $dir ($(grep -c '^kind:' "$out") objects)"
            RENDERED+=("$out")
        else
            sed 's/^/    /' "$WORK/render.err" >&2
            fail "render $dir"
        fi
    done
else
    fail "render: kustomize unavailable (no kubectl, and the Go build failed)"
fi

# 2. schema ------------------------------------------------------------------------------
for out in "${RENDERED[@]}"; do
    name=$(basename "$out" .yaml)
    name=${name#rendered-}
    if ! helper split "$out" "$WORK/core-$name.yaml" "$WORK/crs-$name.yaml" 2>"$WORK/split.err"; then
        sed 's/^/    /' "$WORK/split.err" >&2
        fail "schema $name: the rendered YAML does not parse"
        continue
    fi
    for v in "${KUBE_VERSIONS[@]}"; do
        step "schema $name (Kubernetes $v, strict)" \
            "${PY%/python}/kubernetes-validate" --strict --quiet -k "$v" "$WORK/core-$name.yaml"
    done
done

# 3. policy ------------------------------------------------------------------------------
render_prometheusrule >"$WORK/prometheusrule.yaml"
# shellcheck disable=SC2317 # invoked through step
rules_in_sync() {
    diff -u "$PROMETHEUSRULE" "$WORK/prometheusrule.yaml" \
        || { echo "out of date: run scripts/validate-deploy.sh --sync-rules"; return 1; }
}
step "rules sync: $PROMETHEUSRULE is generated from alerts.yaml" rules_in_sync
for out in "${RENDERED[@]}"; do
    name=$(basename "$out" .yaml)
    name=${name#rendered-}
    step "policy $name" helper policy "$out" README.md deploy/prometheus/alerts.yaml "$name"
done

# 4. lint --------------------------------------------------------------------------------
if ((${#RENDERED[@]})); then
    if ensure_kube_linter; then
        log "kube-linter: $("$KUBE_LINTER_BIN" version 2>&1 | head -n1)"
        for out in "${RENDERED[@]}"; do
            name=$(basename "$out" .yaml)
            name=${name#rendered-}
            # Core kinds only: kube-linter does not know the Prometheus Operator's kinds.
            step "kube-linter $name" "$KUBE_LINTER_BIN" lint --config deploy/k8s/.kube-linter.yaml \
                "$WORK/core-$name.yaml"
        done
    else
        skip "kube-linter" "$KUBE_LINTER_ERR"
    fi
fi

# 5. rules -------------------------------------------------------------------------------
t0=$(now_us)
if ensure_promtool; then
    log "promtool: $("$PROMTOOL_BIN" --version 2>&1 | head -n1) ($(secs "$t0"))"
    step "promtool check rules" "$PROMTOOL_BIN" check rules deploy/prometheus/alerts.yaml
    step "promtool test rules" "$PROMTOOL_BIN" test rules deploy/prometheus/alerts_test.yaml
    # Live /metrics scrapes saved by the integration tests (tests/operations.rs).
    for scrape in "${SCRAPES[@]}"; do
        step "promtool check metrics $(basename "$scrape")" sh -c '"$1" check metrics < "$2"' _ "$PROMTOOL_BIN" "$scrape"
    done
else
    skip "promtool check/test rules" "$PROMTOOL_ERR"
fi

# 6. grafana -----------------------------------------------------------------------------
for f in deploy/grafana/*.json; do
    step "json $f" "$PY" -m json.tool "$f" /dev/null
    step "dashboard $f" helper dashboard "$f"
done

# 7. metrics -----------------------------------------------------------------------------
step "metrics contract (alerts + dashboards)" helper metrics deploy/prometheus/metrics.txt \
    deploy/prometheus/alerts.yaml deploy/grafana/*.json

# ---------------------------------------------------------------------------------------
log "---- summary ($(secs "$STARTED"))"
printf '  %s\n' "${RESULTS[@]}" >&2
if ((FAILED)); then
    log "$FAILED check(s) failed, $SKIPPED skipped"
    exit 1
fi
log "all checks passed ($SKIPPED skipped)"
exit 0
