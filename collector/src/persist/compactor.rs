//! The compactor: once a minute, under the ledger's compaction lease,
//! rolls closed hours up and applies retention (through `LedgerWriter`
//! only).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;

use crate::ledger::{self, LedgerError, LedgerWriter};
use crate::state::State;
use crate::sync;

/// How long the compaction lease is taken for: three rounds, renewed at
/// every round, so that a compactor that stopped leaves it to another
/// holder within three minutes.
pub const LEASE_TTL: Duration = Duration::from_secs(180);

/// How long each granularity is kept, and how long a minute stays open
/// (from the collector's settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub finalize_grace: Duration,
    pub minute_retention: Duration,
    pub hour_retention: Duration,
    /// `None`: daily rollups are kept forever.
    pub day_retention: Option<Duration>,
}

/// What a compaction at `now` (Unix seconds) keeps under `retention`.
pub fn compaction_policy(retention: &Retention, now: i64) -> ledger::Compaction {
    let ago = |d: Duration| now.saturating_sub(i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    ledger::Compaction {
        closed_before: ago(retention.finalize_grace),
        minutes_from: ago(retention.minute_retention),
        hours_from: ago(retention.hour_retention),
        days_from: retention.day_retention.map(ago),
        allocating_from: None,
    }
}

/// The first minute one of `meters` (configured meter ids) has yet to
/// allocate: what compaction keeps minute buckets from
/// (`Compaction::allocating_from`). A meter with no allocation yet holds
/// nothing back: it counts from its first reading on, never before.
pub fn allocating_from<W: LedgerWriter + ?Sized>(
    ledger: &W,
    meters: &[String],
) -> Result<Option<i64>, LedgerError> {
    let mut from = None;
    for id in meters {
        if let Some(s) = ledger.meter_state(id)? {
            from = Some(from.map_or(s.allocated_through, |f: i64| f.min(s.allocated_through)));
        }
    }
    Ok(from)
}

/// Once a minute, under the compaction lease (taken or renewed for
/// `holder` each round), rolls closed hours up and applies retention. Named
/// task: `compactor`. A failure is logged and counted; the next round
/// retries (rollups are rebuilt from what they cover, so nothing is lost).
pub async fn compact_loop<W: LedgerWriter + 'static>(
    state: Arc<State>,
    ledger: Arc<Mutex<W>>,
    holder: Arc<str>,
    retention: Retention,
    shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = capwatch_common::wait_for_shutdown(shutdown);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return,
        }
        let now = sync::now_unix();
        let policy = compaction_policy(&retention, now);
        let (ledger, holder) = (ledger.clone(), holder.clone());
        let contracts = state.tenant_history();
        let meters: Vec<String> = state
            .meters()
            .map(|b| b.meters.iter().map(|m| m.spec.id.clone()).collect())
            .unwrap_or_default();
        let result = tokio::task::spawn_blocking(move || {
            let mut l = sync::lock(&ledger);
            let lease = l.acquire_compaction(&holder, now, LEASE_TTL)?;
            let policy = ledger::Compaction {
                allocating_from: allocating_from(&*l, &meters)?,
                ..policy
            };
            l.compact_under(&lease, now, &policy, &contracts)
        })
        .await;
        match result {
            Ok(Err(LedgerError::LeaseHeld { holder, until })) => {
                info!(task = "compactor", %holder, until, "another collector holds the compaction lease; skipping this round");
            }
            Ok(Ok(done)) => {
                state
                    .counters
                    .compactions_ok
                    .fetch_add(1, Ordering::Relaxed);
                if done != ledger::Compacted::default() {
                    info!(
                        task = "compactor",
                        hours = done.hours_rolled_up,
                        days = done.days_rolled_up,
                        minute_rows_dropped = done.minute_rows_dropped,
                        hour_rows_dropped = done.hour_rows_dropped,
                        gpu_hour_rows_dropped = done.gpu_hour_rows_dropped,
                        day_rows_dropped = done.day_rows_dropped,
                        adjustment_rows_dropped = done.adjustment_rows_dropped,
                        meter_rows_rolled_up = done.meter_rows_rolled_up,
                        "ledger compacted"
                    );
                }
            }
            Ok(Err(e)) => crate::events::CompactionFailed {
                error: &e,
                task_died: false,
            }
            .emit(&state.counters),
            Err(e) => crate::events::CompactionFailed {
                error: &e,
                task_died: true,
            }
            .emit(&state.counters),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Ledger, MeterState};

    /// The lowest allocation point of the configured meters; a meter with
    /// none yet, or one not configured, holds nothing back.
    #[test]
    fn the_meter_furthest_behind_holds_the_minutes_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::create(&dir.path().join("ledger.db")).unwrap();
        let at = |through: i64| MeterState {
            allocated_through: through,
            reading_at_ns: through * 1_000_000_000,
            reading_raw: 0,
            carry_mj: 0,
            revision: 0,
        };
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(allocating_from(&l, &ids(&["a", "b"])).unwrap(), None);
        assert!(l.allocate_meter("a", None, &at(7_200), &[]).unwrap());
        assert!(l.allocate_meter("b", None, &at(3_600), &[]).unwrap());
        assert!(l.allocate_meter("old", None, &at(60), &[]).unwrap());
        assert_eq!(
            allocating_from(&l, &ids(&["a", "b", "new"])).unwrap(),
            Some(3_600)
        );
        assert_eq!(allocating_from(&l, &ids(&["a"])).unwrap(), Some(7_200));
        assert_eq!(allocating_from(&l, &[]).unwrap(), None);
    }
}
