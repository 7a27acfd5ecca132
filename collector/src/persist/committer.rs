//! The committer: a thread of its own that writes what the streams
//! applied to the ledger (through `LedgerWriter` only), moves its
//! watermark, and tells the streams which commit is durable so they ack;
//! and, at start-up, what the collector resumes from the ledger (the
//! tenant file's history).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tracing::{error, info};

use crate::ledger::{self, LedgerError, LedgerWriter};
use crate::state::State;
use crate::sync;
use crate::tenants::{self, Tenants};

/// A tenant file version kept in the ledger that no longer reads.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid setting `tenant`: version {version} of the tenant file kept in the ledger: {reason}"
)]
pub struct StoredTenantFileError {
    /// 1-based, in load order.
    pub version: usize,
    pub reason: String,
}

/// What resuming from the ledger at start-up can fail on.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    TenantFile(#[from] StoredTenantFileError),
}

/// Rebuilds the tenant file's history from the ledger and puts the file
/// loaded now in it: a file that differs from the last one recorded takes
/// effect at its `effective_from`, or now, and is recorded first.
pub fn resume_tenant_history<W: LedgerWriter + ?Sized>(
    state: &State,
    ledger: &mut W,
) -> Result<(), ResumeError> {
    let current = state.tenants();
    let stored = ledger.tenant_versions()?;
    let history = tenant_history_of(&stored)?;
    // The text includes `effective_from`: the same text is the same version.
    let unchanged = stored.last().is_some_and(|v| v.file == current.source());
    let history = match history {
        Some(h) if unchanged => h,
        history => {
            let now = sync::unix_nanos_now();
            let from = current.effective_from_ns().unwrap_or(now);
            ledger.add_tenant_version(&ledger::TenantVersion {
                effective_from_ns: from,
                loaded_at_ns: now,
                file: current.source().to_string(),
            })?;
            info!(
                effective_from_ns = from,
                versions = stored.len() + 1,
                "tenant file version recorded"
            );
            match history {
                Some(mut h) => {
                    h.push(from, current);
                    h
                }
                None => tenants::TenantHistory::new(current),
            }
        }
    };
    state.set_tenant_history(history);
    Ok(())
}

/// The history of the tenant file versions recorded in a ledger (in load
/// order, each in force from its `effective_from_ns`); none when it has
/// none.
pub fn tenant_history_of(
    stored: &[ledger::TenantVersion],
) -> Result<Option<tenants::TenantHistory>, StoredTenantFileError> {
    let mut history: Option<tenants::TenantHistory> = None;
    for (i, v) in stored.iter().enumerate() {
        let t = Tenants::from_toml(&v.file).map_err(|e| StoredTenantFileError {
            version: i + 1,
            reason: e.to_string(),
        })?;
        match &mut history {
            None => history = Some(tenants::TenantHistory::new(Arc::new(t))),
            Some(h) => h.push(v.effective_from_ns, Arc::new(t)),
        }
    }
    Ok(history)
}

/// Commits what streams applied, every `every`, and tells the streams
/// which commit is durable so they can ack. A failed commit is retried
/// with what arrives next; nothing is acked meanwhile. Runs on a thread of
/// its own until `stop` is dropped: on the runtime, a commit that was done
/// in 50 ms waited up to 800 ms more for a worker to poll it while every
/// worker was busy with streams, and acks waited with it. Returns a commit
/// that could not be written. Each commit moves the ledger's watermark to
/// `finalize_grace` before the open minute (`finalize_through`).
pub fn commit_loop<W: LedgerWriter>(
    state: &State,
    ledger: &Mutex<W>,
    holder: &str,
    every: std::time::Duration,
    finalize_grace: std::time::Duration,
    committed: &watch::Sender<u64>,
    stop: &std::sync::mpsc::Receiver<()>,
) -> Option<(u64, ledger::Commit)> {
    let mut failed = None;
    let mut next = std::time::Instant::now() + every;
    let mut next_left_check = next + LEFT_CHECK_EVERY;
    loop {
        match stop.recv_timeout(next.saturating_duration_since(std::time::Instant::now())) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return failed,
        }
        failed = commit_once(state, ledger, holder, failed, committed, finalize_grace);
        // Not while commits fail: the ledger would not answer this either.
        if failed.is_none() && std::time::Instant::now() >= next_left_check {
            find_nodes_that_left(state, ledger, holder);
            next_left_check = std::time::Instant::now() + LEFT_CHECK_EVERY;
        }
        // A commit that took longer than the interval delays the next one
        // by a whole interval rather than starting commits back to back
        // (which would also keep compaction from the ledger).
        let now = std::time::Instant::now();
        next += every;
        if next <= now {
            next = now + every;
        }
    }
}

