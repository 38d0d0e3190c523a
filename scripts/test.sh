#!/usr/bin/env bash
# The README's test command (and CI's): install what is missing, start the real local stack,
# check formatting and lints, run every test against the real servers, and stop the stack again
# if this script started it (also on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
log() { printf '[test] %s\n' "$*"; }

bash scripts/prerequisites.sh

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
