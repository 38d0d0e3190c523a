#!/usr/bin/env bash
# The main job end to end on the local stack: servers up, schema migrated, the daemon started,
# a sample corpus produced (10,000 valid events over four topics, invalid ones and a conflicting
# duplicate), and a summary of what landed in immudb, PostgreSQL and the DLQ.
# Every run uses its own topics, group, immudb database and PG schema, so it can be repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
events=${DEMO_EVENTS:-10000}

bash scripts/prerequisites.sh # protoc, cc, libssl-dev, psql, ... before the first build
bash deploy/local/stack.sh up
eval "$(bash deploy/local/stack.sh env)"

echo "[demo] building (release)"
cargo build --release --locked --bins
bin=${CARGO_TARGET_DIR:-target}/release

run=demo$(date +%s)
export KAFKA_TOPICS="$run.audit.plant-lifecycle.v1,$run.audit.financial.v1,$run.audit.user-actions.v1,$run.audit.system.v1"
export KAFKA_DLQ_TOPIC="$run.audit.dlq.v1" KAFKA_GROUP_ID="$run-gacp-audit-trail-consumer"
export IMMUDB_DATABASE=$run IMMUDB_CREATE_DATABASE=true POSTGRES_SCHEMA=$run POSTGRES_SSL_MODE=disable
export HEALTH_PORT=0 METRICS_PORT=0 LOG_FORMAT=json INSTANCE_ID=demo-1

echo "[demo] migrating schema $run (as the PostgreSQL superuser)"
$bin/audit-consumer migrate
# The daemon itself runs as a login that holds only audit_writer's INSERT and SELECT.
writer=${run}_writer
PGPASSWORD=$POSTGRES_PASSWORD psql -qX -h "$POSTGRES_HOST" -p "$POSTGRES_PORT" -U "$POSTGRES_USERNAME" -d "$POSTGRES_DATABASE" \
  -c "CREATE ROLE \"$writer\" LOGIN PASSWORD 'demo-writer' IN ROLE audit_writer"

log=target/$run.log
echo "[demo] starting the daemon (log: $log)"
POSTGRES_USERNAME=$writer POSTGRES_PASSWORD=demo-writer $bin/audit-consumer run >"$log" 2>&1 &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null || true' EXIT

$bin/audit-loadgen --events "$events" --partitions 3

kill -TERM $daemon
wait $daemon && echo "[demo] daemon drained and exited 0 on SIGTERM"
trap - EXIT
echo "[demo] batches: $(grep -c '"batch done"' "$log"), see $log"