/// How often the committer asks the ledger who holds the nodes whose
/// streams here ended.
const LEFT_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The most nodes asked about in one ledger call (a check makes as many
/// calls as it needs, the writer's lock let go between them).
const LEFT_CHECK_MAX: usize = 10_000;

/// Asks the ledger who holds the nodes whose streams to this collector
/// ended: one another collector holds has moved there (its agent failed
/// over or back), and leaves this collector's series, so that it is not
/// shown down and its GPUs stale here while it streams there. A fenced
/// commit tells the same sooner; this finds the nodes that left with
/// nothing pending here. A failed read changes nothing (it is logged).
pub(crate) fn find_nodes_that_left<W: LedgerWriter>(
    state: &State,
    ledger: &Mutex<W>,
    holder: &str,
) {
    let ended = state.ended_streams();
    for chunk in ended.chunks(LEFT_CHECK_MAX) {
        let names: Vec<&str> = chunk.iter().map(|(n, _)| &**n).collect();
        let holders = match sync::lock(ledger).holders(&names) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(task = "committer", error = %e, "asking the ledger who holds the nodes whose streams ended failed; asked again later");
                return;
            }
        };
        for ((node, generation), h) in chunk.iter().zip(holders) {
            if h.is_some_and(|h| h != holder) {
                state.left_for_another(node, *generation);
            }
        }
    }
}

