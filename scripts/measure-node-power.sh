#!/usr/bin/env bash
# Agent cost of node power: RUNS (default 3) mock agents with 8 GPUs at
# 1 Hz and no node power (the mock's simulated node power off too), and
# RUNS more with a Redfish BMC (stand-in: TLS,
# basic auth, EnvironmentMetrics, read every 10 s, the default) and RAPL (a
# powercap tree of two packages and their dram, read every 1 s, the
# default), all at once for SECONDS_PER_RUN (default 60) against one
# collector stand-in that acks everything. Prints CPU (% of one core, from
# the nanosecond run times in /proc/PID/task/*/schedstat) and RSS of each
# agent, and the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${SECONDS_PER_RUN:-60}"
runs="${RUNS:-3}"
source scripts/agent-cost.sh
start_standins
declare -A pids
for run in $(seq "$runs"); do
    CAPWATCH_MOCK_NODE_POWER=false \
        "$target/release/capwatch-agent" --source mock --collector "$grpc" --node-id "base-$run" 2>/dev/null &
    pids["base-$run"]=$!
    CAPWATCH_MOCK_NODE_POWER=false CAPWATCH_REDFISH_URL="$bmc" \
        CAPWATCH_REDFISH_CA_FILE="$work/bmc-ca.pem" \
        CAPWATCH_REDFISH_CREDENTIALS_FILE="$work/bmc.credentials" \
        CAPWATCH_RAPL_ENABLED=true CAPWATCH_RAPL_ROOT="$work/powercap" \
        "$target/release/capwatch-agent" --source mock --collector "$grpc" --node-id "power-$run" 2>"$work/power-$run.log" &
    pids["power-$run"]=$!
done
sleep 5 # past start-up
measure_agents base power
grep -h "node power source started" "$work"/power-1.log || echo "no node power source started"
# What one agent read: its exit summary.
kill -TERM "${pids[power-1]}"
wait "${pids[power-1]}" || true
grep -o 'node_power_readings=[0-9]* node_power_failures=[0-9]*' "$work"/power-1.log || echo "no exit summary"
