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
#
# BENCH_LEDGER=postgres: the ledger in PostgreSQL instead, written by TWO
# collectors (collector_id bench-a and bench-b) with the fleet spread over
# both (--collectors, hashed): a cluster of the script's own (initdb in the
# temporary directory, as nobody when run as root, on a free port; the
# settings below), a fresh database per run. Per run: GPU-samples/s
# accepted by both, each collector's commit time per second of data and
# per commit (capwatch_collector_ledger_commit_seconds_total, and over
# capwatch_collector_ledger_commits_total{result="success"}), CPU and RSS, the
# cluster's CPU (all its processes) and the fleet's, and the load average.
#   BENCH_LEDGER=postgres BENCH_NODES="10000 25000" bash scripts/bench-ingest.sh
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
bin="${CARGO_TARGET_DIR:-target}/release"
tck=$(getconf CLK_TCK)
work=$(mktemp -d "${TMPDIR:-/tmp}/capwatch-bench.XXXXXX")
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
accepted() {
    curl -s "http://$1/metrics" |
        awk '/^capwatch_collector_samples_total\{outcome="accepted"\}/ {print $2}'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

metric() {
    curl -s "http://$1/metrics" | awk -v m="$2" '$1 == m {print $2; found = 1} END {if (!found) print 0}'
}

# Starts a collector on config $1, logging to $2; sets pid, grpc and http.
start_collector() {
    "$bin/capwatch-collector" --config "$1" \
        --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
        --log-format json 2>"$2" &
    pid=$! grpc="" http=""
    for _ in $(seq 100); do
        grpc=$(grep -o '"grpc":"[^"]*"' "$2" | cut -d'"' -f4 || true)
        http=$(grep -o '"http":"[^"]*"' "$2" | cut -d'"' -f4 || true)
        [[ -n "$grpc" && -n "$http" ]] && break
        sleep 0.1
    done
    if [[ -z "$grpc" ]]; then
        echo "the collector did not start:" >&2
        cat "$2" >&2
        exit 1
    fi
}

if [[ "${BENCH_LEDGER:-sqlite}" == postgres ]]; then
    pgbin=$(pg_config --bindir 2>/dev/null || true)
    if [[ ! -x "$pgbin/initdb" ]]; then
        pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    fi
    if [[ ! -x "$pgbin/initdb" ]]; then
        pgbin=$(dirname "$(command -v initdb)")
    fi
    as_pg() { if ((EUID == 0)); then runuser -u nobody -- "$@"; else "$@"; fi; }
    chmod 755 "$work"
    mkdir "$work/pg"
    if ((EUID == 0)); then chown nobody "$work/pg"; fi
    as_pg "$pgbin/initdb" -D "$work/pg/data" -U postgres -A trust -E UTF8 --locale C >/dev/null
    port=""
    for _ in $(seq 50); do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            port=$p
            break
        fi
    done
    # Durability as shipped (fsync, synchronous_commit, full_page_writes
    # on); memory for a site's cursor rows, a minute of WAL between
    # checkpoints. The same settings as the ledger_commit benchmark's.
    cat >>"$work/pg/data/postgresql.conf" <<EOF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work/pg'
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 5min
wal_compression = on
max_connections = 60
EOF
    as_pg "$pgbin/pg_ctl" -D "$work/pg/data" -l "$work/pg/server.log" -w start >/dev/null
    trap 'kill $(jobs -p) 2>/dev/null || true; as_pg "$pgbin/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
    postmaster=$(head -n1 "$work/pg/data/postmaster.pid")
    # The cluster's CPU ticks: the postmaster's own and its exited
    # children's (reaped), and every live child's.
    pg_ticks() {
        local t c
        t=$(awk '{print $14+$15+$16+$17}' "/proc/$postmaster/stat")
        for c in $(cat "/proc/$postmaster/task/$postmaster/children"); do
            t=$((t + $(awk '{print $14+$15}' "/proc/$c/stat" 2>/dev/null || echo 0)))
        done
        echo "$t"
    }
    psql_pg() { "$pgbin/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres "$@"; }
    columns="gpu_samples_per_s offered_per_s commit_s_per_s_a commit_s_per_s_b commit_ms_a commit_ms_b cpu_pct_a cpu_pct_b rss_mib_a rss_mib_b postgres_cpu_pct fleet_cpu_pct"

    echo "postgres_ingest nodes gpus run $columns"
    for nodes in $nodes_list; do
        share=1
        if ((nodes > per_conn_above)); then share=16; fi
        : >"$work/pg-table"
        for run in $(seq "$runs"); do
            db="bench_${nodes}_$run"
            psql_pg -d postgres -c "CREATE DATABASE $db" >/dev/null
            for side in a b; do
                printf 'per_gpu_metrics = false\nper_node_metrics = false\nmax_streams = 100000\nledger_url = "postgres://postgres@127.0.0.1:%s/%s"\ncollector_id = "bench-%s"\n' \
                    "$port" "$db" "$side" >"$work/collector-$side.toml"
            done
            "$bin/capwatch-collector" init-ledger --config "$work/collector-a.toml" >/dev/null
            start_collector "$work/collector-a.toml" "$work/collector-a.log"
            ca=$pid grpc_a=$grpc http_a=$http
            start_collector "$work/collector-b.toml" "$work/collector-b.log"
            cb=$pid grpc_b=$grpc http_b=$http
            "$bin/capwatch-fleet" --collectors "http://$grpc_a,http://$grpc_b" --nodes "$nodes" \
                --interval "$interval" --nodes-per-connection "$share" \
                --samples-per-send "$per_send" --spool-capacity "$spool" \
                --log-format json >"$work/fleet.out" 2>"$work/fleet.log" &
            f=$!
            sleep "$warmup"
            snap() {
                local ok='capwatch_collector_ledger_commits_total{result="success"}'
                local secs=capwatch_collector_ledger_commit_seconds_total
                echo "$(accepted "$http_a") $(accepted "$http_b")" \
                    "$(metric "$http_a" "$secs") $(metric "$http_b" "$secs")" \
                    "$(metric "$http_a" "$ok") $(metric "$http_b" "$ok")" \
                    "$(cpu_ticks "$ca") $(cpu_ticks "$cb") $(pg_ticks) $(cpu_ticks "$f") $(date +%s.%N)"
            }
            s0=$(snap)
            sleep "$seconds"
            s1=$(snap)
            rss_a=$(awk '/VmRSS/ {print $2}' "/proc/$ca/status")
            rss_b=$(awk '/VmRSS/ {print $2}' "/proc/$cb/status")
            kill -INT "$f"
            wait "$f" || true
            kill -TERM "$ca" "$cb"
            wait "$ca" || true
            wait "$cb" || true
            # Fields 1-11 of the first snapshot, 12-22 of the second.
            echo "$s0 $s1" | awk -v tck="$tck" -v n="$nodes" -v run="$run" -v iv="$interval" \
                -v ra="$rss_a" -v rb="$rss_b" '{
                    dt = $22 - $11; gpus = n * 8
                    ivs = iv; sub(/ms$/, "", ivs); ivs = (iv ~ /ms$/) ? ivs / 1000 : ivs + 0
                    rate = (($12 - $1) + ($13 - $2)) * 8 / dt
                    ma = ($16 - $5 > 0) ? ($14 - $3) / ($16 - $5) * 1000 : 0
                    mb = ($17 - $6 > 0) ? ($15 - $4) / ($17 - $6) * 1000 : 0
                    printf "postgres_ingest %d %d %d %.0f %.0f %.3f %.3f %.0f %.0f %.1f %.1f %.1f %.1f %.1f %.1f\n",
                        n, gpus, run, rate, gpus / ivs, ($14 - $3) / dt, ($15 - $4) / dt, ma, mb,
                        ($18 - $7) / tck / dt * 100, ($19 - $8) / tck / dt * 100,
                        ra / 1024, rb / 1024, ($20 - $9) / tck / dt * 100, ($21 - $10) / tck / dt * 100
                }' | tee -a "$work/pg-table"
            grep '"event":"done"' "$work/fleet.out" | sed 's/^/  fleet: /' || true
            echo "  load average: $(cut -d' ' -f1-3 /proc/loadavg)"
            psql_pg -d postgres -c "DROP DATABASE $db" >/dev/null
        done
        printf 'median nodes=%d' "$nodes"
        i=5
        for name in $columns; do
            printf ' %s=%s' "$name" "$(awk -v i="$i" '{print $i}' "$work/pg-table" | median)"
            i=$((i + 1))
        done
        printf '\n'
    done
    exit 0
fi

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
