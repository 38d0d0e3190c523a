#!/usr/bin/env bash
# The README's test command (and CI's): install what is missing, check the supply chain (cargo
# deny, offline), start the real local stack, check formatting and lints, run every test against
# the real servers, and stop the stack again if this script started it (also on failure).
# `scripts/test.sh --supply-chain` (make deny) stops after the cargo deny step.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
log() { printf '[test] %s\n' "$*"; }

bash scripts/prerequisites.sh
cache=$HOME/.cache/audit-consumer # as in scripts/prerequisites.sh and deny.toml
export PATH=$cache/bin:$PATH      # the pinned cargo-deny

# The advisory database for `cargo deny`: the dated, read-only RustSec copy that comes next to
# every checkout and CI run (../shared/advisory-db; AUDIT_CONSUMER_ADVISORY_DB overrides it).
# cargo-deny opens a git checkout under deny.toml's db-path, so the copy becomes one there, in a
# commit dated as the copy is (its age is then checked against deny.toml's maximum-db-staleness);
# it is rebuilt only when the copy's contents change.
advisory_db() {
  # The checkout's parent as the caller sees it ($PWD, not a symlink's target).
  local src=${AUDIT_CONSUMER_ADVISORY_DB:-$(dirname "$PWD")/shared/advisory-db}
  [[ -d $src/crates ]] || {
    echo "no advisory database at $src (expected the RustSec layout crates/<crate>/RUSTSEC-*.md next to the checkout, in ../shared/advisory-db; or set AUDIT_CONSUMER_ADVISORY_DB)" >&2
    return 1
  }
  src=$(cd "$src" && pwd -P)
  local dated
  dated=$(grep -oE '\([0-9]{4}-[0-9]{2}-[0-9]{2}\)' "$src/README.md" 2>/dev/null | head -1 | tr -d '()') || true
  # Without a dated README, the newest advisory's date (the copy is at least that recent).
  [[ -n $dated ]] || dated=$(grep -rhoE '^date = "[0-9]{4}-[0-9]{2}-[0-9]{2}"' "$src/crates" | sort | tail -1 | grep -oE '[0-9-]{10}')
  [[ $dated =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]] || { echo "cannot tell the date of the advisory database at $src" >&2; return 1; }
  local root=$cache/advisory-dbs
  # The directory name cargo-deny 0.20 derives from its default URL, https://github.com/rustsec/advisory-db.
  local dest=$root/advisory-db-3157b0e258782691
  local sum
  sum=$(cd "$src" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
  if [[ $(cat "$dest/.git/audit-consumer-source" 2>/dev/null) != "$sum" ]]; then
    mkdir -p "$root"
    local tmp
    tmp=$(mktemp -d "$root/.new.XXXXXX")
    cp -R "$src/." "$tmp"
    chmod -R u+w "$tmp"
    git -C "$tmp" init -q
    git -C "$tmp" add -A
    GIT_AUTHOR_DATE="${dated}T00:00:00Z" GIT_COMMITTER_DATE="${dated}T00:00:00Z" \
      git -C "$tmp" -c user.name=audit-consumer -c user.email=audit-consumer@localhost -c commit.gpgsign=false \
      commit -q --no-verify -m "RustSec advisory-db copy of $dated, from $src"
    touch -d "${dated}T00:00:00Z" "$tmp/.git/HEAD" # cargo-deny takes the newer of HEAD's commit date and mtime
    echo "$sum" >"$tmp/.git/audit-consumer-source"
    rm -rf "$dest"
    mv -T "$tmp" "$dest"
  fi
  log "advisory database: RustSec copy of $dated ($((($(date +%s) - $(date -d "$dated" +%s)) / 86400)) days old; advisories published since are not checked)"
}

log "cargo deny: advisories, licenses, bans, sources (offline)"
advisory_db
cargo fetch --locked --quiet # the crates' manifests and license files, which the build downloads anyway
cargo deny --offline --locked check
[[ ${1-} != --supply-chain ]] || exit 0

if bash deploy/local/stack.sh status >/dev/null 2>&1; then
  log "using the running local stack"
else
  log "starting the local stack"
  trap 'log "stopping the local stack"; bash deploy/local/stack.sh down || true' EXIT
  bash deploy/local/stack.sh up
fi
eval "$(bash deploy/local/stack.sh env)"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings
log "cargo test"
cargo test --locked --all-targets
log "deployment artifacts: kustomize, Kubernetes schemas, alert rules and their tests, dashboard, live /metrics scrape"
bash scripts/validate-deploy.sh --scrape="${CARGO_TARGET_DIR:-target}/tmp/metrics-scrape.txt"
log "the Dockerfile's build step, outside Docker"
cargo build --release --locked --bin audit-consumer
for path in migrations config/default.toml; do
  [[ -e $path ]] || { echo "Dockerfile copies $path, which is missing" >&2; exit 1; }
done
log "done in $(($(date +%s) - started))s"
