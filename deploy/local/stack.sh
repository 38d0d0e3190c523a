#!/usr/bin/env bash
# Local Kafka + immudb + PostgreSQL (+ Keycloak on request) on 127.0.0.1, no Docker, for
# development and the integration tests. Everything is fetched through package registries only:
#   Kafka      jars from Maven Central    (deploy/local/kafka/pom.xml)
#   immudb     built from the Go proxy    (deploy/local/immudb/go.mod)
#   PostgreSQL Debian packages, a private cluster run as the `postgres` OS user
#   Keycloak   server distribution from Maven Central (deploy/local/keycloak/pom.xml);
#              optional: OpenID Connect provider for the read API and the console
#
# Usage: stack.sh up [--with keycloak]|down|status|env
#        stack.sh ensure SERVICE...          install if needed, start if not running, wait
#        stack.sh start|stop|restart|kill|logs kafka|immudb|postgres|keycloak
#        stack.sh kafka-topics [TopicCommand args...]   e.g. kafka-topics --list
#        stack.sh immuclient [args...]                  e.g. immuclient safeget some-key
#
#   eval "$(deploy/local/stack.sh env)"   # the variables the daemon and the tests read
#
# Keycloak is heavy (~400-500 MB RSS, ~20 s to a first start), so `up` starts only the three
# core servers unless asked (`up --with keycloak` or AUDIT_STACK_WITH=keycloak); tests that
# need it run `stack.sh ensure keycloak`, which is idempotent and safe to run concurrently.
#
# Knobs (environment): AUDIT_KAFKA_PORT (19092), AUDIT_KAFKA_CONTROLLER_PORT (19093),
# AUDIT_IMMUDB_PORT (13322), AUDIT_POSTGRES_PORT (15432), AUDIT_KEYCLOAK_PORT (18080),
# AUDIT_STACK_WITH (optional servers `up` starts too: keycloak), AUDIT_STACK_DIR
# (/tmp/audit-consumer-stack: data, logs, pid files; `down` deletes it), AUDIT_CACHE_DIR
# (~/.cache/audit-consumer: jars and binaries, kept), AUDIT_STACK_TIMEOUT (90 s per server
# to answer), AUDIT_KEYCLOAK_TIMEOUT (180 s for Keycloak), AUDIT_STACK_STOP_GRACE (10 s
# between the polite signal and SIGKILL).
#
# `status` exits 0 when the three core servers run, 3 otherwise (Keycloak is listed but
# does not count).
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
SCRIPT_PATH="$SCRIPT_DIR/$(basename -- "${BASH_SOURCE[0]}")"

HOST=127.0.0.1
KAFKA_PORT=${AUDIT_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${AUDIT_KAFKA_CONTROLLER_PORT:-19093}
IMMUDB_PORT=${AUDIT_IMMUDB_PORT:-13322}
POSTGRES_PORT=${AUDIT_POSTGRES_PORT:-15432}
KEYCLOAK_PORT=${AUDIT_KEYCLOAK_PORT:-18080}
READY_TIMEOUT=${AUDIT_STACK_TIMEOUT:-90}
KEYCLOAK_READY_TIMEOUT=${AUDIT_KEYCLOAK_TIMEOUT:-180}
STOP_GRACE=${AUDIT_STACK_STOP_GRACE:-10}

STACK_DIR=${AUDIT_STACK_DIR:-/tmp/audit-consumer-stack}
CACHE_DIR=${AUDIT_CACHE_DIR:-${HOME:?HOME is not set}/.cache/audit-consumer}
case $STACK_DIR in /*) ;; *) STACK_DIR="$PWD/$STACK_DIR" ;; esac
case $CACHE_DIR in /*) ;; *) CACHE_DIR="$PWD/$CACHE_DIR" ;; esac
STACK_DIR=${STACK_DIR%/}
# `down` runs rm -rf on STACK_DIR; it only does so when this marker is inside.
STACK_MARKER=.audit-consumer-stack

IMMUDB_USERNAME=immudb
IMMUDB_PASSWORD=immudb-local-admin
IMMUDB_DATABASE=defaultdb
POSTGRES_USERNAME=postgres
POSTGRES_PASSWORD=postgres
POSTGRES_DATABASE=audit
# Keycloak: the realm, its clients and demo users are in keycloak/realm-audit.json; the demo
# password below is the one every demo user has there (checked after each fresh start).
KEYCLOAK_REALM=audit
KEYCLOAK_URL="http://$HOST:$KEYCLOAK_PORT"
# --hostname pins every URL Keycloak issues, so `iss` is this whether a client says
# 127.0.0.1 or localhost.
KEYCLOAK_ISSUER="$KEYCLOAK_URL/realms/$KEYCLOAK_REALM"
KEYCLOAK_ADMIN_USERNAME="admin"
KEYCLOAK_ADMIN_PASSWORD=keycloak-local-admin
KEYCLOAK_DEMO_PASSWORD=audit-demo

# Single sources of truth for the pinned versions: the pom and the go.mod next to this script.
KAFKA_VERSION=$(sed -n 's:.*<kafka\.version>\(.*\)</kafka\.version>.*:\1:p' "$SCRIPT_DIR/kafka/pom.xml")
KEYCLOAK_VERSION=$(sed -n 's:.*<keycloak\.version>\(.*\)</keycloak\.version>.*:\1:p' "$SCRIPT_DIR/keycloak/pom.xml")
IMMUDB_VERSION=$(awk '$1 == "require" && $2 == "github.com/codenotary/immudb" { print $3 }' "$SCRIPT_DIR/immudb/go.mod")
KAFKA_LIBS="$CACHE_DIR/kafka-$KAFKA_VERSION/libs"
IMMUDB_BIN_DIR="$CACHE_DIR/immudb-$IMMUDB_VERSION"
# The unpacked distribution, pre-built (Quarkus re-augmentation) for the options below.
KEYCLOAK_DIST="$CACHE_DIR/keycloak-$KEYCLOAK_VERSION/dist"

KAFKA_DIR="$STACK_DIR/kafka"
IMMUDB_DIR="$STACK_DIR/immudb"
PG_DIR="$STACK_DIR/postgres"
PG_DATA="$PG_DIR/data"
PG_SOCKET_DIR="$PG_DIR/run"
KEYCLOAK_DIR="$STACK_DIR/keycloak"
# Keycloak's home (kc.home.dir) for this stack: data/ (H2 database, import folder,
# transaction log) lives here; lib/ is a symlink into the cached distribution.
KEYCLOAK_HOME="$KEYCLOAK_DIR/home"

# The core servers: `up` starts them, `status` counts them.
SERVICES=(kafka immudb postgres)
# Started only on request (`up --with`, AUDIT_STACK_WITH, `ensure`, `start`).
OPTIONAL_SERVICES=(keycloak)

# ---------------------------------------------------------------------------------------
# helpers

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
since() { # "12.3s" since a now_ms value
    local ms=$(($(now_ms) - $1))
    printf '%d.%ds' $((ms / 1000)) $((ms % 1000 / 100))
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

pid_alive() {
    local pid=$1 state
    [[ -n $pid ]] || return 1
    { read -r state <"/proc/$pid/stat"; } 2>/dev/null || return 1
    state=${state##*) }
    [[ ${state%% *} != Z ]]
}

cmdline() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }

children_of() {
    local f line rest
    for f in /proc/[0-9]*/stat; do
        { read -r line <"$f"; } 2>/dev/null || continue
        rest=${line##*) }
        rest=${rest#* }
        if [[ ${rest%% *} == "$1" ]]; then
            f=${f#/proc/}
            echo "${f%/stat}"
        fi
    done
}

# SIGKILL a server and everything it spawned (PostgreSQL backends are children of the
# postmaster and would otherwise linger until they notice it is gone).
kill_tree() {
    local pid=$1 kids
    kids=$(children_of "$pid")
    kill -KILL "$pid" 2>/dev/null || true
    # shellcheck disable=SC2086
    [[ -z $kids ]] || kill -KILL $kids 2>/dev/null || true
}

wait_gone() { # pid seconds
    local deadline=$(($(now_ms) + $2 * 1000))
    while pid_alive "$1"; do
        (($(now_ms) < deadline)) || return 1
        sleep 0.1
    done
}

need_service() {
    case ${1:-} in
        kafka | immudb | postgres | keycloak) ;;
        *) die "expected a service name (kafka|immudb|postgres|keycloak), got '${1:-}'" ;;
    esac
}

log_file() {
    case $1 in
        kafka) echo "$KAFKA_DIR/kafka.log" ;;
        immudb) echo "$IMMUDB_DIR/immudb.log" ;;
        postgres) echo "$PG_DIR/postgres.log" ;;
        keycloak) echo "$KEYCLOAK_DIR/keycloak.log" ;;
    esac
}

