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
cargo build --release --locked -q -p capwatch-agent --bin capwatch-agent
cargo build --locked -q -p capwatch-agent --example standins
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
target/debug/examples/standins "$work" >"$work/standins.out" &
for _ in $(seq 100); do
    [[ -s "$work/standins.out" ]] && break
    sleep 0.1
done
grpc=$(grep -o 'grpc=[^ ]*' "$work/standins.out" | cut -d= -f2)
bmc=$(grep -o 'bmc=[^ ]*' "$work/standins.out" | cut -d= -f2)
# CPU time of every thread of a process so far, ns.
cpu_ns() { cat /proc/"$1"/task/*/schedstat | awk '{ s += $1 } END { printf "%d", s }'; }
declare -A pids
for run in $(seq "$runs"); do
    CAPWATCH_MOCK_NODE_POWER=false \
        target/release/capwatch-agent --source mock --collector "$grpc" --node-id "base-$run" 2>/dev/null &
    pids["base-$run"]=$!
    CAPWATCH_MOCK_NODE_POWER=false CAPWATCH_REDFISH_URL="$bmc" \
        CAPWATCH_REDFISH_CA_FILE="$work/bmc-ca.pem" \
        CAPWATCH_REDFISH_CREDENTIALS_FILE="$work/bmc.credentials" \
        CAPWATCH_RAPL_ENABLED=true CAPWATCH_RAPL_ROOT="$work/powercap" \
        target/release/capwatch-agent --source mock --collector "$grpc" --node-id "power-$run" 2>"$work/power-$run.log" &
    pids["power-$run"]=$!
done
sleep 5 # past start-up
declare -A t0
for k in "${!pids[@]}"; do t0[$k]=$(cpu_ns "${pids[$k]}"); done
sleep "$seconds"
for k in $(printf '%s\n' "${!pids[@]}" | sort); do
    p=${pids[$k]}
    t1=$(cpu_ns "$p")
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$p/status")
    awk -v k="$k" -v d=$((t1 - t0[$k])) -v s="$seconds" -v rss="$rss" \
        'BEGIN { printf "%s cpu_percent %.4f cpu_ms %.1f rss_mib %.1f\n", k, d / 1e9 / s * 100, d / 1e6, rss / 1024 }'
done | tee "$work/results"
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
for kind in base power; do
    cpu=$(awk -v kind="$kind" '$1 ~ "^"kind"-" { print $3 }' "$work/results" | median)
    rss=$(awk -v kind="$kind" '$1 ~ "^"kind"-" { print $7 }' "$work/results" | median)
    echo "$kind median: cpu $cpu % of one core, rss $rss MiB"
done
grep -h "node power source started" "$work"/power-1.log || echo "no node power source started"
# What one agent read: its exit summary.
kill -TERM "${pids[power-1]}"
wait "${pids[power-1]}" || true
grep -o 'node_power_readings=[0-9]* node_power_failures=[0-9]*' "$work"/power-1.log || echo "no exit summary"
