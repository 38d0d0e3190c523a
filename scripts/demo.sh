#!/usr/bin/env bash
# The main job end to end on the local stack: servers up (and the identity provider), schema
# migrated, the daemon started, a sample corpus produced (10,000 valid events over four topics,
# invalid ones and a conflicting duplicate), a summary of what landed in immudb, PostgreSQL and
# the DLQ; then the read side (`audit-consumer serve`) on the same stores, queried with a token
# of the local identity provider, and left running with the daemon for you to try.
# Every run uses its own topics, group, immudb database and PG schema, so it can be repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
events=${DEMO_EVENTS:-10000}
api_port=${DEMO_API_PORT:-18090}

bash scripts/prerequisites.sh # protoc, cc, libssl-dev, psql, jq, ... before the first build
bash deploy/local/stack.sh up
bash deploy/local/stack.sh ensure keycloak
eval "$(bash deploy/local/stack.sh env)"

echo "[demo] building (release)"
cargo build --release --locked --bins
bin=${CARGO_TARGET_DIR:-target}/release
state=target/demo
mkdir -p "$state"
# A previous demo left its daemon and API running: stop them first.
for pid_file in "$state"/*.pid; do
  [[ -e $pid_file ]] || continue
  kill -TERM "$(<"$pid_file")" 2>/dev/null || true
  rm -f "$pid_file"
done

run=demo$(date +%s)
sources="$run.audit.plant-lifecycle.v1,$run.audit.financial.v1,$run.audit.user-actions.v1,$run.audit.system.v1"
access="$run.audit.access.v1"
export KAFKA_DLQ_TOPIC="$run.audit.dlq.v1" KAFKA_GROUP_ID="$run-gacp-audit-trail-consumer"
export IMMUDB_DATABASE=$run IMMUDB_CREATE_DATABASE=true POSTGRES_SCHEMA=$run POSTGRES_SSL_MODE=disable
export HEALTH_PORT=0 METRICS_PORT=0 LOG_FORMAT=json INSTANCE_ID=demo-1

echo "[demo] migrating schema $run (as the PostgreSQL superuser)"
KAFKA_TOPICS=$sources $bin/audit-consumer migrate
# The daemon runs as a login that holds only audit_writer's INSERT and SELECT, the API as one
# that holds only audit_reader's SELECT.
writer=${run}_writer reader=${run}_reader
PGPASSWORD=$POSTGRES_PASSWORD psql -qX -h "$POSTGRES_HOST" -p "$POSTGRES_PORT" -U "$POSTGRES_USERNAME" -d "$POSTGRES_DATABASE" \
  -c "CREATE ROLE \"$writer\" LOGIN PASSWORD 'demo-writer' IN ROLE audit_writer" \
  -c "CREATE ROLE \"$reader\" LOGIN PASSWORD 'demo-reader' IN ROLE audit_reader"
# The access topic exists before the daemon subscribes, so it consumes the reads at once.
bash deploy/local/stack.sh kafka-topics --create --topic "$access" --partitions 1 >/dev/null

log=$state/$run-daemon.log
echo "[demo] starting the daemon (log: $log)"
KAFKA_TOPICS="$sources,$access" POSTGRES_USERNAME=$writer POSTGRES_PASSWORD=demo-writer \
  $bin/audit-consumer run >"$log" 2>&1 &
daemon=$!
echo $daemon >"$state/daemon.pid"
trap 'kill -TERM $daemon 2>/dev/null || true' EXIT

KAFKA_TOPICS=$sources $bin/audit-loadgen --events "$events" --partitions 3
echo "[demo] batches so far: $(grep -c '"batch done"' "$log")"

api_log=$state/$run-api.log
echo "[demo] starting the read API on http://127.0.0.1:$api_port (log: $api_log)"
# The demo's API reads immudb with the stack's admin login for brevity; deploy it with a
# read-only immudb user (deploy/k8s, tests/api.rs) — it only reads.
KAFKA_TOPICS="$sources,$access" API_ACCESS_TOPIC=$access API_PORT=$api_port API_BIND_ADDRESS=127.0.0.1 \
  API_CURSOR_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n') OIDC_ISSUER=$KEYCLOAK_ISSUER \
  POSTGRES_USERNAME=$reader POSTGRES_PASSWORD=demo-reader INSTANCE_ID=demo-api \
  $bin/audit-consumer serve >"$api_log" 2>&1 &
api=$!
echo $api >"$state/api.pid"
for _ in $(seq 1 120); do
  curl -fs "http://127.0.0.1:$api_port/ready" >/dev/null && break
  kill -0 $api 2>/dev/null || { tail -n 20 "$api_log"; exit 1; }
  sleep 0.5
done
curl -fs "http://127.0.0.1:$api_port/ready" >/dev/null || { echo "[demo] the API is not ready:"; tail -n 20 "$api_log"; exit 1; }

token_cmd="curl -s $KEYCLOAK_URL/realms/$KEYCLOAK_REALM/protocol/openid-connect/token -d grant_type=password -d client_id=$KEYCLOAK_CLI_CLIENT_ID -d username=alice -d password=$KEYCLOAK_DEMO_PASSWORD | jq -r .access_token"
TOKEN=$(eval "$token_cmd")
api_url=http://127.0.0.1:$api_port/api/v1
echo "[demo] as alice (role auditor): the three newest events of entity type plant"
curl -fs -H "Authorization: Bearer $TOKEN" "$api_url/events?entity_type=plant&limit=3" |
  jq -c '.events[] | {event_id, event_timestamp, entity_id, action, user_id, immudb_tx}'
first=$(curl -fs -H "Authorization: Bearer $TOKEN" "$api_url/events?entity_type=plant&limit=1" | jq -r '.events[0].event_id')
echo "[demo] that event proven now against the trusted state:"
curl -fs -H "Authorization: Bearer $TOKEN" "$api_url/events/$first?verify=true" | jq -r '.verification.statement'
echo "[demo] every read above is itself an audit event; the daemon stored them:"
for _ in $(seq 1 40); do
  reads=$(PGPASSWORD=$POSTGRES_PASSWORD psql -qAtX -h "$POSTGRES_HOST" -p "$POSTGRES_PORT" -U "$POSTGRES_USERNAME" -d "$POSTGRES_DATABASE" \
    -c "SELECT count(*) FROM \"$run\".audit_trail WHERE entity_type = 'audit_trail'")
  ((reads >= 3)) && break
  sleep 0.5
done
echo "           $reads access events in $run.audit_trail (entity_type audit_trail)"

entity=$(curl -fs -H "Authorization: Bearer $TOKEN" "$api_url/events/$first" | jq -r .event.entity_id)

trap - EXIT
cat <<EOF

[demo] The daemon and the read API keep running. Try (tokens last 5 minutes; users alice =
       auditor, ivan = investigator, rita = report_admin, nora = no role; password $KEYCLOAK_DEMO_PASSWORD):

  TOKEN=\$($token_cmd)
  curl -s -H "Authorization: Bearer \$TOKEN" '$api_url/events?entity_type=plant&limit=5' | jq
  curl -s -H "Authorization: Bearer \$TOKEN" '$api_url/events/$first?verify=true' | jq .verification
  curl -s -H "Authorization: Bearer \$TOKEN" '$api_url/entities/plant/$entity/history?limit=5' | jq
  curl -s '$api_url/openapi.json' | jq '.paths | keys'

       Stop both with: kill \$(cat $state/daemon.pid $state/api.pid)
EOF
