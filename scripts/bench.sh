#!/usr/bin/env bash
# Every benchmark, one after the other (about 30 minutes on 2 cores); each
# prints its own figures, medians of several runs. README "Performance"
# holds the figures measured so far and how to read them.
#   1. collector ingest at 1,000 / 10,000 / 25,000 nodes, saturating at
#      4,000 nodes x 50 Hz, and the decode-only ceiling
#                                   scripts/bench-ingest.sh [saturate]
#   2. agent overhead               scripts/measure-agent.sh
#   3. /metrics render              cargo bench --bench metrics_render
#   4. end-to-end latency           scripts/bench-latency.py
#   5. ledger commit throughput     cargo bench --bench ledger_commit
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bins -q
echo "== 1. collector ingest"
bash scripts/bench-ingest.sh
bash scripts/bench-ingest.sh saturate
echo "== 2. agent overhead"
bash scripts/measure-agent.sh
echo "== 3. /metrics render"
cargo bench -q --locked -p capwatch-collector --bench metrics_render
echo "== 4. end-to-end latency"
python3 scripts/bench-latency.py
echo "== 5. ledger commit throughput (10,000 and 200,000 GPUs)"
cargo bench -q --locked -p capwatch-collector --bench ledger_commit -- --seconds 30 --runs 3
cargo bench -q --locked -p capwatch-collector --bench ledger_commit -- --seconds 30 --gpus 200000 --runs 3
