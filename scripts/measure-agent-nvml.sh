#!/usr/bin/env bash
# Agent cost with everything on: RUNS (default 3) agents on the NVML
# backend, each reading 8 GPUs at 1 Hz through the stand-in libnvidia-ml.so
# (agent/tests/fake_nvml/fake_nvml.c, built here: every health reading,
# 18 NVLinks per board but one, XID events waited on by their own thread
# with a counts file (the stand-in looks for events every 250 ms, not
# every 10 ms as in the tests: the driver's wait blocks in the kernel),
# GPU 0 in MIG mode with three instances checked every 10 s), with node
# power (a Redfish BMC over TLS with basic auth every
# 10 s, a powercap tree of two packages and their dram every 1 s), a disk
# spool synced at every sample, and the HTTP port with /metrics and
# /healthz fetched every 15 s; beside them RUNS mock agents with 8 GPUs and
# nothing else on, as the baseline. All at once for SECONDS_PER_RUN
# (default 60) against one collector stand-in that acks everything. Prints
# CPU (% of one core, from the nanosecond run times in
# /proc/PID/task/*/schedstat), RSS and threads of each agent, and the
# medians.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${SECONDS_PER_RUN:-60}"
runs="${RUNS:-3}"
source scripts/agent-cost.sh
start_standins
"${CC:-cc}" -shared -fPIC -O1 -o "$work/libnvidia-ml.so.1" \
    -DFAKE_EXTRA_GPUS=6 -DFAKE_GPU0_NVLINKS=18 -DFAKE_MIG_LAYOUT=1 \
    "-DFAKE_XID_FILE=\"$work/xid\"" -DFAKE_XID_POLL_MS=250 agent/tests/fake_nvml/fake_nvml.c
: >"$work/xid"
declare -A pids
for run in $(seq "$runs"); do
    CAPWATCH_MOCK_NODE_POWER=false \
        "$target/release/capwatch-agent" --source mock --collector "$grpc" --node-id "mock-$run" 2>/dev/null &
    pids["mock-$run"]=$!
    mkdir -p "$work/nvml-$run"
    CAPWATCH_NVML_XID_COUNTS_FILE="$work/nvml-$run/xid-counts" \
        CAPWATCH_SPOOL_DIR="$work/nvml-$run/spool" \
        CAPWATCH_HTTP_LISTEN=127.0.0.1:0 \
        CAPWATCH_REDFISH_URL="$bmc" \
        CAPWATCH_REDFISH_CA_FILE="$work/bmc-ca.pem" \
        CAPWATCH_REDFISH_CREDENTIALS_FILE="$work/bmc.credentials" \
        CAPWATCH_RAPL_ENABLED=true CAPWATCH_RAPL_ROOT="$work/powercap" \
        "$target/release/capwatch-agent" --source nvml --nvml-library "$work/libnvidia-ml.so.1" \
        --collector "$grpc" --node-id "nvml-$run" --log-format json 2>"$work/nvml-$run.log" &
    pids["nvml-$run"]=$!
done
sleep 5 # past start-up
declare -A ports
for run in $(seq "$runs"); do
    ports[$run]=$(grep -o '"listen":"[^"]*"' "$work/nvml-$run.log" | cut -d'"' -f4)
    [[ -n "${ports[$run]}" ]] || { echo "nvml-$run has no HTTP port:"; cat "$work/nvml-$run.log"; exit 1; }
done
# Two XIDs on GPU 3 during the run: each is counted, written to the counts
# file and synced.
(sleep 10 && echo "3 79" >>"$work/xid" && sleep 20 && echo "3 48" >>"$work/xid") &
# A scraper and a probe, as Prometheus and the kubelet would be.
(while sleep 15; do
    for run in $(seq "$runs"); do
        curl -sf "http://${ports[$run]}/metrics" >/dev/null || true
        curl -sf "http://${ports[$run]}/healthz" >/dev/null || true
    done
done) &
measure_agents mock nvml
# What the first NVML agent read, from its own /metrics.
curl -sf "http://${ports[1]}/metrics" | grep -E '^capwatch_agent_(samples|spool|nvml_errors|gpu_read_stalls|node_power)' || true
grep -o '"message":"[^"]*XID[^"]*"' "$work/nvml-1.log" | sort | uniq -c || true
cat "$work/nvml-1/xid-counts" 2>/dev/null || echo "no XID counts file"
