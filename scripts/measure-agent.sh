#!/usr/bin/env bash
# Agent overhead: one mock agent with 8 GPUs at 1 Hz streaming to a local
# collector for SECONDS (default 60), run RUNS times (default 3). Prints CPU
# (% of one core, from /proc utime+stime) and RSS of the agent per run.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${SECONDS_PER_RUN:-60}"
runs="${RUNS:-3}"
cargo build --release --locked --bins -q
bin="${CARGO_TARGET_DIR:-target}/release"
tck=$(getconf CLK_TCK)
for run in $(seq "$runs"); do
    # The collector makes a ledger only when told to.
    "$bin/capwatch-collector" --ledger "${TMPDIR:-/tmp}/capwatch-measure-ledger-$$.db" init-ledger >/dev/null
    "$bin/capwatch-collector" --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
        --ledger "${TMPDIR:-/tmp}/capwatch-measure-ledger-$$.db" \
        --log-format json 2>"${TMPDIR:-/tmp}/capwatch-measure-collector.log" &
    c=$!
    grpc=""
    for _ in $(seq 100); do
        grpc=$(grep -o '"grpc":"[^"]*"' "${TMPDIR:-/tmp}/capwatch-measure-collector.log" | cut -d'"' -f4 || true)
        [[ -n "$grpc" ]] && break
        sleep 0.1
    done
    "$bin/capwatch-agent" --source mock --collector "http://$grpc" --node-id measure-1 2>/dev/null &
    a=$!
    sleep 5 # past start-up
    t0=$(awk '{print $14+$15}' "/proc/$a/stat")
    sleep "$seconds"
    t1=$(awk '{print $14+$15}' "/proc/$a/stat")
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$a/status")
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$a/status")
    awk -v r="$run" -v d=$((t1 - t0)) -v hz="$tck" -v s="$seconds" -v rss="$rss" -v hwm="$hwm" \
        'BEGIN { printf "run %d: cpu %.3f%% of one core (%d ticks of 1/%d s in %d s), rss %.1f MiB, peak rss %.1f MiB\n", r, d / hz / s * 100, d, hz, s, rss / 1024, hwm / 1024 }'
    kill -TERM "$a"; wait "$a" || true
    kill -TERM "$c"; wait "$c" || true
    rm -f "${TMPDIR:-/tmp}/capwatch-measure-ledger-$$.db"*
done