/// Writes the pending commit (with a previously failed one, if any), and
/// moves the ledger's watermark (`finalize_through`) in the same
/// transaction, as `holder`. Returns the commit back if the write failed.
///
/// A commit refused because another holder has since claimed one of its
/// nodes (`LedgerError::Fenced`) loses that node (its cursor and
/// bookings: they were counted from a cursor the other holder moved on
/// from), the node's streams end without acking them, and the rest is
/// written at once. That is no storage failure: readiness stays.
pub fn commit_once<W: LedgerWriter>(
    state: &State,
    ledger: &Mutex<W>,
    holder: &str,
    failed: Option<(u64, ledger::Commit)>,
    committed: &watch::Sender<u64>,
    finalize_grace: std::time::Duration,
) -> Option<(u64, ledger::Commit)> {
    let failed = match failed.map(|f| resolve_failed(state, ledger, holder, f, committed)) {
        None | Some(Resolved::Written) => None,
        Some(Resolved::Unwritten(f)) => Some(f),
        // Not known yet: retried as it is, nothing added to it.
        Some(Resolved::Unknown(f)) => return Some(f),
    };
    let (id, mut commit) = state.take_pending();
    let mut earlier = failed.map(|(_, c)| c);
    let now = sync::now_unix();
    let finalize_through = finalize_through(now, finalize_grace);
    if commit.is_empty() && earlier.as_ref().is_none_or(ledger::Commit::is_empty) {
        earlier = None;
        // Nothing of any node is in flight: what was dropped since
        // concerns no commit.
        state.drop_stale(None, id, &mut commit);
        committed.send_replace(id);
        // Nothing to write, but the watermark still moves (each quarter-hour),
        // so that an idle fleet's rows become final. Skipped while the
        // compactor holds the ledger: the next tick tries again.
        let l = match ledger.try_lock() {
            Ok(l) => l,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        // Other collectors commit to the ledger too: its totals are read
        // every interval, also when this one has nothing to write.
        read_totals(state, &*l);
        // While commits fail, an empty commit probes the ledger, so that
        // an idle collector learns it can commit again (and takes Hellos).
        match l.finalized_through() {
            Ok(w) if w >= finalize_through && !state.readiness.commits_failing() => return None,
            Ok(_) => {}
            Err(e) => {
                error!(task = "committer", error = %e, "reading the ledger's watermark failed");
                if state.readiness.commits_failing() {
                    crate::events::CommitFailed { error: &e }.emit(&state.counters);
                    state.readiness.commit_failed(&e);
                }
                return None;
            }
        }
        drop(l);
    }
    let started = std::time::Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut l = sync::lock(ledger);
        // Under the ledger's lock, which a claim at a Hello holds while it
        // drops a node's stale bookings: none of them is written after it.
        state.drop_stale(earlier.as_mut(), id, &mut commit);
        if let Some(mut e) = earlier.take() {
            e.absorb(std::mem::take(&mut commit));
            commit = e;
        }
        // Each refusal names the nodes others hold and drops them all;
        // a node claimed away between two tries costs one more.
        loop {
            match l.commit_as(holder, &commit, now, finalize_through) {
                Ok(done) => {
                    // Before the acks: a scrape after an ack sees the
                    // totals that include what it acks.
                    read_totals(state, &*l);
                    return Ok(done);
                }
                Err(LedgerError::Fenced {
                    node,
                    holder: by,
                    generation,
                    others,
                }) if commit.nodes.contains_key(node.as_str()) => {
                    for (node, by, generation) in
                        std::iter::once((node, by, generation)).chain(others)
                    {
                        if !commit.nodes.contains_key(node.as_str()) {
                            continue;
                        }
                        state.fence_node(&mut commit, &node);
                        crate::events::NodeFenced {
                            node: &node,
                            holder: &by,
                            generation,
                        }
                        .emit(&state.counters);
                    }
                }
                r => return r,
            }
        }
    }));
    match result {
        Ok(Ok(done)) => {
            // Before the acks: a scrape after an ack sees the counter.
            state.add_over_contract(&done.over_contract_ns);
            state.counters.commits_ok.fetch_add(1, Ordering::Relaxed);
            state.readiness.commit_succeeded();
            let took = started.elapsed();
            state
                .counters
                .commit_micros
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
            state.counters.commit_seconds.observe(took);
            committed.send_replace(id);
            None
        }
        Ok(Err(e)) => {
            crate::events::CommitFailed { error: &e }.emit(&state.counters);
            state.readiness.commit_failed(&e);
            if rewound(&e) {
                ledger_rewound(&e);
            }
            Some((id, commit))
        }
        Err(_) => committer_died(),
    }
}

/// Reads the tenants' totals from the ledger for `/metrics`; a failed
/// read keeps the last ones (it is logged, and no commit failure).
fn read_totals<W: LedgerWriter + ?Sized>(state: &State, ledger: &W) {
    match ledger.tenant_totals() {
        Ok(t) => state.set_ledger_totals(&t),
        Err(e) => {
            tracing::warn!(task = "committer", error = %e, "reading the tenants' totals from the ledger failed; /metrics keeps the last ones")
        }
    }
    // For the watermark's lag on /metrics (another collector may have
    // moved it further than this one asked).
    match ledger.finalized_through() {
        Ok(w) => state.counters.finalized_through.store(w, Ordering::Relaxed),
        Err(e) => {
            tracing::warn!(task = "committer", error = %e, "reading the ledger's watermark failed; /metrics keeps the last one")
        }
    }
}

