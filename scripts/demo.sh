#!/usr/bin/env bash
# Local demo: a collector on its embedded defaults plus a simulated fleet of
# mock agents and a simulated site meter on loopback, with the tenants of
# deploy/examples/demo-tenants.toml, one per contract basis:
#   lab-a         lab-a-node-1, lab-a-node-2: 16 GPUs training, ~10.4 kW of
#                 GPU power, ~16 kW at the wall, against a 15 kW contract
#                 on node power (over it except in checkpoints)
#   lab-b         lab-b-node-1: 8 GPUs serving inference, 9 kW contract on
#                 facility power, metered by the site meter
#   lab-c         lab-c-node-1: 8 GPUs serving inference, 4 kW contract on
#                 GPU power
#   unassigned    spare-node-1: 8 GPUs no tenant leases (also metered)
# The site meter (capwatch-sim-meter, Modbus TCP) feeds lab-b-node-1 and
# spare-node-1 and counts their node power plus 30 % (cooling and
# distribution); the collector allocates each final minute of it.
# Stops on Ctrl-C or SIGTERM, agents and meter first, then the collector.
# CAPWATCH_GRPC_LISTEN / CAPWATCH_HTTP_LISTEN / DEMO_METER_LISTEN move the
# ports; DEMO_SECONDS=N stops the demo by itself after N seconds.
# DEMO_BIN_DIR runs binaries built already instead of building release
# ones, and DEMO_DIR keeps the simulated nodes' files elsewhere than
# target/demo (the tests use both).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${DEMO_BIN_DIR:-}" ]]; then
    bin=$DEMO_BIN_DIR
else
    cargo build --release --locked --bins
    bin="${CARGO_TARGET_DIR:-target}/release"
fi
demo_dir="${DEMO_DIR:-target/demo}"
export CAPWATCH_GRPC_LISTEN="${CAPWATCH_GRPC_LISTEN:-127.0.0.1:7070}"
export CAPWATCH_HTTP_LISTEN="${CAPWATCH_HTTP_LISTEN:-127.0.0.1:9470}"
meter_listen="${DEMO_METER_LISTEN:-127.0.0.1:7502}"
# The ledger persists across demo runs (energy totals carry on). The
# collector never creates one itself: the first run does, on purpose.
export CAPWATCH_LEDGER="${CAPWATCH_LEDGER:-target/demo-ledger.db}"
if [[ ! -e "$CAPWATCH_LEDGER" ]]; then
    # target/ is not there when the build went to CARGO_TARGET_DIR.
    mkdir -p "$(dirname "$CAPWATCH_LEDGER")"
    "$bin/capwatch-collector" init-ledger
fi

