#!/usr/bin/env python3
"""End-to-end latency: from a sample's timestamp to its appearance on
/metrics and in the ledger.

Runs a release collector and one mock agent (8 GPUs, 1 Hz) on loopback and
polls every 10 ms: /metrics for the node's newest sample timestamp
(capwatch_node_last_sample_timestamp_seconds), and the usage API for the
node's readings in the ledger. A sample's /metrics latency is the time it
was first seen minus its timestamp; its ledger latency is the time the
ledger's readings first included it minus its timestamp. Prints the median
and 95th percentile of each over SECONDS (default 60).

    python3 scripts/bench-latency.py            # after cargo build --release
    SECONDS=120 python3 scripts/bench-latency.py
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
DURATION = float(os.environ.get("SECONDS", "60"))
NODE = "latency-1"


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p))]


def main():
    work = tempfile.mkdtemp(prefix="capwatch-latency-")
    log = open(os.path.join(work, "collector.log"), "w+")
    collector = subprocess.Popen(
        [os.path.join(BIN, "capwatch-collector"), "--grpc-listen", "127.0.0.1:0",
         "--http-listen", "127.0.0.1:0", "--ledger", os.path.join(work, "ledger.db"),
         "--log-format", "json"],
        stderr=log)
    agent = None
    try:
        http = grpc = None
        for _ in range(100):
            log.seek(0)
            m = re.search(r'"grpc":"([^"]+)".*"http":"([^"]+)"', log.read())
            if m:
                grpc, http = m.groups()
                break
            time.sleep(0.1)
        if not http:
            sys.exit("collector did not start")
        agent = subprocess.Popen(
            [os.path.join(BIN, "capwatch-agent"), "--source", "mock", "--node-id", NODE,
             "--collector", f"http://{grpc}"],
            stderr=subprocess.DEVNULL)
        metric = re.compile(
            r'^capwatch_node_last_sample_timestamp_seconds\{[^}]*node="' + NODE + r'"[^}]*\} (\S+)$',
            re.M)
        seen_metrics = {}   # sample timestamp -> first seen on /metrics
        seen_ledger = {}    # readings count -> first seen in the ledger
        timestamps = []     # sample timestamps in order of appearance
        end = time.time() + DURATION + 5
        hour = int(time.time()) // 3600 * 3600
        usage = (f"http://{http}/v1/usage?step=1h&from="
                 f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(hour - 3600))}&to="
                 f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(hour + 7200))}")
        while time.time() < end:
            now = time.time()
            m = metric.search(get(f"http://{http}/metrics"))
            if m:
                ts = float(m.group(1))
                if ts not in seen_metrics:
                    seen_metrics[ts] = now
                    timestamps.append(ts)
            readings = sum(r["readings"] for r in json.loads(get(usage))["rows"])
            if readings and readings not in seen_ledger:
                seen_ledger[readings] = now
            time.sleep(0.01)
        # Skip the first 5 s (connection set-up).
        t0 = timestamps[0] + 5 if timestamps else 0
        to_metrics = [seen - ts for ts, seen in seen_metrics.items() if ts >= t0]
        # The ledger holds 8 readings per node sample: sample k (1-based)
        # is in once the count reaches 8k.
        to_ledger = []
        for k, ts in enumerate(timestamps, start=1):
            if ts < t0:
                continue
            firsts = [seen for n, seen in seen_ledger.items() if n >= 8 * k]
            if firsts:
                to_ledger.append(min(firsts) - ts)
        print(f"samples {len(to_metrics)} over {DURATION:.0f} s (1 Hz, 8 GPUs)")
        print(f"sample_to_metrics_ms median {1000 * pct(to_metrics, 0.5):.0f} "
              f"p95 {1000 * pct(to_metrics, 0.95):.0f}")
        print(f"sample_to_ledger_ms median {1000 * pct(to_ledger, 0.5):.0f} "
              f"p95 {1000 * pct(to_ledger, 0.95):.0f}")
    finally:
        if agent:
            agent.terminate()
            agent.wait()
        collector.terminate()
        collector.wait()


if __name__ == "__main__":
    main()