/// Tells whether `failed` (a commit that returned an error) was written
/// all the same, before it is retried with what arrived since: an error
/// does not say nothing was written (the answer to COMMIT can be lost with
/// the connection after the server wrote it), and a retry of a written
/// commit would count its samples twice. Written: its streams are acked
/// (`Resolved::Written`); not written: retried with what arrived since;
/// not known yet (the ledger still unreachable): retried as it is.
fn resolve_failed<W: LedgerWriter>(
    state: &State,
    ledger: &Mutex<W>,
    holder: &str,
    failed: (u64, ledger::Commit),
    committed: &watch::Sender<u64>,
) -> Resolved {
    let Some(id) = failed.1.id else {
        return Resolved::Unwritten(failed);
    };
    let mut l = sync::lock(ledger);
    match l.commit_written(holder, id) {
        Ok(false) => Resolved::Unwritten(failed),
        Ok(true) => {
            tracing::warn!(
                task = "committer",
                commit = id,
                "a commit that returned an error was written all the same (its answer was lost): acking it, not writing it again"
            );
            read_totals(state, &*l);
            state.counters.commits_ok.fetch_add(1, Ordering::Relaxed);
            state.readiness.commit_succeeded();
            committed.send_replace(failed.0);
            Resolved::Written
        }
        Err(e) => {
            crate::events::CommitFailed { error: &e }.emit(&state.counters);
            state.readiness.commit_failed(&e);
            Resolved::Unknown(failed)
        }
    }
}

/// Whether a commit that returned an error was written (`resolve_failed`).
enum Resolved {
    Written,
    Unwritten((u64, ledger::Commit)),
    Unknown((u64, ledger::Commit)),
}

/// Where a commit at `now` moves the watermark: `grace` before the open
/// minute, rounded down to a whole quarter-hour (and not before 1970). A row's peak demand is
/// read from the quarter-hours overlapping it, so a watermark inside a
/// quarter-hour would let a final 1-minute row's peak change with the
/// minutes after it.
pub fn finalize_through(now: i64, grace: std::time::Duration) -> i64 {
    (now.div_euclid(60) * 60)
        .saturating_sub(i64::try_from(grace.as_secs()).unwrap_or(i64::MAX))
        .max(0)
        .div_euclid(900)
        * 900
}

/// Whether `e` says the ledger holds an older last commit of this holder
/// than one this collector saw written: commits it acked are gone from the
/// ledger (a failover to a standby that had not received them, or a
/// restore from a backup), and no later commit can be written, since each
/// moves the holder's last id only from the one it saw written.
fn rewound(e: &LedgerError) -> bool {
    matches!(e, LedgerError::Superseded { expected, found, .. } if found < expected)
}

/// Ends the process after the ledger lost commits this collector had
/// acked (`rewound`): its nodes' cursors in memory are ahead of the
/// ledger's, and nothing it holds can be written. The restart claims each
/// node afresh and resumes from the ledger's cursors: the energy of GPUs
/// with a counter comes back in the next delta; what GPUs without one drew
/// meanwhile is lost, which the log says.
fn ledger_rewound(e: &LedgerError) -> ! {
    error!(task = "committer", error = %e, "the ledger lost commits this collector had acked (a failover to a standby that had not received them, or a restore): exiting, so that the restart resumes every node from the ledger's cursors; energy of GPUs with a counter is recovered by the next delta, energy integrated from power meanwhile is lost");
    std::process::exit(75);
}

