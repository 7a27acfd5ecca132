//! Several collectors on one ledger: what each start and each commit
//! leaves to the others. With SQLite the processes take turns (one writer
//! per file); the other collector here writes the ledger directly, as
//! itself.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::collections::BTreeMap;
use std::sync::Arc;

use capwatch_collector::ledger::{Commit, GpuCursor, Ledger, LedgerWriter, NodeCursor};

use crate::support::*;

/// A commit of node `n1`'s cursor at sequence `seq`.
fn n1_at(seq: u64) -> Commit {
    let mut c = Commit::default();
    c.nodes.insert(
        Arc::from("n1"),
        NodeCursor {
            epoch: 1,
            last_seq: seq,
            power: Vec::new(),
            stretch: Vec::new(),
            gpus: vec![(
                Arc::from("GPU-n1"),
                GpuCursor {
                    last_counter_mj: Some(1_000 + seq),
                    last_timestamp_ns: Some(now_nanos()),
                    remainder_mw_ns: 0,
                    energy_mj: seq,
                    counter_resets: 0,
                    changed_ns: None,
                },
            )],
        },
    );
    c
}

/// `capwatch_collector_info`'s labels.
fn info(collector: &Collector) -> BTreeMap<String, String> {
    let m = collector.metrics();
    let found = m.select("capwatch_collector_info", &[]);
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].0.clone()
}

/// Invariant (fencing): a collector's start claims no node. Another
/// collector that holds a node in the ledger keeps it, at the same
/// generation, and its next commit of it is not fenced; each start is a
/// holder of its own, named after `collector_id`.
#[test]
fn a_starting_collector_takes_no_node_another_collector_holds() {
    let dir = tempfile::tempdir().unwrap();
    init_ledger(dir.path());
    let path = dir.path().join("ledger.db");
    {
        let mut other = Ledger::open(&path).unwrap();
        assert_eq!(other.claim("collector-b", "n1").unwrap().generation, 1);
        other
            .commit_as("collector-b", &n1_at(10), now_secs(), 0)
            .unwrap();
    }
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut cmd = Collector::command(dir.path(), "", 0, &[]);
        cmd.env("CAPWATCH_COLLECTOR_ID", "collector-a");
        let collector = Collector::spawn(cmd);
        let labels = info(&collector);
        assert_eq!(labels["collector_id"], "collector-a");
        assert_eq!(labels["ledger_backend"], "sqlite");
        assert!(labels["holder"].starts_with("collector-a/"), "{labels:?}");
        holders.push(labels["holder"].clone());
        collector.stop();
    }
    assert_ne!(holders[0], holders[1], "a holder of its own at each start");
    let mut other = Ledger::open(&path).unwrap();
    let claim = other.claim("collector-b", "n1").unwrap();
    assert_eq!(claim.generation, 1, "n1 never changed holder");
    assert_eq!(claim.cursor.unwrap().last_seq, 10);
    other
        .commit_as("collector-b", &n1_at(11), now_secs(), 0)
        .expect("collector-b still holds n1");
}
