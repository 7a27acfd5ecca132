//! The status page's ledger read at fleet scale.
//!
//! Fills a SQLite ledger with a day of minute rows of `--nodes` nodes
//! (1,000; two tenants), the watermark 20 minutes behind, then times the
//! read of the page's last day, whole (`recent::read`, what every reload
//! did before) and from the minutes the read before kept
//! (`recent::read_kept`: the minutes from the watermark on and the
//! adjustments booked since), each reload after a commit of one more
//! minute of every node with the watermark a minute on. Prints the median
//! of `--runs` (5) reads each.
//!
//! ```text
//! cargo bench -p capwatch-collector --bench status_read
//! cargo bench -p capwatch-collector --bench status_read -- --nodes 5000 --runs 9
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use capwatch_collector::ledger::{BucketDelta, Commit, Ledger, NodeCursor, Reader};
use capwatch_collector::usage::recent::{Window, read, read_kept};

const MINUTE: i64 = 60;
const DAY: i64 = 86_400;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

/// One minute of every node: 8 GPUs at 500 W.
fn minute(nodes: usize, at: i64) -> Commit {
    let mut c = Commit::default();
    for n in 0..nodes {
        let node: Arc<str> = Arc::from(format!("node-{n:05}"));
        let tenant: Arc<str> = Arc::from(if n % 2 == 0 { "lab-a" } else { "lab-b" });
        c.nodes.insert(node.clone(), NodeCursor::default());
        c.buckets.insert(
            (tenant, node, at),
            BucketDelta {
                energy_mj: 8 * 500 * 60 * 1000,
                gpu_ns: 8 * 60 * 1_000_000_000,
                busy_gpu_ns: 4 * 60 * 1_000_000_000,
                samples: 8 * 60,
                expected_gpu_ns: 8 * 60 * 1_000_000_000,
                ..BucketDelta::default()
            },
        );
    }
    c
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let nodes = arg("--nodes", 1_000);
    let runs = arg("--runs", 5);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("ledger.db");
    let mut ledger = Ledger::create(&path).expect("a new ledger");
    let now = 20_000 * DAY + 3 * 3600;
    let lag = 20 * MINUTE;
    let filled = Instant::now();
    // A day of minutes, an hour per commit.
    for hour in 0..24 {
        let mut c = Commit::default();
        for m in 0..60 {
            let at = now - DAY + (hour * 60 + m) * MINUTE;
            let one = minute(nodes, at);
            c.nodes.extend(one.nodes);
            c.buckets.extend(one.buckets);
        }
        let end = now - DAY + (hour + 1) * 3600;
        ledger.commit_at(&c, end, end - lag).expect("commit");
    }
    eprintln!(
        "{} minute rows of {nodes} nodes written in {:.1} s",
        nodes * 1440,
        filled.elapsed().as_secs_f64()
    );
    let reader = Reader::open(&path).expect("a reader");
    let mut whole = Vec::new();
    let mut kept_reads = Vec::new();
    let mut kept = None;
    let mut at = now;
    read_kept(&reader, None, &Window::last_day(at, 300), &mut kept).expect("first read");
    for _ in 0..runs {
        ledger
            .commit_at(&minute(nodes, at), at + MINUTE, at + MINUTE - lag)
            .expect("commit");
        at += MINUTE;
        let w = Window::last_day(at, 300);
        let t = Instant::now();
        let all = read(&reader, None, &w).expect("whole read");
        whole.push(t.elapsed());
        let t = Instant::now();
        let again = read_kept(&reader, None, &w, &mut kept).expect("kept read");
        kept_reads.push(t.elapsed());
        assert_eq!(all.minutes, again.minutes, "the kept read differs");
    }
    println!(
        "nodes {nodes}: whole read median {:.1} ms, from kept minutes {:.1} ms ({runs} runs)",
        median(whole).as_secs_f64() * 1000.0,
        median(kept_reads).as_secs_f64() * 1000.0
    );
}