address_of() {
    case $1 in
        kafka) echo "$HOST:$KAFKA_PORT (controller $HOST:$KAFKA_CONTROLLER_PORT)" ;;
        immudb) echo "$HOST:$IMMUDB_PORT" ;;
        postgres) echo "$HOST:$POSTGRES_PORT" ;;
        keycloak) echo "$KEYCLOAK_URL (realm $KEYCLOAK_REALM)" ;;
    esac
}

port_of() {
    case $1 in
        kafka) echo "$KAFKA_PORT" ;;
        immudb) echo "$IMMUDB_PORT" ;;
        postgres) echo "$POSTGRES_PORT" ;;
        keycloak) echo "$KEYCLOAK_PORT" ;;
    esac
}

ready_timeout_of() {
    case $1 in
        keycloak) echo "$KEYCLOAK_READY_TIMEOUT" ;;
        *) echo "$READY_TIMEOUT" ;;
    esac
}

fail_with_log() { # service message
    local file
    file=$(log_file "$1")
    printf '[stack] ERROR: %s: %s\n' "$1" "$2" >&2
    if [[ -s $file ]]; then
        printf '[stack] ---- last 40 lines of %s ----\n' "$file" >&2
        tail -n 40 "$file" >&2
        printf '[stack] ----\n' >&2
    fi
    exit 1
}

pid_file() {
    case $1 in
        kafka) echo "$KAFKA_DIR/kafka.pid" ;;
        immudb) echo "$IMMUDB_DIR/immudb.pid" ;;
        postgres) echo "$PG_DATA/postmaster.pid" ;;
        keycloak) echo "$KEYCLOAK_DIR/keycloak.pid" ;;
    esac
}

raw_pid() { local pid=; { read -r pid <"$(pid_file "$1")"; } 2>/dev/null || true; echo "$pid"; }

# The pid of a running server, or nothing. The command line is checked so that a stale pid
# file whose number was reused by an unrelated process is not mistaken for the server.
service_pid() {
    local pid pattern
    case $1 in
        kafka) pattern="kafka.Kafka $KAFKA_DIR/server.properties" ;;
        immudb) pattern="--dir $IMMUDB_DIR/data" ;;
        postgres) pattern="$PG_DATA" ;;
        keycloak) pattern="-Dkc.home.dir=$KEYCLOAK_HOME " ;;
    esac
    pid=$(raw_pid "$1")
    if pid_alive "$pid" && [[ $(cmdline "$pid") == *"$pattern"* ]]; then
        echo "$pid"
    fi
}

# Serialises commands that start or stop servers: parallel test binaries may call
# `start`/`stop` at the same time. The lock lives beside the stack dir so `down` can
# delete the dir while holding it; servers are launched with fd 9 closed so they never
# inherit it.
take_lock() {
    mkdir -p "$(dirname -- "$STACK_DIR")"
    exec 9>"$STACK_DIR.lock"
    flock -w 300 9 || die "could not lock $STACK_DIR.lock within 300 s"
}

# ---------------------------------------------------------------------------------------
# prerequisites: only what is missing is installed, with one `apt-get update`

APT_UPDATED=
apt_install() {
    [[ $EUID -eq 0 ]] || die "missing packages ($*) and not root; install them: apt-get install -y $*"
    if [[ -z $APT_UPDATED ]]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

java_major() {
    local v
    v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)
    echo "${v:-0}"
}

pg_bin_dir() {
    local d
    d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -type d -name bin 2>/dev/null | sort -V | tail -n 1)
    [[ -n $d && -x $d/initdb && -x $d/pg_ctl && -x $d/psql && -x $d/pg_isready ]] && echo "$d"
}

