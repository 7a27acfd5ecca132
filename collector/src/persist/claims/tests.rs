//! Claims at a Hello and fenced commits, through the state, the committer
//! and a real SQLite ledger, with a second holder writing the same ledger
//! directly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::*;
use crate::edge::{GpuReading, NodeSample};
use crate::ledger::sqlite::LOCAL_HOLDER;
use crate::ledger::{self, BucketDelta, Commit, GpuCursor, NodeCursor};
use crate::persist::committer::commit_once;
use crate::state::{GpuInfo, Hello, State, StateConfig, StreamHandle};
use crate::sync;
use crate::tenants::Tenants;

/// Each GPU counts this much per second.
const MJ_PER_S: u64 = 500;
const COUNTER0: u64 = 1_000_000;
/// Each node's whole-node source (a BMC's counter) counts this much per
/// second.
const NODE_MJ_PER_S: u64 = 2_000;
const NODE_COUNTER0: u64 = 50_000_000;

struct Site {
    state: State,
    writer: Arc<Mutex<ledger::Ledger>>,
    claims: HolderClaims<ledger::Ledger>,
    committed: watch::Sender<u64>,
    t0: i64,
    dir: Arc<tempfile::TempDir>,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let writer = Arc::new(Mutex::new(
            ledger::Ledger::create(&dir.path().join("ledger.db")).unwrap(),
        ));
        Self::on(writer, Arc::new(dir), LOCAL_HOLDER)
    }

    /// A second collector, `holder`, on the same ledger as `other`.
    fn beside(other: &Site, holder: &str) -> Self {
        let mut site = Self::on(other.writer.clone(), other.dir.clone(), holder);
        site.t0 = other.t0;
        site
    }

    fn on(writer: Arc<Mutex<ledger::Ledger>>, dir: Arc<tempfile::TempDir>, holder: &str) -> Self {
        let state = State::new(
            StateConfig {
                stale_after: None,
                max_gpus_per_node: 8,
                max_clock_skew: Duration::from_secs(600),
                max_sample_age: Duration::from_secs(7 * 86_400),
            },
            Tenants::empty(),
        );
        Self {
            state,
            claims: HolderClaims {
                writer: writer.clone(),
                holder: Arc::from(holder),
            },
            writer,
            committed: watch::channel(0).0,
            t0: (sync::now_unix() - 600).div_euclid(60) * 60,
            dir,
        }
    }

    /// What the ingest path does at a Hello: claim, adopt, admit.
    fn hello(&self, node: &str) -> (StreamHandle, u64) {
        let generation = self
            .claims
            .claim_node(node, &mut |c| {
                self.state.adopt_claim(node, c);
            })
            .unwrap();
        let admitted = self.state.hello(one_gpu_hello(node)).unwrap();
        self.state.set_claim_generations(&[(node, generation)]);
        admitted
    }

    fn ts(&self, seq: u64) -> i64 {
        (self.t0 + seq as i64) * 1_000_000_000
    }

    /// Samples `seqs` of a GPU whose counter moves `MJ_PER_S` a second.
    fn samples(&self, seqs: std::ops::RangeInclusive<u64>) -> Vec<NodeSample> {
        samples(self.t0, seqs)
    }

    fn send(&self, h: &StreamHandle, seqs: std::ops::RangeInclusive<u64>) {
        self.state
            .ingest(h, self.samples(seqs), Vec::new())
            .unwrap();
    }

    /// Another collector, `collector-b`, claims n1 and commits its seconds
    /// `seqs` (all in one minute), from the cursor this collector left at
    /// the second before them. Returns the generation of its claim.
    fn other_holder_commits_n1(&self, seqs: std::ops::RangeInclusive<u64>) -> u64 {
        let (from, to) = (*seqs.start(), *seqs.end());
        let minute = self.ts(to).div_euclid(60_000_000_000) * 60;
        assert_eq!(
            minute,
            self.ts(from).div_euclid(60_000_000_000) * 60,
            "seconds {from}-{to} in one minute"
        );
        let mut w = sync::lock(&self.writer);
        let generation = w.claim("collector-b", "n1").unwrap().generation;
        let node: Arc<str> = Arc::from("n1");
        let tenant: Arc<str> = Arc::from("unassigned");
        let mut c = Commit::default();
        c.nodes.insert(
            node.clone(),
            NodeCursor {
                stretch: Vec::new(),
                power: vec![(
                    Arc::from("mock/node"),
                    GpuCursor {
                        changed_ns: None,
                        last_counter_mj: Some(NODE_COUNTER0 + NODE_MJ_PER_S * to),
                        last_timestamp_ns: Some(self.ts(to)),
                        remainder_mw_ns: 0,
                        energy_mj: (to - 1) * NODE_MJ_PER_S,
                        counter_resets: 0,
                    },
                )],
                epoch: 1,
                last_seq: to,
                gpus: vec![(
                    Arc::from("GPU-n1"),
                    GpuCursor {
                        changed_ns: None,
                        last_counter_mj: Some(COUNTER0 + MJ_PER_S * to),
                        last_timestamp_ns: Some(self.ts(to)),
                        remainder_mw_ns: 0,
                        energy_mj: (to - 1) * MJ_PER_S,
                        counter_resets: 0,
                    },
                )],
            },
        );
        let seconds = to - from + 1;
        c.buckets.insert(
            (tenant.clone(), node, minute),
            BucketDelta {
                energy_mj: seconds * MJ_PER_S,
                node_energy_mj: seconds * NODE_MJ_PER_S,
                node_ns: seconds * 1_000_000_000,
                samples: seconds,
                ..BucketDelta::default()
            },
        );
        c.tenant_energy.insert(tenant, seconds * MJ_PER_S);
        w.commit_as("collector-b", &c, sync::now_unix(), 0).unwrap();
        generation
    }

    /// One commit; panics if it is handed back as failed.
    fn commit(&self) {
        let failed = commit_once(
            &self.state,
            &*self.writer,
            &self.claims.holder,
            None,
            &self.committed,
            Duration::from_secs(86_400),
        );
        assert!(failed.is_none(), "commit failed: {failed:?}");
    }

    /// The whole-node energy the ledger holds for `node`.
    fn node_source_energy(&self, node: &str) -> u64 {
        let db = rusqlite::Connection::open(self.dir.path().join("ledger.db")).unwrap();
        db.query_row(
            "SELECT COALESCE(SUM(node_energy_mj), 0) FROM usage_minute WHERE node = ?1",
            [node],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64
    }

    /// The energy the ledger holds for `node`: its minute buckets and
    /// adjustments.
    fn node_energy(&self, node: &str) -> u64 {
        let db = rusqlite::Connection::open(self.dir.path().join("ledger.db")).unwrap();
        ["usage_minute", "adjustment"]
            .iter()
            .map(|t| {
                db.query_row(
                    &format!("SELECT COALESCE(SUM(energy_mj), 0) FROM {t} WHERE node = ?1"),
                    [node],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap() as u64
            })
            .sum()
    }

    fn cursor(&self, node: &str) -> Option<NodeCursor> {
        let snap = sync::lock(&self.writer).load().unwrap();
        snap.nodes
            .into_iter()
            .find(|(n, _)| n == node)
            .map(|(_, c)| c)
    }
}

/// Invariant (fencing): a commit naming a node another holder has
/// claimed since writes nothing of that node; the rest of it commits, the
/// node's stream ends, and when its agent says Hello again the node comes
/// back at a new generation from the ledger's cursor, so re-sent samples
/// count once and the ledger balances to the millijoule.
#[test]
fn a_fenced_node_is_dropped_from_the_commit_and_claimed_back_from_the_ledger_cursor() {
    let site = Site::new();
    let (h1, _) = site.hello("n1");
    let (h2, _) = site.hello("n2");
    site.send(&h1, 1..=10);
    site.send(&h2, 1..=10);
    site.commit();
    assert_eq!(site.node_energy("n1"), 9 * MJ_PER_S);

    // This collector gathers seconds 11-15 of n1 (not yet committed)...
    site.send(&h1, 11..=15);
    site.send(&h2, 11..=15);
    // ...while another collector claims n1 and commits seconds 11-12,
    // which the agent sent it meanwhile.
    assert_eq!(site.other_holder_commits_n1(11..=12), 2);

    // This collector's next commit is fenced for n1: nothing of n1 from
    // it is written, n2 commits, n1's stream ends; readiness stays.
    site.commit();
    assert_eq!(
        site.state
            .counters
            .nodes_fenced
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(site.state.readiness.not_ready(), None);
    assert_eq!(
        site.node_energy("n1"),
        11 * MJ_PER_S,
        "only collector-b's seconds 11-12"
    );
    assert_eq!(site.node_source_energy("n1"), 11 * NODE_MJ_PER_S);
    assert_eq!(site.cursor("n1").unwrap().last_seq, 12);
    assert_eq!(site.node_energy("n2"), 14 * MJ_PER_S);
    assert!(h1.claim_lost(), "n1's stream must end");
    assert!(!h2.claim_lost());

    // n1's agent says Hello again (acked up to 10): the claim moves n1
    // back at a new generation, and the fleet resumes from the ledger.
    let (h1, acked) = site.hello("n1");
    assert_eq!(
        acked, 12,
        "the ledger's cursor, not this collector's memory"
    );
    assert_eq!(
        sync::lock(&site.writer)
            .claim(LOCAL_HOLDER, "n1")
            .unwrap()
            .generation,
        3
    );
    site.send(&h1, 11..=20);
    site.send(&h2, 16..=20);
    site.commit();
    // Ground truth: the counter moved 19 intervals on each node.
    assert_eq!(site.node_energy("n1"), 19 * MJ_PER_S);
    assert_eq!(site.node_energy("n2"), 19 * MJ_PER_S);
    // The node's power source resumed from the ledger's cursor (collector-b's),
    // not from what this collector had counted before it was fenced.
    assert_eq!(site.node_source_energy("n1"), 19 * NODE_MJ_PER_S);
    assert_eq!(site.node_source_energy("n2"), 19 * NODE_MJ_PER_S);
    let power = site.cursor("n1").unwrap().power;
    assert_eq!(power.len(), 1);
    assert_eq!(
        power[0].1.last_counter_mj,
        Some(NODE_COUNTER0 + 20 * NODE_MJ_PER_S)
    );
    let w = sync::lock(&site.writer);
    assert_eq!(
        w.load().unwrap().tenant_energy,
        vec![("unassigned".to_string(), 38 * MJ_PER_S)]
    );
    assert_eq!(
        w.bucket_totals("unassigned").unwrap().energy_mj,
        38 * MJ_PER_S
    );
    drop(w);
    // The tenant's total is the ledger's, collector-b's part included:
    // every collector shows the same.
    assert_eq!(
        site.state.totals()[&Arc::<str>::from("unassigned")].energy_millijoules,
        38 * MJ_PER_S
    );
}

/// A reconnect to the same collector keeps the generation and the
/// in-memory state: nothing pending is lost.
#[test]
fn a_reconnect_to_the_same_collector_keeps_its_generation_and_pending_bookings() {
    let site = Site::new();
    let (h, _) = site.hello("n1");
    site.send(&h, 1..=5);
    site.commit();
    site.send(&h, 6..=8);
    // The agent reconnects before the commit holding 6-8.
    let (h2, acked) = site.hello("n1");
    assert_eq!(acked, 8, "what this collector applied");
    assert!(!h.claim_lost() && !h2.claim_lost());
    assert_eq!(
        sync::lock(&site.writer)
            .claim(LOCAL_HOLDER, "n1")
            .unwrap()
            .generation,
        1
    );
    site.send(&h2, 6..=10);
    site.commit();
    assert_eq!(site.node_energy("n1"), 9 * MJ_PER_S);
    assert_eq!(site.cursor("n1").unwrap().last_seq, 10);
}

/// Invariant (fencing): bookings the committer already holds (a commit it
/// took, or one that failed and waits for a retry) when a Hello claims
/// their node back at a new generation are not written under the new
/// claim: they were counted from a cursor another holder moved on from.
#[test]
fn bookings_the_committer_holds_from_an_older_generation_are_not_written() {
    let site = Site::new();
    let (h, _) = site.hello("n1");
    site.send(&h, 1..=10);
    site.commit();
    site.send(&h, 11..=15);
    // The committer takes 11-15 (its write then fails, say).
    let held = site.state.take_pending();
    // Another holder claims n1 and commits 11-15 itself; then the agent
    // comes back here.
    site.other_holder_commits_n1(11..=15);
    let (h, acked) = site.hello("n1");
    assert_eq!(acked, 15);
    site.send(&h, 16..=20);
    // The retry carries what the committer held: n1's part of it is dropped.
    let failed = commit_once(
        &site.state,
        &*site.writer,
        LOCAL_HOLDER,
        Some(held),
        &site.committed,
        Duration::from_secs(86_400),
    );
    assert!(failed.is_none(), "{failed:?}");
    assert_eq!(site.node_energy("n1"), 19 * MJ_PER_S, "seconds 11-15 once");
    assert_eq!(site.cursor("n1").unwrap().last_seq, 20);
}

/// Invariant (fencing): once a Hello claims a node back at a new
/// generation, a batch of a stream admitted under the old claim (one that
/// passed its `claim_lost` check just before) is refused as superseded
/// under the node's lock: it books nothing and moves no sequence number,
/// so the next Welcome acks only what the ledger holds.
#[test]
fn a_stream_of_the_old_claim_books_nothing_after_its_node_is_claimed_back() {
    let site = Site::new();
    let (old, _) = site.hello("n1");
    site.send(&old, 1..=5);
    site.commit();
    // Another holder takes n1; then a Hello here claims it back at
    // generation 3 and the fleet adopts the ledger's cursor...
    sync::lock(&site.writer).claim("collector-b", "n1").unwrap();
    site.claims
        .claim_node("n1", &mut |c| {
            assert!(site.state.adopt_claim("n1", c));
        })
        .unwrap();
    // ...and before that Hello is admitted, a batch of the old stream
    // (past its `claim_lost` check already) reaches the node.
    assert!(
        site.state
            .ingest(&old, site.samples(6..=8), Vec::new())
            .is_err(),
        "a stream of the old claim is superseded"
    );
    // The Hello is admitted (same generation now: nothing adopted again)
    // and acks what the ledger holds.
    let (_new, acked) = site.hello("n1");
    assert_eq!(acked, 5, "the old stream moved no sequence number");
    site.commit();
    assert_eq!(site.node_energy("n1"), 4 * MJ_PER_S);
}

/// A fenced node is fenced once: what its streams booked after the
/// committer took the fenced commit leaves the pending one too, and a
/// batch they send after the fence is refused, so the next commit does
/// not name the node again.
#[test]
fn a_fenced_node_is_fenced_once_and_its_streams_book_nothing_more() {
    let site = Site::new();
    let (h1, _) = site.hello("n1");
    let (h2, _) = site.hello("n2");
    site.send(&h1, 1..=5);
    site.send(&h2, 1..=5);
    site.commit();
    site.send(&h1, 6..=8);
    // The committer takes 6-8; n1 books 9-10 meanwhile; the write is
    // fenced for n1 (another holder claimed it).
    let (_, mut taken) = site.state.take_pending();
    site.send(&h1, 9..=10);
    sync::lock(&site.writer).claim("collector-b", "n1").unwrap();
    site.state.fence_node(&mut taken, "n1");
    assert!(!taken.nodes.contains_key("n1"));
    assert!(h1.claim_lost());
    assert!(
        site.state
            .ingest(&h1, site.samples(11..=11), Vec::new())
            .is_err()
    );
    site.send(&h2, 6..=8);
    // The next commit holds n2 only: no second fence.
    site.commit();
    assert_eq!(
        site.state
            .counters
            .nodes_fenced
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "n1 is not in the next commit"
    );
    assert_eq!(site.node_energy("n1"), 4 * MJ_PER_S);
    assert_eq!(site.node_energy("n2"), 7 * MJ_PER_S);
    // The total is what the ledger holds: what this collector committed.
    assert_eq!(
        site.state.totals()[&Arc::<str>::from("unassigned")].energy_millijoules,
        11 * MJ_PER_S
    );
}

/// Invariant (fencing): a holder is new at every start, so a restarted
/// collector never takes its predecessor's claims for its own.
#[test]
fn a_holder_id_is_the_collector_id_and_random_digits_new_at_every_start() {
    let a = new_holder("collector-a").unwrap();
    let b = new_holder("collector-a").unwrap();
    assert_ne!(a, b);
    for h in [&a, &b] {
        let digits = h.strip_prefix("collector-a/").unwrap();
        assert_eq!(digits.len(), 16, "{h}");
        assert!(digits.chars().all(|c| c.is_ascii_hexdigit()), "{h}");
    }
}

/// Restore rule at a claim: a GPU in two nodes' cursors (it moved) resumes
/// only on the node where it was heard last, also when its older node is
/// claimed at its Hello (the start-up restore claims nothing, so each
/// node's cursor comes from its claim).
#[test]
fn a_claim_does_not_resume_a_gpu_heard_later_on_another_node() {
    let site = Site::new();
    let gpu = |t: i64| GpuCursor {
        changed_ns: None,
        last_counter_mj: Some(COUNTER0),
        last_timestamp_ns: Some(t),
        remainder_mw_ns: 0,
        energy_mj: 0,
        counter_resets: 0,
    };
    let mut c = Commit::default();
    // GPU-x was on n1, then moved to n2 and was heard there later.
    for (node, t) in [("n1", site.ts(1)), ("n2", site.ts(5))] {
        c.nodes.insert(
            Arc::from(node),
            NodeCursor {
                stretch: Vec::new(),
                power: Vec::new(),
                epoch: 1,
                last_seq: 5,
                gpus: vec![(Arc::from("GPU-x"), gpu(t))],
            },
        );
    }
    sync::lock(&site.writer)
        .commit_as("collector-b", &c, sync::now_unix(), 0)
        .unwrap();
    site.state
        .restore(sync::lock(&site.writer).restore().unwrap());
    let departed = |node: &str| -> Vec<String> {
        let n = site.state.node(node).unwrap();
        let n = sync::lock(&n);
        n.departed().iter().map(|g| g.uuid().to_string()).collect()
    };
    assert_eq!(departed("n1"), Vec::<String>::new());
    assert_eq!(departed("n2"), vec!["GPU-x".to_string()]);
    for node in ["n1", "n2"] {
        site.claims
            .claim_node(node, &mut |c| {
                site.state.adopt_claim(node, c);
            })
            .unwrap();
    }
    assert_eq!(departed("n1"), Vec::<String>::new(), "heard later on n2");
    assert_eq!(departed("n2"), vec!["GPU-x".to_string()]);
}

/// Claims queued while a round waits for the writer (behind a commit, or
/// many Hellos at once after a restart) are made together: one
/// `claim_nodes` transaction per round, each Hello answered with its
/// node's generation.
#[test]
fn claims_queued_meanwhile_are_made_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let writer = crate::persist::faulty::Faulty::new(
        ledger::Ledger::create(&dir.path().join("ledger.db")).unwrap(),
    );
    let rounds = writer.claim_rounds.clone();
    let writer = Arc::new(Mutex::new(writer));
    let state = Arc::new(State::new(
        StateConfig {
            stale_after: None,
            max_gpus_per_node: 8,
            max_clock_skew: Duration::from_secs(600),
            max_sample_age: Duration::from_secs(7 * 86_400),
        },
        Tenants::empty(),
    ));
    let queue = ClaimQueue::start(
        HolderClaims {
            writer: writer.clone(),
            holder: Arc::from("collector-a/1"),
        },
        state,
    )
    .unwrap();
    // The writer is busy (a commit, say) while 500 Hellos ask for claims.
    let busy = sync::lock(&writer);
    let answers: Vec<ClaimAnswer> = (0..500)
        .map(|i| queue.claim(&format!("n{i}")))
        .chain([queue.claim("n7")])
        .collect();
    drop(busy);
    for a in answers {
        assert_eq!(a.blocking_recv().unwrap().unwrap(), 1);
    }
    let rounds = sync::lock(&rounds).clone();
    // The first round may have taken the first claim alone, before the
    // others were queued; the rest wait for the writer together.
    assert!(rounds.len() <= 2, "{rounds:?}");
    assert_eq!(rounds.iter().sum::<usize>(), 500, "n7 claimed once");
}

/// Invariant (fencing), two collectors on one ledger: collector B claims a
/// node while A has samples of it pending. A's commit is fenced for that
/// node only (its other node commits), A's stream of it ends acking
/// nothing more, and B's commit of the samples the agent re-sends books
/// each sample once: the ledger holds the counter's delta exactly, and
/// both collectors show the same tenant total, the ledger's.
#[test]
fn a_node_claimed_by_another_collector_is_booked_once_across_both() {
    let a = Site::beside(&Site::new(), "collector-a/0000000000000001");
    let b = Site::beside(&a, "collector-b/0000000000000002");
    let (a1, _) = a.hello("n1");
    let (a2, _) = a.hello("n2");
    a.send(&a1, 1..=10);
    a.send(&a2, 1..=10);
    a.commit();
    let acked_by_a = *a.committed.borrow();
    // A applies 11-15 of both nodes; before A commits, n1's agent moves to
    // B (acked up to 10 by A).
    a.send(&a1, 11..=15);
    a.send(&a2, 11..=15);
    let (b1, acked) = b.hello("n1");
    assert_eq!(acked, 10, "B resumes from the ledger's cursor");
    // A's commit: fenced for n1 only.
    a.commit();
    assert_eq!(
        a.state
            .counters
            .nodes_fenced
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(a1.claim_lost(), "A's stream of n1 ends");
    assert!(!a2.claim_lost());
    assert_eq!(a.state.connected(), 1, "only n2 streams to A");
    assert!(*a.committed.borrow() > acked_by_a, "n2's part committed");
    assert_eq!(a.node_energy("n1"), 9 * MJ_PER_S, "nothing of A's 11-15");
    assert_eq!(a.cursor("n1").unwrap().last_seq, 10);
    assert_eq!(a.node_energy("n2"), 14 * MJ_PER_S);
    // The agent re-sends everything A did not ack, and more, to B.
    b.send(&b1, 11..=20);
    b.commit();
    // Ground truth: the counter moved 19 intervals.
    assert_eq!(b.node_energy("n1"), 19 * MJ_PER_S);
    assert_eq!(b.cursor("n1").unwrap().last_seq, 20);
    assert_eq!(b.node_source_energy("n1"), 19 * NODE_MJ_PER_S);
    assert_eq!(a.node_source_energy("n2"), 14 * NODE_MJ_PER_S);
    // A's next commit (n2 only, or nothing) is not fenced again, and
    // reads the ledger's totals: both show the same, B's commits included.
    a.commit();
    let total = |s: &Site| s.state.totals()[&Arc::<str>::from("unassigned")].energy_millijoules;
    assert_eq!(total(&a), 33 * MJ_PER_S);
    assert_eq!(total(&b), 33 * MJ_PER_S);
    assert_eq!(
        sync::lock(&a.writer)
            .bucket_totals("unassigned")
            .unwrap()
            .energy_mj,
        33 * MJ_PER_S
    );
}

/// Invariant (fencing): a claim made but whose answer was lost (A back
/// from B, the claim written as A's at a new generation) must not let
/// the bookings A held from its earlier claim pass the fence as A's: A
/// gives its claim up (what a failed claim round does), so its commit
/// writes nothing of the node, and its next Hello resumes from the
/// ledger's cursor. Each second is booked once.
#[test]
fn bookings_from_before_a_claim_whose_answer_was_lost_are_not_written() {
    let site = Site::new();
    let (h, _) = site.hello("n1");
    site.send(&h, 1..=10);
    site.commit();
    // 11-15 wait here while the agent moves to collector-b, which books
    // 11-12; then the agent comes back here.
    site.send(&h, 11..=15);
    site.other_holder_commits_n1(11..=12);
    // The claim back is written (this collector's, generation 3)...
    let made = sync::lock(&site.writer).claim(LOCAL_HOLDER, "n1").unwrap();
    assert_eq!(made.generation, 3);
    // ...but its answer is lost: the round gives the node up.
    site.state.abandon_claim("n1");
    assert!(h.claim_lost(), "the node's stream ends");
    site.commit();
    assert_eq!(
        site.node_energy("n1"),
        11 * MJ_PER_S,
        "11-15 from before the claim were written under it"
    );
    let (h, acked) = site.hello("n1");
    assert_eq!(acked, 12, "the ledger's cursor");
    site.send(&h, 13..=20);
    site.commit();
    assert_eq!(site.node_energy("n1"), 19 * MJ_PER_S);
}

/// A claim round whose answer is lost gives up each node of the round:
/// their streams end and what they had pending is dropped.
#[test]
fn a_claim_round_whose_answer_was_lost_gives_its_nodes_up() {
    let dir = tempfile::tempdir().unwrap();
    let writer = crate::persist::faulty::Faulty::new(
        ledger::Ledger::create(&dir.path().join("ledger.db")).unwrap(),
    );
    let lose = writer.lose_claim_answers.clone();
    let writer = Arc::new(Mutex::new(writer));
    let site = Site::new();
    let state = Arc::new(site.state);
    let (h, _) = state.hello(one_gpu_hello("n1")).unwrap();
    state
        .ingest(&h, samples(site.t0, 1..=5), Vec::new())
        .unwrap();
    let queue = ClaimQueue::start(
        HolderClaims {
            writer,
            holder: Arc::from("collector-a/1"),
        },
        state.clone(),
    )
    .unwrap();
    lose.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(queue.claim("n1").blocking_recv().unwrap().is_err());
    assert!(h.claim_lost(), "n1's stream must end");
    let (_, pending) = state.take_pending();
    assert!(
        pending.nodes.is_empty() && pending.buckets.is_empty(),
        "{pending:?}"
    );
    // No other collector is known to hold n1: it keeps its series here
    // (an agent that is down must still show down).
    let text = crate::metrics::render_text(&state, crate::metrics::Detail::ALL);
    assert!(text.contains("node=\"n1\""), "n1 left the metrics:\n{text}");
}

/// The Hello of `node` with one GPU, `GPU-<node>`, that has a counter.
fn one_gpu_hello(node: &str) -> Hello {
    Hello {
        node_power_sources: vec![crate::edge::NodePowerSource {
            kind: "mock".into(),
            domain: "node".into(),
            name: "node".into(),
            energy_counter_supported: true,
            interval: Duration::from_secs(1),
        }],
        node_id: node.into(),
        agent_version: "test".into(),
        epoch: 1,
        interval: Duration::from_secs(1),
        gpus: vec![GpuInfo {
            uuid: format!("GPU-{node}"),
            model: "H200".into(),
            power_limit_milliwatts: Some(700_000),
            memory_total_bytes: None,
            energy_counter_supported: true,
            identity: Default::default(),
            mig: Default::default(),
            mig_layout: None,
            earlier_mig: Vec::new(),
        }],
    }
}

/// Samples `seqs` (second `seq` after `t0`) of a GPU whose counter moves
/// `MJ_PER_S` a second.
fn samples(t0: i64, seqs: std::ops::RangeInclusive<u64>) -> Vec<NodeSample> {
    seqs.map(|seq| NodeSample {
        node_power: vec![crate::edge::NodePowerReading {
            source: 0,
            timestamp_unix_nanos: (t0 + seq as i64) * 1_000_000_000,
            power_milliwatts: Some(2_000_000),
            energy_millijoules: Some(NODE_COUNTER0 + NODE_MJ_PER_S * seq),
        }],
        seq,
        timestamp_unix_nanos: (t0 + seq as i64) * 1_000_000_000,
        gpus: vec![GpuReading {
            index: 0,
            power_milliwatts: Some(500_000),
            energy_millijoules: Some(COUNTER0 + MJ_PER_S * seq),
            ..GpuReading::default()
        }],
        host: None,
    })
    .collect()
}

/// The series of `node` in `site`'s `/metrics`, and its tenant's stale
/// GPU count there.
fn exported(site: &Site, node: &str) -> (Vec<String>, String) {
    let text = crate::metrics::render_text(&site.state, crate::metrics::Detail::ALL);
    let label = format!("node=\"{node}\"");
    let series = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
        .map(str::to_string)
        .collect();
    let stale = text
        .lines()
        .find(|l| l.starts_with("capwatch_tenant_gpus{tenant=\"unassigned\",state=\"stale\"}"))
        .unwrap_or_else(|| panic!("{text}"))
        .to_string();
    (series, stale)
}

/// The value of `family`'s series of `node` in `series`.
fn value_of(series: &[String], family: &str) -> f64 {
    let line = series
        .iter()
        .find(|l| l.starts_with(&format!("{family}{{")))
        .unwrap_or_else(|| panic!("no {family} in {series:?}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A node whose commit was fenced (its agent moved to another collector)
/// leaves the series of the collector it left: no `capwatch_node_*` or
/// `capwatch_gpu_*` series, and its GPUs no longer count as the tenant's
/// stale GPUs there (`CapwatchGpusStale` is per collector), while the
/// collector it moved to shows it. When it comes back, its GPU energy
/// counter goes on from the ledger's count, above what either showed.
#[test]
fn a_node_that_moved_to_another_collector_leaves_its_metrics() {
    let a = Site::beside(&Site::new(), "collector-a/0000000000000001");
    let b = Site::beside(&a, "collector-b/0000000000000002");
    let (a1, _) = a.hello("n1");
    let (a2, _) = a.hello("n2");
    a.send(&a1, 1..=10);
    a.send(&a2, 1..=10);
    a.commit();
    let (before, stale) = exported(&a, "n1");
    assert!(!before.is_empty());
    // The samples are minutes old: both nodes' GPUs are stale at A.
    assert!(stale.ends_with(" 2"), "{stale}");
    let energy_at_a = value_of(&before, "capwatch_gpu_energy_joules_total");

    // n1's agent moves to B while A has 11-15 pending: A's commit is
    // fenced for n1.
    a.send(&a1, 11..=15);
    let (b1, _) = b.hello("n1");
    a.commit();
    assert!(a1.claim_lost());
    let (left, stale) = exported(&a, "n1");
    assert_eq!(left, Vec::<String>::new(), "A still exports n1");
    assert!(stale.ends_with(" 1"), "only n2's GPU at A: {stale}");
    assert!(!exported(&a, "n2").0.is_empty(), "n2 stays at A");
    b.send(&b1, 11..=20);
    b.commit();
    let (at_b, stale_b) = exported(&b, "n1");
    assert!(stale_b.ends_with(" 1"), "{stale_b}");
    let energy_at_b = value_of(&at_b, "capwatch_gpu_energy_joules_total");
    assert!(
        energy_at_b > energy_at_a,
        "{energy_at_b} after {energy_at_a}"
    );

    // Back to A (a failback): A shows n1 again, its counter going on
    // from the ledger's count (B's seconds included), never back.
    let (a1, _) = a.hello("n1");
    assert!(!exported(&a, "n1").0.is_empty());
    a.send(&a1, 21..=21);
    let back = value_of(&exported(&a, "n1").0, "capwatch_gpu_energy_joules_total");
    assert_eq!(back, (20 * MJ_PER_S) as f64 / 1000.0);
    assert!(back > energy_at_b);
}

/// A node that leaves with nothing pending (its stream here ended with
/// every sample committed, then its agent said Hello to another
/// collector) is never fenced here: the committer's periodic question to
/// the ledger finds another holder on it, and it leaves this collector's
/// series too. A node whose stream ended and that nobody else claimed (its
/// agent is down) stays, at `capwatch_node_up` 0 with its GPUs stale.
#[test]
fn a_node_that_left_with_nothing_pending_leaves_the_metrics_once_claimed_elsewhere() {
    let a = Site::beside(&Site::new(), "collector-a/0000000000000001");
    let b = Site::beside(&a, "collector-b/0000000000000002");
    let (a1, _) = a.hello("n1");
    let (a2, _) = a.hello("n2");
    a.send(&a1, 1..=10);
    a.send(&a2, 1..=10);
    a.commit();
    a.state.disconnect(&a1);
    a.state.disconnect(&a2);
    let check = |s: &Site| {
        crate::persist::committer::find_nodes_that_left(&s.state, &*s.writer, &s.claims.holder)
    };
    // Nobody else holds either: both stay.
    check(&a);
    assert!(!exported(&a, "n1").0.is_empty());
    assert!(!exported(&a, "n2").0.is_empty());

    let (b1, _) = b.hello("n1");
    b.send(&b1, 11..=12);
    b.commit();
    a.commit();
    assert_eq!(
        a.state
            .counters
            .nodes_fenced
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "nothing of n1 was pending at A"
    );
    assert!(!exported(&a, "n1").0.is_empty(), "before the check");
    check(&a);
    let (left, stale) = exported(&a, "n1");
    assert_eq!(left, Vec::<String>::new(), "A still exports n1");
    assert!(stale.ends_with(" 1"), "only n2's GPU at A: {stale}");
    assert!(
        !exported(&a, "n2").0.is_empty(),
        "n2's agent is down: it stays"
    );
    // B, the holder, keeps it whatever it checks.
    b.state.disconnect(&b1);
    check(&b);
    assert!(!exported(&b, "n1").0.is_empty());

    // Back to A: shown again, and counted from the ledger's cursor.
    let (a1, acked) = a.hello("n1");
    assert_eq!(acked, 12);
    a.send(&a1, 13..=13);
    let back = value_of(&exported(&a, "n1").0, "capwatch_gpu_energy_joules_total");
    assert_eq!(back, (12 * MJ_PER_S) as f64 / 1000.0);
}