/// Ends the process after the committer panicked. Whether its commit was
/// written is unknown, and without a committer nothing is acked again:
/// stop, and let the restart resume from the ledger while agents re-send.
pub fn committer_died() -> ! {
    error!(
        task = "committer",
        "ledger committer panicked; exiting so the ledger stays exact"
    );
    std::process::exit(70);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::{GpuReading, NodeSample};
    use crate::ledger::sqlite::LOCAL_HOLDER;
    use crate::state::{GpuInfo, Hello, StateConfig};
    use std::time::Duration;

    /// A state with node `n1` connected (one GPU with a counter and a
    /// 700 W limit), and a fresh ledger at `path`.
    fn node_and_ledger(
        path: &std::path::Path,
    ) -> (State, crate::state::StreamHandle, Mutex<ledger::Ledger>) {
        let ledger = Mutex::new(ledger::Ledger::create(path).unwrap());
        let state = State::new(
            StateConfig {
                stale_after: None,
                max_gpus_per_node: 8,
                max_clock_skew: Duration::from_secs(600),
                max_sample_age: Duration::from_secs(7 * 86_400),
            },
            Tenants::empty(),
        );
        let (h, _) = state
            .hello(Hello {
                node_power_sources: Vec::new(),
                node_id: "n1".into(),
                agent_version: "test".into(),
                epoch: 1,
                interval: Duration::from_secs(1),
                gpus: vec![GpuInfo {
                    uuid: "GPU-1".into(),
                    model: "H200".into(),
                    power_limit_milliwatts: Some(700_000),
                    memory_total_bytes: None,
                    energy_counter_supported: true,
                    identity: Default::default(),
                    mig: Default::default(),
                    mig_layout: None,
                    earlier_mig: Vec::new(),
                }],
            })
            .unwrap();
        (state, h, ledger)
    }

    /// Invariant: minutes reported final stay as they were. A spool that
    /// arrives three hours late, through the same state and committer as
    /// live samples, does not change them; it is booked as adjustments,
    /// and rows plus adjustments hold every millijoule.
    #[test]
    fn a_spool_three_hours_late_leaves_final_minutes_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let (state, h, ledger) = node_and_ledger(&path);
        let (committed, _acks) = watch::channel(0);
        // One GPU counting 500 mJ a second, from the top of the hour three
        // hours ago.
        let t0 = (sync::now_unix() - 3 * 3600).div_euclid(3600) * 3600;
        let sample = |seq: u64| NodeSample {
            node_power: Vec::new(),
            seq,
            timestamp_unix_nanos: (t0 + seq as i64) * 1_000_000_000,
            gpus: vec![GpuReading {
                index: 0,
                power_milliwatts: Some(500_000),
                energy_millijoules: Some(1_000_000 + 500 * seq),
                ..GpuReading::default()
            }],
            host: None,
        };
        state
            .ingest(&h, (1..=20).map(sample).collect(), Vec::new())
            .unwrap();
        let grace = Duration::from_secs(600);
        assert!(commit_once(&state, &ledger, LOCAL_HOLDER, None, &committed, grace).is_none());
        let reader = ledger::Reader::open(&path).unwrap();
        let before = reader.usage(None, t0, t0 + 3600).unwrap();
        // The commit moved the watermark past the hour: it is final.
        assert!(before.finalized_through >= t0 + 3600, "{before:?}");
        assert_eq!(before.finalized_through % 900, 0, "whole quarter-hours");
        assert_eq!(before.revision, 1);
        assert!(before.adjustments.is_empty());
        let in_time: u64 = before.spans.iter().map(|(_, s)| s.delta.energy_mj).sum();
        assert_eq!(in_time, 19 * 500);

        // Seconds 21-80 arrive three hours late.
        let booked_from = sync::now_unix();
        state
            .ingest(&h, (21..=80).map(sample).collect(), Vec::new())
            .unwrap();
        assert!(commit_once(&state, &ledger, LOCAL_HOLDER, None, &committed, grace).is_none());
        let after = reader.usage(None, t0, t0 + 3600).unwrap();
        assert_eq!(after.spans, before.spans, "final minutes changed");
        assert_eq!(after.revision, 2);
        let minutes: Vec<(u64, &str, &str, i64, u64)> = after
            .adjustments
            .iter()
            .map(|a| {
                assert!((booked_from..=sync::now_unix()).contains(&a.booked_at));
                (
                    a.revision,
                    a.tenant.as_str(),
                    a.node.as_str(),
                    a.minute_start,
                    a.delta.energy_mj,
                )
            })
            .collect();
        // Seconds 20-60 and 60-80 of the hour, split at the minute.
        assert_eq!(
            minutes,
            vec![
                (2, "unassigned", "n1", t0, 40 * 500),
                (2, "unassigned", "n1", t0 + 60, 20 * 500)
            ]
        );
        // Rows plus adjustments are the energy counted, to the millijoule.
        let l = sync::lock(&ledger);
        assert_eq!(l.bucket_totals("unassigned").unwrap().energy_mj, 79 * 500);
        assert_eq!(
            l.load().unwrap().tenant_energy,
            vec![("unassigned".to_string(), 79 * 500)]
        );
        drop(l);
        // Nothing to commit: the watermark does not move back, and the
        // revision moves only when the watermark does.
        assert!(
            commit_once(
                &state,
                &ledger,
                LOCAL_HOLDER,
                None,
                &committed,
                Duration::from_secs(86_400)
            )
            .is_none()
        );
        let idle = reader.usage_since(None, t0, t0 + 3600, 2).unwrap();
        assert_eq!(
            (idle.revision, idle.finalized_through),
            (2, after.finalized_through)
        );
        assert!(idle.adjustments.is_empty(), "nothing since revision 2");
    }

    #[test]
    fn the_watermark_trails_by_the_grace_in_whole_quarter_hours() {
        const T: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z
        let grace = Duration::from_secs(600);
        // Open minute 00:26, less 10 minutes: 00:16, down to 00:15.
        assert_eq!(finalize_through(T + 26 * 60 + 5, grace), T + 15 * 60);
        assert_eq!(finalize_through(T + 25 * 60, grace), T + 15 * 60);
        assert_eq!(finalize_through(T + 24 * 60 + 59, grace), T);
        assert_eq!(finalize_through(T, Duration::ZERO), T);
        assert_eq!(finalize_through(T, Duration::from_secs(u64::MAX)), 0);
    }

    /// Invariant: a GPU back after two hours carries the gap's energy in
    /// its counter; the part of the gap already final becomes adjustments,
    /// the part within the grace lands in its minutes, and together they
    /// are the counter's delta exactly.
    #[test]
    fn a_gpu_back_after_two_hours_splits_its_gap_at_the_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let (state, h, ledger) = node_and_ledger(&path);
        let (committed, _acks) = watch::channel(0);
        let grace = Duration::from_secs(600);
        let now = sync::now_unix();
        let t0 = now - 2 * 3600;
        let sample = |seq: u64, t: i64, counter: u64| NodeSample {
            node_power: Vec::new(),
            seq,
            timestamp_unix_nanos: t * 1_000_000_000,
            gpus: vec![GpuReading {
                index: 0,
                power_milliwatts: Some(500_000),
                energy_millijoules: Some(counter),
                ..GpuReading::default()
            }],
            host: None,
        };
        // Heard at t0 and t0 + 1 s, committed then (the ledger is fresh, so
        // its watermark moves past them with this commit).
        state
            .ingest(
                &h,
                vec![sample(1, t0, 1_000_000), sample(2, t0 + 1, 1_000_500)],
                Vec::new(),
            )
            .unwrap();
        assert!(commit_once(&state, &ledger, LOCAL_HOLDER, None, &committed, grace).is_none());
        let reader = ledger::Reader::open(&path).unwrap();
        let before = reader.usage(None, t0 - 3600, now + 3600).unwrap();
        let watermark = before.finalized_through;
        assert!(watermark > t0 + 60 && watermark < now, "{before:?}");
        // Then silent until now, 500 W all along.
        let gap = 500 * (now - t0 - 1) as u64;
        state
            .ingest(&h, vec![sample(3, now, 1_000_500 + gap)], Vec::new())
            .unwrap();
        assert!(commit_once(&state, &ledger, LOCAL_HOLDER, None, &committed, grace).is_none());
        let after = reader.usage(None, t0 - 3600, now + 3600).unwrap();
        let final_rows = |u: &ledger::Usage| -> Vec<(i64, u64)> {
            u.spans
                .iter()
                .filter(|(_, s)| s.start + 60 <= watermark)
                .map(|(_, s)| (s.start, s.delta.energy_mj))
                .collect()
        };
        assert_eq!(
            final_rows(&after),
            final_rows(&before),
            "final minutes changed"
        );
        assert!(
            after
                .adjustments
                .iter()
                .all(|a| a.minute_start + 60 <= watermark)
        );
        assert!(!after.adjustments.is_empty());
        let booked: u64 = after.adjustments.iter().map(|a| a.delta.energy_mj).sum();
        let open: u64 = after
            .spans
            .iter()
            .filter(|(_, s)| s.start + 60 > watermark)
            .map(|(_, s)| s.delta.energy_mj)
            .sum();
        assert!(open > 0, "the minutes within the grace get their share");
        let rows: u64 = final_rows(&after).iter().map(|r| r.1).sum();
        assert_eq!(rows + booked + open, 500 + gap);
    }

    /// Invariant: a commit that was written although the writer reported
    /// it failed (its answer lost) is acked when that is found out, and
    /// never written again: the retry with what arrived since books each
    /// sample once.
    #[test]
    fn a_commit_written_whose_answer_was_lost_is_acked_and_not_written_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let (state, h, ledger) = node_and_ledger(&path);
        let faulty = crate::persist::faulty::Faulty::new(ledger.into_inner().unwrap());
        let lose = faulty.lose_answers.clone();
        lose.store(true, Ordering::Relaxed);
        let ledger = Mutex::new(faulty);
        let (committed, acks) = watch::channel(0);
        let t0 = sync::now_unix() - 600;
        let sample = |seq: u64| NodeSample {
            node_power: Vec::new(),
            seq,
            timestamp_unix_nanos: (t0 + seq as i64) * 1_000_000_000,
            gpus: vec![GpuReading {
                index: 0,
                power_milliwatts: Some(500_000),
                energy_millijoules: Some(1_000_000 + 500 * seq),
                ..GpuReading::default()
            }],
            host: None,
        };
        let grace = Duration::from_secs(600);
        let holder = "a/1";
        state
            .ingest(&h, (1..=10).map(sample).collect(), Vec::new())
            .unwrap();
        let failed = commit_once(&state, &ledger, holder, None, &committed, grace);
        assert!(failed.is_some(), "the commit reported failed");
        assert_eq!(*acks.borrow(), 0, "nothing acked after a failure");
        lose.store(false, Ordering::Relaxed);
        state
            .ingest(&h, (11..=20).map(sample).collect(), Vec::new())
            .unwrap();
        let first = failed.as_ref().unwrap().0;
        assert!(commit_once(&state, &ledger, holder, failed, &committed, grace).is_none());
        assert!(*acks.borrow() > first, "both commits acked");
        drop(ledger);
        let reader = ledger::Reader::open(&path).unwrap();
        let usage = reader.usage(None, t0 - 3600, t0 + 3600).unwrap();
        let energy: u64 = usage.spans.iter().map(|(_, s)| s.delta.energy_mj).sum();
        let readings: u64 = usage.spans.iter().map(|(_, s)| s.delta.samples).sum();
        assert_eq!((energy, readings), (19 * 500, 20), "each sample once");
    }

    /// A ledger whose last commit of this holder is older than one this
    /// collector saw written lost acked commits (`rewound`: the collector
    /// exits); one whose last commit is newer wrote a commit whose answer
    /// was lost (resolved before the retry, not fatal).
    #[test]
    fn a_ledger_that_lost_acked_commits_is_told_from_a_lost_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut l = ledger::Ledger::create(&path).unwrap();
        let mut c = ledger::Commit {
            id: Some(5),
            ..Default::default()
        };
        l.commit_as("a/1", &c, 0, 0).unwrap();
        let db = rusqlite::Connection::open(&path).unwrap();
        let set = |id: i64| {
            db.execute("UPDATE holder_commit SET last_id = ?1", [id])
                .unwrap()
        };
        set(3);
        c.id = Some(6);
        let e = l.commit_as("a/1", &c, 0, 0).unwrap_err();
        assert!(rewound(&e), "{e}");
        set(9);
        let e = l.commit_as("a/1", &c, 0, 0).unwrap_err();
        assert!(!rewound(&e), "{e}");
    }
}
