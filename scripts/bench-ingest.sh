#!/usr/bin/env bash
# Collector ingest at site scale, everything on this machine: a release
# collector (ledger on disk, tenant-level /metrics) and capwatch-fleet
# streaming N simulated nodes of 8 mock GPUs at 1 Hz. For each size, RUNS
# runs: after WARMUP seconds, GPU-samples accepted per second over SECONDS
# (from capwatch_collector_samples_total), the collector's CPU (% of one
# core) and RSS (and bytes per GPU), the fleet's CPU, and how far acks lag.
# Then the decode-only ceiling of the same messages and the ratios.
#
#   bash scripts/bench-ingest.sh                    # 1000 10000 25000 nodes
#   BENCH_NODES="1000" BENCH_RUNS=1 bash scripts/bench-ingest.sh
#   BENCH_INTERVAL=100ms BENCH_NODES=1000 ...        # more load per node
#   bash scripts/bench-ingest.sh saturate           # more than the machine
#                                                   # can offer: 4000 nodes
#                                                   # at 50 Hz
# BENCH_SAMPLES_PER_SEND=N: each node sends N samples per message (and the
# ceiling decodes messages of N); BENCH_SPOOL: samples each node keeps
# unacked (the default 120 is 2.4 s at 50 Hz, less than acks take when the
# machine is saturated).
set -euo pipefail
if [[ "${1:-}" == saturate ]]; then
    : "${BENCH_NODES:=4000}" "${BENCH_INTERVAL:=20ms}" "${BENCH_SPOOL:=3000}"
fi
cd "$(dirname "$0")/.."
nodes_list="${BENCH_NODES:-1000 10000 25000}"
runs="${BENCH_RUNS:-3}"
seconds="${BENCH_SECONDS:-30}"
warmup="${BENCH_WARMUP:-15}"
interval="${BENCH_INTERVAL:-1s}"
per_send="${BENCH_SAMPLES_PER_SEND:-1}"
spool="${BENCH_SPOOL:-120}"
# One process may hold only so many sockets: above this many nodes, the
# simulator puts 16 nodes on each HTTP/2 connection.
per_conn_above="${BENCH_SHARE_ABOVE:-5000}"

cargo build --release --locked --bins -q
bin=target/release
tck=$(getconf CLK_TCK)
work=$(mktemp -d "${TMPDIR:-/tmp}/capwatch-bench.XXXXXX")
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
accepted() {
    curl -s "http://$1/metrics" |
        awk '/^capwatch_collector_samples_total\{outcome="accepted"\}/ {print $2}'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf 'collector_ingest nodes gpus run gpu_samples_per_s offered_per_s collector_cpu_pct collector_rss_mib bytes_per_gpu fleet_cpu_pct\n'
for nodes in $nodes_list; do
    share=1
    if ((nodes > per_conn_above)); then share=16; fi
    : >"$work/rates"
    : >"$work/cpus"
    : >"$work/rss"
    for run in $(seq "$runs"); do
        rm -f "$work"/ledger.db*
        printf 'per_gpu_metrics = false\nper_node_metrics = false\nmax_streams = 100000\nledger_path = "%s"\n' \
            "$work/ledger.db" >"$work/collector.toml"
        "$bin/capwatch-collector" init-ledger --config "$work/collector.toml" >/dev/null
        "$bin/capwatch-collector" --config "$work/collector.toml" \
            --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
            --log-format json 2>"$work/collector.log" &
        c=$!
        grpc="" http=""
        for _ in $(seq 100); do
            grpc=$(grep -o '"grpc":"[^"]*"' "$work/collector.log" | cut -d'"' -f4 || true)
            http=$(grep -o '"http":"[^"]*"' "$work/collector.log" | cut -d'"' -f4 || true)
            [[ -n "$grpc" ]] && break
            sleep 0.1
        done
        if [[ -z "$grpc" ]]; then
            echo "the collector did not start:" >&2
            cat "$work/collector.log" >&2
            exit 1
        fi
        "$bin/capwatch-fleet" --collector "http://$grpc" --nodes "$nodes" \
            --interval "$interval" --nodes-per-connection "$share" \
            --samples-per-send "$per_send" --spool-capacity "$spool" \
            --log-format json >"$work/fleet.out" 2>"$work/fleet.log" &
        f=$!
        sleep "$warmup"
        a0=$(accepted "$http")
        c0=$(cpu_ticks "$c")
        f0=$(cpu_ticks "$f")
        t0=$(date +%s.%N)
        sleep "$seconds"
        a1=$(accepted "$http")
        c1=$(cpu_ticks "$c")
        f1=$(cpu_ticks "$f")
        t1=$(date +%s.%N)
        rss=$(awk '/VmRSS/ {print $2}' "/proc/$c/status")
        kill -INT "$f"
        wait "$f" || true
        kill -TERM "$c"
        wait "$c" || true
        awk -v a0="$a0" -v a1="$a1" -v c0="$c0" -v c1="$c1" -v f0="$f0" -v f1="$f1" \
            -v t0="$t0" -v t1="$t1" -v tck="$tck" -v rss="$rss" -v n="$nodes" \
            -v run="$run" -v iv="$interval" 'BEGIN {
                dt = t1 - t0; gpus = n * 8
                ivs = iv; sub(/ms$/, "", ivs); ivs = (iv ~ /ms$/) ? ivs / 1000 : ivs + 0
                rate = (a1 - a0) * 8 / dt
                printf "collector_ingest %d %d %d %.0f %.0f %.1f %.1f %.0f %.1f\n", n, gpus, run,
                    rate, gpus / ivs, (c1 - c0) / tck / dt * 100, rss / 1024, rss * 1024 / gpus,
                    (f1 - f0) / tck / dt * 100
            }' | tee -a "$work/table"
        tail -n1 "$work/table" | awk '{print $5}' >>"$work/rates"
        tail -n1 "$work/table" | awk '{print $7}' >>"$work/cpus"
        tail -n1 "$work/table" | awk '{print $9}' >>"$work/rss"
        grep '"event":"done"' "$work/fleet.out" | sed 's/^/  fleet: /' || true
    done
    printf 'median nodes=%d gpu_samples_per_s=%s collector_cpu_pct=%s bytes_per_gpu=%s\n' \
        "$nodes" "$(median <"$work/rates")" "$(median <"$work/cpus")" "$(median <"$work/rss")"
done

echo "== decode-only ceiling of the same messages (one thread)"
cargo bench -q --locked -p capwatch-collector --bench decode_ceiling -- \
    --samples-per-message "$per_send" | tee "$work/ceiling"
ceiling=$(awk '/^decode_gpu_samples_per_s/ {print $2}' "$work/ceiling")
# The run with the highest rate, and that rate per core of collector CPU:
# decoding runs on one thread, the collector on what it gets of two.
sort -k5 -n "$work/table" | tail -n1 | awk -v c="$ceiling" '{
    per_core = $5 / ($7 / 100)
    printf "ceiling_ratio best_ingest=%.0f at %.1f%% cpu (%.0f per core) decode_ceiling=%.0f ratio=%.1fx per_core_ratio=%.1fx\n", $5, $7, per_core, c, c / $5, c / per_core
}'