# Whether something accepts connections at host:port.
listening() {
    (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null
}
# Another process on a demo port would be taken for the demo: refuse.
for addr in "$CAPWATCH_GRPC_LISTEN" "$CAPWATCH_HTTP_LISTEN" "$meter_listen"; do
    if listening "$addr"; then
        echo "demo: $addr is in use by another process; stop it, or move the demo with CAPWATCH_GRPC_LISTEN / CAPWATCH_HTTP_LISTEN / DEMO_METER_LISTEN" >&2
        exit 1
    fi
done

pids=()
sleeper=
cleanup() {
    trap - EXIT INT TERM
    [[ -z $sleeper ]] || kill "$sleeper" 2>/dev/null || true
    (( ${#pids[@]} )) || return 0
    # Agents and the meter first, so the agents deliver what they hold,
    # then the collector.
    for pid in "${pids[@]:1}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]:1}"; do wait "$pid" 2>/dev/null || true; done
    kill -TERM "${pids[0]}" 2>/dev/null || true
    wait "${pids[0]}" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The collector's only setting beyond the defaults: the site meter.
mkdir -p "$demo_dir"
cat > "$demo_dir/collector.toml" <<TOML
[[meter]]
id = "site-meter"
kind = "modbus"
nodes = ["lab-b-node-1", "spare-node-1"]
address = "$meter_listen"
interval = "5s"
wh_per_count = 1
min_ratio = 1.1
max_ratio = 1.5
TOML
# The meter (up before the collector polls it) simulates the nodes it
# feeds with their agents' profile and seed.
"$bin/capwatch-sim-meter" --listen "$meter_listen" \
    --node lab-b-node-1:inference:3 --node spare-node-1:mixed:4 &
meter=$!
"$bin/capwatch-collector" --config "$demo_dir/collector.toml" --tenants deploy/examples/demo-tenants.toml &
pids+=($! "$meter")
# Wait until the collector accepts connections on its HTTP port; should it
# exit instead (a port taken meanwhile, a bad setting), say so and fail.
for _ in $(seq 100); do
    kill -0 "${pids[0]}" 2>/dev/null || break
    listening "$CAPWATCH_HTTP_LISTEN" && break
    sleep 0.1
done
if ! kill -0 "${pids[0]}" 2>/dev/null || ! listening "$CAPWATCH_HTTP_LISTEN"; then
    echo "demo: the collector did not start on $CAPWATCH_GRPC_LISTEN (gRPC) and $CAPWATCH_HTTP_LISTEN (HTTP); its error is above" >&2
    exit 1
fi

# Each simulated node keeps its energy counters across demo runs, as a
# loaded driver does, so a restart is not taken for a driver reload.
# The collector's settings above are exported for it; both binaries read
# CAPWATCH_* and share setting names (http_listen), so the agents start
# without them, or each would try the collector's HTTP port and exit.
agent() {
    printf '[mock]\ncounter_file = "%s/%s.counters"\n' "$demo_dir" "$1" > "$demo_dir/$1.toml"
    env -u CAPWATCH_GRPC_LISTEN -u CAPWATCH_HTTP_LISTEN -u CAPWATCH_LEDGER \
        "$bin/capwatch-agent" --config "$demo_dir/$1.toml" --source mock \
        --collector "http://$CAPWATCH_GRPC_LISTEN" \
        --node-id "$1" --mock-profile "$2" --mock-seed "$3" &
    pids+=($!)
}
agent lab-a-node-1 training 1
agent lab-a-node-2 training 2
agent lab-b-node-1 inference 3
agent lab-c-node-1 inference 5
agent spare-node-1 mixed 4
# An agent that could not start (a bad setting, its port taken) says why
# above and exits at once: the demo fails rather than run without it.
sleep 1
for pid in "${pids[@]:1}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "demo: an agent exited at start; its error is above" >&2
        exit 1
    fi
done

cat <<MSG

capwatch demo running: 5 mock agents (40 GPUs) streaming to one collector,
and a simulated site meter on $meter_listen (Modbus TCP).
  metrics:  http://$CAPWATCH_HTTP_LISTEN/metrics
  health:   http://$CAPWATCH_HTTP_LISTEN/healthz (live), http://$CAPWATCH_HTTP_LISTEN/readyz (ready)
  tenants:  http://$CAPWATCH_HTTP_LISTEN/v1/tenants
  usage:    http://$CAPWATCH_HTTP_LISTEN/v1/usage?from=$(date -u +%Y-%m-%dT%H:00:00Z)&to=$(date -u -d '+1 hour' +%Y-%m-%dT%H:00:00Z)&step=15m
  ledger:   $CAPWATCH_LEDGER
  meters:   $bin/capwatch-collector meters --url http://$CAPWATCH_HTTP_LISTEN --from $(date -u +%Y-%m-%dT%H:00:00Z) --to $(date -u -d '+1 hour' +%Y-%m-%dT%H:00:00Z)
            (a minute is allocated once final: 15 to 30 minutes after it)
  try:      curl -s http://$CAPWATCH_HTTP_LISTEN/metrics | grep -E '^capwatch_tenant_(power|node_power|facility_power|basis_power)_watts'
Ctrl-C stops it.

MSG
if [[ -n "${DEMO_SECONDS:-}" ]]; then
    # In the background: a signal is handled at once, not when sleep ends.
    sleep "$DEMO_SECONDS" &
    sleeper=$!
    wait "$sleeper"
else
    wait "${pids[0]}"
fi
