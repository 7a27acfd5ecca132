#!/usr/bin/env bash
# Local demo: a collector on its embedded defaults plus a simulated fleet of
# mock agents on loopback, with the tenants of
# deploy/examples/demo-tenants.toml:
#   lab-a         lab-a-node-1, lab-a-node-2: 16 GPUs training, ~10.4 kW
#                 against a 10 kW contract (over it except in checkpoints)
#   lab-b         lab-b-node-1: 8 GPUs serving inference, 6 kW contract
#   unassigned    spare-node-1: 8 GPUs no tenant leases
# Stops on Ctrl-C. CAPWATCH_GRPC_LISTEN / CAPWATCH_HTTP_LISTEN move the
# ports; DEMO_SECONDS=N stops the demo by itself after N seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bins
bin=target/release
export CAPWATCH_GRPC_LISTEN="${CAPWATCH_GRPC_LISTEN:-127.0.0.1:7070}"
export CAPWATCH_HTTP_LISTEN="${CAPWATCH_HTTP_LISTEN:-127.0.0.1:9470}"
# The ledger persists across demo runs (energy totals carry on). The
# collector never creates one itself: the first run does, on purpose.
export CAPWATCH_LEDGER="${CAPWATCH_LEDGER:-target/demo-ledger.db}"
if [[ ! -e "$CAPWATCH_LEDGER" ]]; then
    "$bin/capwatch-collector" init-ledger
fi

pids=()
cleanup() {
    trap - EXIT INT TERM
    # Agents first, so they deliver what they hold, then the collector.
    for pid in "${pids[@]:1}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]:1}"; do wait "$pid" 2>/dev/null || true; done
    kill -TERM "${pids[0]}" 2>/dev/null || true
    wait "${pids[0]}" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$bin/capwatch-collector" --tenants deploy/examples/demo-tenants.toml &
pids+=($!)
# Wait until the collector accepts connections on its HTTP port.
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/${CAPWATCH_HTTP_LISTEN%:*}/${CAPWATCH_HTTP_LISTEN##*:}") 2>/dev/null && break
    sleep 0.1
done

# Each simulated node keeps its energy counters across demo runs, as a
# loaded driver does, so a restart is not taken for a driver reload.
mkdir -p target/demo
agent() {
    printf '[mock]\ncounter_file = "target/demo/%s.counters"\n' "$1" > "target/demo/$1.toml"
    "$bin/capwatch-agent" --config "target/demo/$1.toml" --source mock \
        --collector "http://$CAPWATCH_GRPC_LISTEN" \
        --node-id "$1" --mock-profile "$2" --mock-seed "$3" &
    pids+=($!)
}
agent lab-a-node-1 training 1
agent lab-a-node-2 training 2
agent lab-b-node-1 inference 3
agent spare-node-1 mixed 4

cat <<MSG

capwatch demo running: 4 mock agents (32 GPUs) streaming to one collector.
  metrics:  http://$CAPWATCH_HTTP_LISTEN/metrics
  health:   http://$CAPWATCH_HTTP_LISTEN/healthz
  tenants:  http://$CAPWATCH_HTTP_LISTEN/v1/tenants
  usage:    http://$CAPWATCH_HTTP_LISTEN/v1/usage?from=$(date -u +%Y-%m-%dT%H:00:00Z)&to=$(date -u -d '+1 hour' +%Y-%m-%dT%H:00:00Z)&step=15m
  ledger:   $CAPWATCH_LEDGER
  try:      curl -s http://$CAPWATCH_HTTP_LISTEN/metrics | grep '^capwatch_tenant'
Ctrl-C stops it.

MSG
if [[ -n "${DEMO_SECONDS:-}" ]]; then
    sleep "$DEMO_SECONDS"
else
    wait "${pids[0]}"
fi
