# Shared by the agent cost measurements (scripts/measure-node-power.sh,
# scripts/measure-agent-nvml.sh); sourced from the repository root, with
# `pids` (an associative array: agent name -> pid) and `seconds` set by
# the caller.

# Builds the release agent and the stand-ins, makes the work directory
# (removed on exit, with every background job killed) and starts the
# stand-ins in it: sets `target`, `work`, `grpc` (the collector stand-in)
# and `bmc` (the Redfish BMC stand-in; its CA, credentials and a powercap
# tree are in `$work`).
start_standins() {
    cargo build --release --locked -q -p capwatch-agent --bin capwatch-agent
    cargo build --locked -q -p capwatch-agent --example standins
    target="${CARGO_TARGET_DIR:-target}"
    work=$(mktemp -d)
    trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
    "$target/debug/examples/standins" "$work" >"$work/standins.out" &
    for _ in $(seq 100); do
        [[ -s "$work/standins.out" ]] && break
        sleep 0.1
    done
    grpc=$(grep -o 'grpc=[^ ]*' "$work/standins.out" | cut -d= -f2)
    bmc=$(grep -o 'bmc=[^ ]*' "$work/standins.out" | cut -d= -f2)
}

# CPU time of every thread of a process so far, ns.
cpu_ns() { cat /proc/"$1"/task/*/schedstat | awk '{ s += $1 } END { printf "%d", s }'; }

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# Measures every agent of `pids` over `seconds`: prints each one's CPU (%
# of one core, from the nanosecond run times in schedstat), RSS and
# threads into `$work/results`, then the medians of the agents whose
# names start with each of the kinds given ("mock" for mock-1, mock-2...).
measure_agents() {
    declare -A t0
    for k in "${!pids[@]}"; do t0[$k]=$(cpu_ns "${pids[$k]}"); done
    sleep "$seconds"
    for k in $(printf '%s\n' "${!pids[@]}" | sort); do
        p=${pids[$k]}
        t1=$(cpu_ns "$p")
        rss=$(awk '/VmRSS/ {print $2}' "/proc/$p/status")
        threads=$(awk '/Threads/ {print $2}' "/proc/$p/status")
        awk -v k="$k" -v d=$((t1 - t0[$k])) -v s="$seconds" -v rss="$rss" -v th="$threads" \
            'BEGIN { printf "%s cpu_percent %.4f cpu_ms %.1f rss_mib %.1f threads %d\n", k, d / 1e9 / s * 100, d / 1e6, rss / 1024, th }'
    done | tee "$work/results"
    for kind in "$@"; do
        cpu=$(awk -v kind="$kind" '$1 ~ "^"kind"-" { print $3 }' "$work/results" | median)
        rss=$(awk -v kind="$kind" '$1 ~ "^"kind"-" { print $7 }' "$work/results" | median)
        echo "$kind median: cpu $cpu % of one core, rss $rss MiB"
    done
}