PG_BIN=
ensure_tools() {
    local pkgs=()
    if ! command -v java >/dev/null || (($(java_major) < 17)); then
        pkgs+=(openjdk-17-jre-headless) # Kafka 4 brokers need Java 17+
    fi
    if ! pg_bin_dir >/dev/null; then
        # Installing the server package would otherwise create and start a system cluster
        # on 5432; this stack never uses one.
        if [[ $EUID -eq 0 ]]; then
            mkdir -p /etc/postgresql-common/createcluster.d
            echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/audit-consumer-local.conf
        fi
        pkgs+=(postgresql)
    fi
    ((${#pkgs[@]} == 0)) || apt_install "${pkgs[@]}"
    (($(java_major) >= 17)) || die "Java 17+ is required for Kafka $KAFKA_VERSION (found $(java_major))"
    PG_BIN=$(pg_bin_dir) || die "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
    if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
}

# Keycloak needs Java 17+, and curl for its readiness probe; deploy/local/keycloak/admin.sh
# (users and signing keys for tests) needs curl and jq.
ensure_keycloak_tools() {
    local pkgs=()
    if ! command -v java >/dev/null || (($(java_major) < 17)); then
        pkgs+=(openjdk-17-jre-headless)
    fi
    command -v curl >/dev/null || pkgs+=(curl)
    command -v jq >/dev/null || pkgs+=(jq)
    ((${#pkgs[@]} == 0)) || apt_install "${pkgs[@]}"
    (($(java_major) >= 17)) || die "Java 17+ is required for Keycloak $KEYCLOAK_VERSION (found $(java_major))"
}

# Tools for the given services: the core servers' (PostgreSQL binaries included) only when
# one of them is asked for, so `ensure keycloak` never installs PostgreSQL.
ensure_tools_for() {
    local svc core=
    for svc in "$@"; do
        case $svc in
            keycloak) ensure_keycloak_tools ;;
            *) core=1 ;;
        esac
    done
    [[ -z $core ]] || ensure_tools
}

# mvn and go are only needed to fill the cache.
require_mvn() { command -v mvn >/dev/null || apt_install maven; }
require_go() {
    command -v go >/dev/null && return
    if [[ -x /usr/local/go/bin/go ]]; then
        PATH="/usr/local/go/bin:$PATH"
    else
        apt_install golang-go
    fi
}

# Everything PostgreSQL runs as the `postgres` user when we are root (initdb refuses root).
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# ---------------------------------------------------------------------------------------
# caches: keyed by version, plus a hash of the recipe so an edited pom/go.mod rebuilds

recipe_hash() { cat "$@" | sha256sum | cut -c1-16; }

ensure_kafka_libs() {
    local dir="$CACHE_DIR/kafka-$KAFKA_VERSION" stamp hash tmp t0
    hash=$(recipe_hash "$SCRIPT_DIR/kafka/pom.xml")
    stamp="$dir/.recipe"
    if [[ -r $stamp && $(<"$stamp") == "$hash" && -d $dir/libs ]]; then
        return
    fi
    require_mvn
    t0=$(now_ms)
    log "kafka: fetching Kafka $KAFKA_VERSION jars from Maven Central into $dir"
    tmp="$dir.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    if ! mvn -B -q -f "$SCRIPT_DIR/kafka/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1; then
        tail -n 40 "$tmp/mvn.log" >&2
        rm -rf "$tmp"
        die "kafka: mvn dependency:copy-dependencies failed"
    fi
    echo "$hash" >"$tmp/.recipe"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    log "kafka: jars ready in $(since "$t0")"
}

ensure_immudb_bin() {
    local dir=$IMMUDB_BIN_DIR stamp hash tmp t0 cmd
    hash=$(recipe_hash "$SCRIPT_DIR/immudb/go.mod" "$SCRIPT_DIR/immudb/go.sum")
    stamp="$dir/.recipe"
    if [[ -r $stamp && $(<"$stamp") == "$hash" && -x $dir/immudb && -x $dir/immuadmin && -x $dir/immuclient ]]; then
        return
    fi
    require_go
    t0=$(now_ms)
    log "immudb: building immudb $IMMUDB_VERSION from the Go module proxy into $dir"
    tmp="$dir.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    for cmd in immudb immuadmin immuclient; do
        # -mod=readonly: the committed go.sum is the lock; a build must never rewrite it.
        # GOTOOLCHAIN=local: build with the installed Go, never download a toolchain.
        if ! (cd "$SCRIPT_DIR/immudb" && GOTOOLCHAIN=local go build -mod=readonly -trimpath -buildvcs=false \
            -ldflags "-s -w -X github.com/codenotary/immudb/cmd/version.Version=${IMMUDB_VERSION#v} -X github.com/codenotary/immudb/cmd/version.BuiltBy=audit-consumer/deploy/local" \
            -o "$tmp/$cmd" "github.com/codenotary/immudb/cmd/$cmd") >"$tmp/go-build.log" 2>&1; then
            tail -n 40 "$tmp/go-build.log" >&2
            rm -rf "$tmp"
            die "immudb: go build of cmd/$cmd failed"
        fi
    done
    echo "$hash" >"$tmp/.recipe"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    log "immudb: binaries ready in $(since "$t0")"
}

# Options that Keycloak bakes into its server image (Quarkus build-time options). The cache
# is pre-built with exactly these and every start passes exactly these, so a start never
# re-augments (that costs 20-40 s and would write into the shared cache). Editing this list
# changes the cache key: the next start rebuilds the cache.
KEYCLOAK_BUILD_OPTS=(--db=dev-file --health-enabled=true --http-management-health-enabled=false)

# JVM flags: a small heap, the serial collector and C1 only (tiered compilation stopped at
# level 1) roughly halve the start-up on 2 cores; a password-grant token still takes ~50 ms.
# They replace kc.sh's default JAVA_OPTS (G1, -Xmx512m), whose other defaults are repeated.
KEYCLOAK_JAVA_OPTS="-Xms64m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
-XX:MetaspaceSize=96M -XX:MaxMetaspaceSize=256m -XX:+ExitOnOutOfMemoryError \
-Dfile.encoding=UTF-8 -Dsun.stdout.encoding=UTF-8 -Dsun.err.encoding=UTF-8 \
-Djava.security.egd=file:/dev/urandom -Djava.awt.headless=true"

# kc.sh runs in a clean environment, `"${KC_ENV[@]}" kc.sh ...`: a caller's KC_* /
# QUARKUS_* / JAVA_OPTS* variables would otherwise silently reconfigure the server (or
# change its build options).
kc_env() { # home
    KC_ENV=(env -i PATH="$PATH" HOME="$HOME" LANG=C.UTF-8)
    [[ -z ${JAVA_HOME:-} ]] || KC_ENV+=(JAVA_HOME="$JAVA_HOME")
    KC_ENV+=(JAVA_OPTS="$KEYCLOAK_JAVA_OPTS -Djava.io.tmpdir=$1/tmp"
        KC_BOOTSTRAP_ADMIN_USERNAME="$KEYCLOAK_ADMIN_USERNAME"
        KC_BOOTSTRAP_ADMIN_PASSWORD="$KEYCLOAK_ADMIN_PASSWORD")
}

keycloak_dist_current() { # hash
    [[ -r ${KEYCLOAK_DIST%/dist}/.recipe && $(<"${KEYCLOAK_DIST%/dist}/.recipe") == "$1" && -x $KEYCLOAK_DIST/bin/kc.sh ]]
}

# Maven fetches the distribution; then one `kc.sh start-dev` pass with the build options
# above re-augments it for dev mode (kc.sh refuses `build` in dev mode) against a throw-away
# home, and stops before the server boots: after a re-augmentation kc.sh relaunches the JVM
# with -Dkc.config.built=true, and the `java` it is given for this pass exits 0 on that flag.
# The cache is shared by stacks in other AUDIT_STACK_DIRs, so installs take a cache lock.
ensure_keycloak_dist() {
    local dir=${KEYCLOAK_DIST%/dist} hash tmp t0 home
    hash=$({ cat "$SCRIPT_DIR/keycloak/pom.xml"; printf '%s\n' "${KEYCLOAK_BUILD_OPTS[@]}"; } | sha256sum | cut -c1-16)
    keycloak_dist_current "$hash" && return
    mkdir -p "$CACHE_DIR"
    exec 8>"$CACHE_DIR/keycloak.lock"
    flock -w 600 8 || die "keycloak: could not lock $CACHE_DIR/keycloak.lock within 600 s"
    if keycloak_dist_current "$hash"; then # another stack installed it meanwhile
        exec 8>&-
        return
    fi
    require_mvn
    t0=$(now_ms)
    log "keycloak: fetching Keycloak $KEYCLOAK_VERSION from Maven Central into $dir"
    tmp="$dir.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    # keycloak.markers: unpack's "already unpacked" markers go with this attempt, not into
    # deploy/local/keycloak/target (a stale marker there would make it skip the unpack).
    if ! mvn -B -q -f "$SCRIPT_DIR/keycloak/pom.xml" dependency:unpack \
        -DoutputDirectory="$tmp" -Dkeycloak.markers="$tmp/markers" >"$tmp/mvn.log" 2>&1 </dev/null; then
        tail -n 40 "$tmp/mvn.log" >&2
        rm -rf "$tmp"
        die "keycloak: mvn dependency:unpack failed"
    fi
    if [[ ! -x $tmp/keycloak-$KEYCLOAK_VERSION/bin/kc.sh ]]; then
        rm -rf "$tmp"
        die "keycloak: the archive has no keycloak-$KEYCLOAK_VERSION/bin/kc.sh"
    fi
    mv "$tmp/keycloak-$KEYCLOAK_VERSION" "$tmp/dist"
    log "keycloak: unpacked in $(since "$t0"); pre-building the dev-mode server image"
    home="$tmp/build-home"
    mkdir -p "$home/tmp"
    ln -s "$tmp/dist/lib" "$home/lib"
    cat >"$tmp/java-build-only" <<'EOF'
#!/bin/sh
# The JVM that kc.sh relaunches after a re-augmentation carries -Dkc.config.built=true:
# the build is done and no server is wanted.
for arg in "$@"; do
    [ "$arg" = -Dkc.config.built=true ] && exit 0
done
exec java "$@"
EOF
    chmod +x "$tmp/java-build-only"
    kc_env "$home"
    if ! "${KC_ENV[@]}" JAVA="$tmp/java-build-only" "$tmp/dist/bin/kc.sh" start-dev \
        "-Dkc.home.dir=$home" "${KEYCLOAK_BUILD_OPTS[@]}" >"$tmp/build.log" 2>&1 </dev/null 9>&- 8>&-; then
        tail -n 40 "$tmp/build.log" >&2
        rm -rf "$tmp"
        die "keycloak: pre-building the server image failed"
    fi
    if ! grep -q 'Quarkus augmentation completed' "$tmp/build.log"; then
        tail -n 40 "$tmp/build.log" >&2
        rm -rf "$tmp"
        die "keycloak: kc.sh start-dev did not re-augment the server image"
    fi
    rm -rf "$home" "$tmp/java-build-only" "$tmp/markers"
    echo "$hash" >"$tmp/.recipe"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    exec 8>&-
    log "keycloak: installed and pre-built in $(since "$t0")"
}

prepare_stack_dir() {
    if [[ -d $STACK_DIR && ! -e $STACK_DIR/$STACK_MARKER ]] && [[ -n $(ls -A "$STACK_DIR") ]]; then
        die "$STACK_DIR exists, is not empty and was not created by this script; set AUDIT_STACK_DIR"
    fi
    mkdir -p "$STACK_DIR"
    touch "$STACK_DIR/$STACK_MARKER"
    # The postgres user must be able to reach its own folder inside the stack dir.
    chmod 755 "$STACK_DIR"
}

# ---------------------------------------------------------------------------------------
# Kafka

KAFKA_TOOL_OPTS=(-Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto
    -Daudit.kafka.log.level=WARN)

kafka_java() { # main-class args... (tools: small heap, fast start-up, quiet logging)
    java "${KAFKA_TOOL_OPTS[@]}" -Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2.xml" \
        -cp "$KAFKA_LIBS/*" "$@"
}

kafka_write_config() {
    mkdir -p "$KAFKA_DIR/data"
    cat >"$KAFKA_DIR/server.properties" <<EOF
# Generated by deploy/local/stack.sh on every start; edits are lost.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$KAFKA_DIR/data

# One node: every internal topic has a single replica.
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
auto.create.topics.enable=true
delete.topic.enable=true
# Tests create many consumer groups; do not wait 3 s before the first rebalance.
group.initial.rebalance.delay.ms=0
# After a kill -9 the restarted broker cannot re-register until its previous session has
# expired (default 9 s); fault-injection tests restart it often.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000

# Small machine (2 cores): fewer threads, fewer internal partitions to load.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
offsets.topic.num.partitions=10
transaction.state.log.num.partitions=10
share.coordinator.state.topic.num.partitions=3
log.retention.hours=24
log.segment.bytes=67108864
EOF
    cat >"$KAFKA_DIR/tools.properties" <<EOF
request.timeout.ms=5000
default.api.timeout.ms=10000
EOF
}

kafka_launch() {
    kafka_write_config
    if [[ ! -e $KAFKA_DIR/data/meta.properties ]]; then
        local cluster_id
        # A KRaft cluster id is 16 random bytes, base64url without padding.
        cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
        log "kafka: formatting storage (cluster id $cluster_id)"
        kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_DIR/server.properties" \
            >>"$KAFKA_DIR/kafka.log" 2>&1 </dev/null 9>&- ||
            fail_with_log kafka "kafka-storage format failed"
    fi
    # setsid: the broker must survive the caller's Ctrl-C / process-group kill (cargo test).
    setsid java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
        -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2.xml" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_DIR/server.properties" \
        >>"$KAFKA_DIR/kafka.log" 2>&1 </dev/null 9>&- &
    echo $! >"$KAFKA_DIR/kafka.pid"
}

# The broker answers a metadata request (list topics) through Kafka's own admin tool.
# An open port is not enough: the socket opens before the broker has caught up with the
# controller and is unfenced.
kafka_probe() {
    port_open "$KAFKA_PORT" || { echo "port $KAFKA_PORT not open" >"$KAFKA_DIR/probe.log"; return 1; }
    timeout 30 java "${KAFKA_TOOL_OPTS[@]}" -Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2.xml" \
        -cp "$KAFKA_LIBS/*" org.apache.kafka.tools.TopicCommand \
        --bootstrap-server "$HOST:$KAFKA_PORT" --command-config "$KAFKA_DIR/tools.properties" \
        --list >"$KAFKA_DIR/probe.log" 2>&1 </dev/null 9>&-
}

# ---------------------------------------------------------------------------------------
# immudb

immudb_launch() {
    mkdir -p "$IMMUDB_DIR/data"
    # cwd = the stack folder: immudb and immuadmin read ./configs/*.toml if present.
    # No --synced=false: durability stays on. Only the gRPC port is opened.
    (cd "$IMMUDB_DIR" && exec setsid "$IMMUDB_BIN_DIR/immudb" --dir "$IMMUDB_DIR/data" \
        --address "$HOST" --port "$IMMUDB_PORT" \
        --pgsql-server=false --metrics-server=false --web-server=false \
        --admin-password "$IMMUDB_PASSWORD" --force-admin-password \
        --max-sessions 1000 \
        >>"$IMMUDB_DIR/immudb.log" 2>&1 </dev/null 9>&-) &
    echo $! >"$IMMUDB_DIR/immudb.pid"
}

immuadmin() {
    (cd "$IMMUDB_DIR" && HOME="$IMMUDB_DIR" "$IMMUDB_BIN_DIR/immuadmin" \
        --immudb-address "$HOST" --immudb-port "$IMMUDB_PORT" \
        --tokenfile "$IMMUDB_DIR/immuadmin-token" "$@" </dev/null 9>&-)
}

# gRPC health (`immuadmin status` = Health + ServerInfo).
immudb_probe() {
    port_open "$IMMUDB_PORT" || { echo "port $IMMUDB_PORT not open" >"$IMMUDB_DIR/probe.log"; return 1; }
    immuadmin status >"$IMMUDB_DIR/probe.log" 2>&1
}

# Once ready: the configured credentials really log in (the password is read from stdin,
# no trailing newline).
immudb_after_ready() {
    if ! (cd "$IMMUDB_DIR" && printf '%s' "$IMMUDB_PASSWORD" | HOME="$IMMUDB_DIR" \
        "$IMMUDB_BIN_DIR/immuadmin" --immudb-address "$HOST" --immudb-port "$IMMUDB_PORT" \
        --tokenfile "$IMMUDB_DIR/immuadmin-token" login "$IMMUDB_USERNAME" 9>&-) \
        >"$IMMUDB_DIR/probe.log" 2>&1; then
        cat "$IMMUDB_DIR/probe.log" >&2
        fail_with_log immudb "login as $IMMUDB_USERNAME failed"
    fi
    immuadmin logout >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------------------------------
# PostgreSQL

pg_init() {
    [[ -e $PG_DATA/PG_VERSION ]] && return
    log "postgres: initdb ($PG_BIN)"
    mkdir -p "$PG_DIR"
    [[ $EUID -ne 0 ]] || chown postgres: "$PG_DIR"
    if [[ $EUID -eq 0 ]] && ! runuser -u postgres -- test -w "$PG_DIR"; then
        die "postgres: the postgres user cannot write $PG_DIR (a parent directory is not traversable?); set AUDIT_STACK_DIR"
    fi
    local pwfile="$PG_DIR/.pwfile"
    (umask 077 && printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile")
    [[ $EUID -ne 0 ]] || chown postgres: "$pwfile"
    if ! (cd "$PG_DIR" && as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U "$POSTGRES_USERNAME" \
        --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --no-locale) >"$PG_DIR/initdb.log" 2>&1; then
        rm -f "$pwfile"
        cat "$PG_DIR/initdb.log" >&2
        die "postgres: initdb failed"
    fi
    rm -f "$pwfile"
    cat >>"$PG_DATA/postgresql.conf" <<'EOF'

# ---- deploy/local/stack.sh ----
max_connections = 200            # integration tests run in parallel
shared_buffers = 128MB
fsync = on                       # durability stays on: the tests kill -9 servers
synchronous_commit = on
full_page_writes = on
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
include_if_exists = 'stack.conf' # address, port and socket; rewritten on every start
EOF
}

pg_launch() {
    pg_init
    # After a SIGKILL the dead postmaster can linger as a zombie until init reaps it, and
    # PostgreSQL then refuses to start because that pid still "exists". begin_start has
    # established that no postmaster serves this data dir, so such lock files are stale.
    local lock old
    for lock in "$PG_DATA/postmaster.pid" "$PG_SOCKET_DIR/.s.PGSQL.$POSTGRES_PORT.lock"; do
        if { read -r old <"$lock"; } 2>/dev/null && ! pid_alive "$old"; then
            rm -f "$lock"
        fi
    done
    mkdir -p "$PG_SOCKET_DIR"
    touch "$PG_DIR/postgres.log"
    [[ $EUID -ne 0 ]] || chown postgres: "$PG_SOCKET_DIR" "$PG_DIR" "$PG_DIR/postgres.log"
    cat >"$PG_DATA/stack.conf" <<EOF
listen_addresses = '$HOST'
port = $POSTGRES_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
EOF
    [[ $EUID -ne 0 ]] || chown postgres: "$PG_DATA/stack.conf"
    # pg_ctl starts the postmaster in its own session with stdin from /dev/null and
    # output to the log; -W: the readiness loop below does the waiting.
    # shellcheck disable=SC2094 # pg_ctl and this redirect both only append to the log
    (cd "$PG_DIR" && as_pg "$PG_BIN/pg_ctl" start -W -D "$PG_DATA" -l "$PG_DIR/postgres.log" 9>&-) \
        >/dev/null 2>>"$PG_DIR/postgres.log" </dev/null ||
        fail_with_log postgres "pg_ctl start failed"
}

pg_psql() { # db sql
    PGPASSWORD=$POSTGRES_PASSWORD PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 \
        -h "$HOST" -p "$POSTGRES_PORT" -U "$POSTGRES_USERNAME" -d "$1" -Atc "$2" </dev/null 9>&-
}

pg_probe() {
    "$PG_BIN/pg_isready" -q -h "$HOST" -p "$POSTGRES_PORT" -U "$POSTGRES_USERNAME" -d postgres -t 2 \
        </dev/null 9>&- || return 1
    [[ $(pg_psql postgres 'select 1' 2>"$PG_DIR/probe.log") == 1 ]]
}

pg_after_ready() {
    if [[ -z $(pg_psql postgres "select 1 from pg_database where datname = '$POSTGRES_DATABASE'") ]]; then
        log "postgres: creating database $POSTGRES_DATABASE"
        pg_psql postgres "create database \"$POSTGRES_DATABASE\"" >/dev/null
    fi
    [[ $(pg_psql "$POSTGRES_DATABASE" 'select 1') == 1 ]] ||
        fail_with_log postgres "cannot query database $POSTGRES_DATABASE"
}

# ---------------------------------------------------------------------------------------
# Keycloak (dev mode: H2 file database in the stack dir, realm imported from the repo)

keycloak_launch() {
    mkdir -p "$KEYCLOAK_HOME/data/import" "$KEYCLOAK_HOME/tmp"
    # kc.home.dir is this stack's folder, so data/ (H2 database, import folder, transaction
    # log) is per stack; lib/ points into the cache, where Keycloak finds its server image
    # and the build options it was made with.
    ln -sfn "$KEYCLOAK_DIST/lib" "$KEYCLOAK_HOME/lib"
    # --import-realm imports every file in data/import whose realm does not exist yet
    # (strategy IGNORE_EXISTING): the first start creates realm `audit`, later starts keep
    # the database as it is (users and keys that tests added stay until `down`).
    cp "$SCRIPT_DIR/keycloak/realm-audit.json" "$KEYCLOAK_HOME/data/import/realm-audit.json"
    # setsid: survive the caller's Ctrl-C / process-group kill. kc.sh stays the parent of
    # the JVM and forwards SIGTERM to it; its pid is the one recorded.
    # --hostname: every URL Keycloak issues (and so `iss`) is KEYCLOAK_URL, whatever Host
    # header a client sends. Health endpoints on the main port, so no management port
    # (9000) is opened. Nothing in this configuration reaches out to the network (no update
    # check, no theme or extension download); Narayana's transaction-recovery listener
    # takes an ephemeral port, bound to the loopback address like the rest.
    kc_env "$KEYCLOAK_HOME"
    (cd "$KEYCLOAK_DIR" && exec setsid "${KC_ENV[@]}" \
        "$KEYCLOAK_DIST/bin/kc.sh" start-dev "-Dkc.home.dir=$KEYCLOAK_HOME" \
        "${KEYCLOAK_BUILD_OPTS[@]}" \
        --http-host="$HOST" --http-port="$KEYCLOAK_PORT" --hostname="$KEYCLOAK_URL" \
        --import-realm \
        >>"$KEYCLOAK_DIR/keycloak.log" 2>&1 </dev/null 9>&-) &
    echo $! >"$KEYCLOAK_DIR/keycloak.pid"
}

# Ready when realm `audit` serves its discovery document and names the expected issuer
# (the realm is imported before the HTTP port opens, so this also proves the import).
keycloak_probe() {
    local doc="$KEYCLOAK_DIR/discovery.json"
    port_open "$KEYCLOAK_PORT" || { echo "port $KEYCLOAK_PORT not open" >"$KEYCLOAK_DIR/probe.log"; return 1; }
    curl -sS --fail --max-time 5 -o "$doc" "$KEYCLOAK_ISSUER/.well-known/openid-configuration" \
        >"$KEYCLOAK_DIR/probe.log" 2>&1 </dev/null || return 1
    grep -q "\"issuer\":\"$KEYCLOAK_ISSUER\"" "$doc" || {
        echo "discovery document does not name issuer $KEYCLOAK_ISSUER" >"$KEYCLOAK_DIR/probe.log"
        return 1
    }
}

# After a fresh start: a demo user really gets a token with the demo password (catches a
# realm file and this script drifting apart).
keycloak_after_ready() {
    ((${STARTED_AT[keycloak]:-0} > 0)) || return 0
    if ! curl -sS --fail --max-time 10 "$KEYCLOAK_ISSUER/protocol/openid-connect/token" \
        -d grant_type=password -d client_id=audit-cli -d username=alice \
        --data-urlencode "password=$KEYCLOAK_DEMO_PASSWORD" </dev/null 2>&1 |
        grep -q '"access_token"'; then
        fail_with_log keycloak "demo user alice cannot get a token from client audit-cli"
    fi
}

# ---------------------------------------------------------------------------------------
# generic lifecycle

launch() {
    case $1 in
        kafka) kafka_launch ;;
        immudb) immudb_launch ;;
        postgres) pg_launch ;;
        keycloak) keycloak_launch ;;
    esac
}

probe() {
    case $1 in
        kafka) kafka_probe ;;
        immudb) immudb_probe ;;
        postgres) pg_probe ;;
        keycloak) keycloak_probe ;;
    esac
}

after_ready() {
    case $1 in
        kafka) ;;
        immudb) immudb_after_ready ;;
        postgres) pg_after_ready ;;
        keycloak) keycloak_after_ready ;;
    esac
}

ensure_installed() {
    case $1 in
        kafka) ensure_kafka_libs ;;
        immudb) ensure_immudb_bin ;;
        postgres) ;;
        keycloak) ensure_keycloak_dist ;;
    esac
}

# Launch time of each server started by this invocation (0: it was already running).
declare -A STARTED_AT=()

# Starts a server unless it is already there; does not wait.
begin_start() {
    local svc=$1 port
    STARTED_AT[$svc]=0
    [[ -z $(service_pid "$svc") ]] || return 0
    port=$(port_of "$svc")
    if port_open "$port"; then
        die "$svc: port $HOST:$port is already taken by another process (not ours); stop it or set AUDIT_${svc^^}_PORT"
    fi
    if [[ $svc == kafka ]] && port_open "$KAFKA_CONTROLLER_PORT"; then
        die "kafka: controller port $HOST:$KAFKA_CONTROLLER_PORT is already taken by another process"
    fi
    log "$svc: starting on $(address_of "$svc")"
    rm -f "$STACK_DIR/$svc/probe.log"
    STARTED_AT[$svc]=$(now_ms)
    launch "$svc"
}

# Polls all the given servers in turn, so each one's reported time is its own.
wait_ready() { # service...
    local pending=("$@") still svc pid t0 deadline timeout
    t0=$(now_ms)
    while ((${#pending[@]} > 0)); do
        still=()
        for svc in "${pending[@]}"; do
            pid=$(service_pid "$svc")
            if [[ -z $pid ]]; then
                if pid_alive "$(raw_pid "$svc")"; then
                    : # just launched: not yet exec'd into the server
                elif [[ $svc != postgres ]] || (($(now_ms) > t0 + 10000)); then
                    # (postmaster.pid appears a moment after pg_ctl returns)
                    fail_with_log "$svc" "the server exited during start-up"
                fi
            elif probe "$svc"; then
                after_ready "$svc"
                if ((STARTED_AT[$svc] > 0)); then
                    log "$svc: ready on $(address_of "$svc") in $(since "${STARTED_AT[$svc]}") (pid $pid)"
                else
                    log "$svc: already running on $(address_of "$svc") (pid $pid)"
                fi
                continue
            fi
            timeout=$(ready_timeout_of "$svc")
            deadline=$((t0 + timeout * 1000))
            if (($(now_ms) > deadline)); then
                if [[ -s $STACK_DIR/$svc/probe.log ]]; then
                    log "$svc: last readiness probe said:"
                    tail -n 5 "$STACK_DIR/$svc/probe.log" >&2
                fi
                fail_with_log "$svc" "not answering after ${timeout}s (pid ${pid:-none})"
            fi
            still+=("$svc")
        done
        pending=("${still[@]}")
        ((${#pending[@]} == 0)) || sleep 0.3
    done
}

stop_service() { # service [kill]
    local svc=$1 mode=${2:-graceful} pid sig=TERM
    pid=$(service_pid "$svc")
    if [[ -z $pid ]]; then
        log "$svc: not running"
        return
    fi
    if [[ $mode == kill ]]; then
        log "$svc: SIGKILL pid $pid"
        kill_tree "$pid"
    else
        # PostgreSQL: SIGTERM is its "smart" shutdown, which waits for every client to
        # disconnect; SIGINT is the fast shutdown (clients cut, clean checkpoint).
        [[ $svc == postgres ]] && sig=INT
        log "$svc: SIG$sig pid $pid"
        kill -"$sig" "$pid" 2>/dev/null || true
        if ! wait_gone "$pid" "$STOP_GRACE"; then
            log "$svc: still alive after ${STOP_GRACE}s, SIGKILL"
            kill_tree "$pid"
        fi
    fi
    wait_gone "$pid" 10 || die "$svc: pid $pid survived SIGKILL"
    case $svc in
        kafka) rm -f "$KAFKA_DIR/kafka.pid" ;;
        immudb) rm -f "$IMMUDB_DIR/immudb.pid" ;;
        keycloak) rm -f "$KEYCLOAK_DIR/keycloak.pid" ;;
        postgres) ;; # postmaster.pid is handled by PostgreSQL itself, even after SIGKILL
    esac
    log "$svc: stopped"
}

# ---------------------------------------------------------------------------------------
# commands

# The optional servers `up` starts too: `--with NAME[,NAME]` (repeatable) and
# AUDIT_STACK_WITH (comma- or space-separated).
WITH=()
parse_with() {
    local words=${AUDIT_STACK_WITH:-} name
    while (($# > 0)); do
        case $1 in
            --with) (($# >= 2)) || die "--with needs a server name (keycloak)"; words+=" $2"; shift 2 ;;
            --with=*) words+=" ${1#--with=}"; shift ;;
            *) die "up: unexpected argument '$1' (expected --with keycloak)" ;;
        esac
    done
    for name in ${words//,/ }; do
        case $name in
            keycloak) [[ " ${WITH[*]} " == *" $name "* ]] || WITH+=("$name") ;;
            *) die "up: '$name' is not an optional server (keycloak)" ;;
        esac
    done
}

cmd_up() {
    local t_all t0 svc
    parse_with "$@"
    t_all=$(now_ms)
    take_lock
    t0=$(now_ms)
    ensure_tools
    ensure_kafka_libs
    ensure_immudb_bin
    for svc in ${WITH[@]+"${WITH[@]}"}; do
        ensure_tools_for "$svc"
        [[ -n $(service_pid "$svc") ]] || ensure_installed "$svc"
    done
    log "prerequisites ready in $(since "$t0") (Kafka $KAFKA_VERSION, immudb $IMMUDB_VERSION, PostgreSQL $(basename "$(dirname "$PG_BIN")")${WITH[*]:+, Keycloak $KEYCLOAK_VERSION})"
    prepare_stack_dir
    # Launch them all first, then wait: start-ups overlap.
    for svc in "${SERVICES[@]}" ${WITH[@]+"${WITH[@]}"}; do
        begin_start "$svc"
    done
    wait_ready "${SERVICES[@]}" ${WITH[@]+"${WITH[@]}"}
    log "stack up in $(since "$t_all") (data in $STACK_DIR)"
}

# Install if needed, start if not running, wait until each answers. Idempotent; parallel
# callers are serialised by the stack lock, and a server that is already up costs one probe.
cmd_ensure() {
    local svc
    (($# > 0)) || die "ensure: name the servers (kafka|immudb|postgres|keycloak)"
    for svc in "$@"; do
        need_service "$svc"
    done
    take_lock
    ensure_tools_for "$@"
    for svc in "$@"; do
        # Not under a running server: a changed recipe would replace the files it runs from.
        [[ -n $(service_pid "$svc") ]] || ensure_installed "$svc"
    done
    prepare_stack_dir
    for svc in "$@"; do
        begin_start "$svc"
    done
    wait_ready "$@"
}

cmd_start() {
    need_service "$1"
    cmd_ensure "$1"
}

cmd_stop() {
    need_service "$1"
    take_lock
    stop_service "$1" "${2:-graceful}"
}

cmd_restart() {
    need_service "$1"
    cmd_stop "$1"
    cmd_start "$1"
}

cmd_down() {
    local svc
    take_lock
    for svc in "${OPTIONAL_SERVICES[@]}" "${SERVICES[@]}"; do
        stop_service "$svc"
    done
    if [[ -d $STACK_DIR ]]; then
        [[ -e $STACK_DIR/$STACK_MARKER ]] || die "$STACK_DIR lacks $STACK_MARKER; not deleting it"
        rm -rf -- "$STACK_DIR"
        log "deleted $STACK_DIR"
    fi
}

# Exit 3 when a core server is not running; an optional one (Keycloak) is listed, with
# "(optional)" when stopped, and never changes the exit code.
cmd_status() {
    local svc pid all=0 core note
    for svc in "${SERVICES[@]}" "${OPTIONAL_SERVICES[@]}"; do
        core=1 note=''
        [[ " ${OPTIONAL_SERVICES[*]} " != *" $svc "* ]] || { core=''; note=' (optional)'; }
        pid=$(service_pid "$svc")
        if [[ -n $pid ]]; then
            if port_open "$(port_of "$svc")"; then
                printf '%-8s running  %s pid %s\n' "$svc" "$(address_of "$svc")" "$pid"
            else
                printf '%-8s starting %s pid %s (port not open yet)\n' "$svc" "$(address_of "$svc")" "$pid"
                [[ -z $core ]] || all=3
            fi
        else
            printf '%-8s stopped  %s%s\n' "$svc" "$(address_of "$svc")" "$note"
            [[ -z $core ]] || all=3
        fi
    done
    return "$all"
}

cmd_env() {
    local name
    for name in \
        "KAFKA_BROKERS=$HOST:$KAFKA_PORT" \
        "IMMUDB_HOST=$HOST" \
        "IMMUDB_PORT=$IMMUDB_PORT" \
        "IMMUDB_USERNAME=$IMMUDB_USERNAME" \
        "IMMUDB_PASSWORD=$IMMUDB_PASSWORD" \
        "IMMUDB_DATABASE=$IMMUDB_DATABASE" \
        "POSTGRES_HOST=$HOST" \
        "POSTGRES_PORT=$POSTGRES_PORT" \
        "POSTGRES_DATABASE=$POSTGRES_DATABASE" \
        "POSTGRES_USERNAME=$POSTGRES_USERNAME" \
        "POSTGRES_PASSWORD=$POSTGRES_PASSWORD" \
        "KEYCLOAK_URL=$KEYCLOAK_URL" \
        "KEYCLOAK_REALM=$KEYCLOAK_REALM" \
        "KEYCLOAK_ISSUER=$KEYCLOAK_ISSUER" \
        "KEYCLOAK_AUDIENCE=audit-api" \
        "KEYCLOAK_CONSOLE_CLIENT_ID=audit-console" \
        "KEYCLOAK_CLI_CLIENT_ID=audit-cli" \
        "KEYCLOAK_ADMIN_USERNAME=$KEYCLOAK_ADMIN_USERNAME" \
        "KEYCLOAK_ADMIN_PASSWORD=$KEYCLOAK_ADMIN_PASSWORD" \
        "KEYCLOAK_DEMO_USERS=alice ivan rita nora" \
        "KEYCLOAK_DEMO_PASSWORD=$KEYCLOAK_DEMO_PASSWORD" \
        "AUDIT_STACK_SCRIPT=$SCRIPT_PATH" \
        "AUDIT_STACK_DIR=$STACK_DIR"; do
        printf 'export %s=%q\n' "${name%%=*}" "${name#*=}"
    done
}

cmd_logs() {
    local file
    need_service "$1"
    file=$(log_file "$1")
    [[ -r $file ]] || die "$1: no log at $file"
    tail -n "${2:-100}" "$file"
}

cmd_kafka_topics() {
    [[ -d $KAFKA_LIBS ]] || die "kafka: jars not installed yet; run: $SCRIPT_PATH up"
    local arg
    for arg in "$@"; do
        [[ $arg == --bootstrap-server* ]] && { kafka_java org.apache.kafka.tools.TopicCommand "$@"; return; }
    done
    kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$KAFKA_PORT" "$@"
}

cmd_immuclient() {
    [[ -x $IMMUDB_BIN_DIR/immuclient ]] || die "immudb: binaries not built yet; run: $SCRIPT_PATH up"
    mkdir -p "$IMMUDB_DIR"
    # HOME: immuclient keeps its verification state (last verified tx) in ~/.state-*.
    (cd "$IMMUDB_DIR" && HOME="$IMMUDB_DIR" exec "$IMMUDB_BIN_DIR/immuclient" "$@" \
        --immudb-address "$HOST" --immudb-port "$IMMUDB_PORT" --username "$IMMUDB_USERNAME" \
        --password "$IMMUDB_PASSWORD" --database "$IMMUDB_DATABASE")
}

usage() {
    sed -n '2,/^set -euo/p' "$SCRIPT_PATH" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
        up) cmd_up "$@" ;;
        down) cmd_down ;;
        status) cmd_status ;;
        env) cmd_env ;;
        ensure) cmd_ensure "$@" ;;
        start) cmd_start "${1:-}" ;;
        stop) cmd_stop "${1:-}" ;;
        kill) cmd_stop "${1:-}" kill ;;
        restart) cmd_restart "${1:-}" ;;
        logs) cmd_logs "${1:-}" "${2:-100}" ;;
        kafka-topics) cmd_kafka_topics "$@" ;;
        immuclient) cmd_immuclient "$@" ;;
        -h | --help | help | '') usage ;;
        *) log "unknown command '$cmd'"; usage ;;
    esac
}

main "$@"
