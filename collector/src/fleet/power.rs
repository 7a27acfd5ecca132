//! A node's power sources (BMC, IPMI, RAPL zones), each with its own
//! meter, counted as a GPU is: counter deltas, reset handling, else
//! bounded integration flagged estimated, bounded by the source's own
//! interval and by `MAX_NODE_POWER_MILLIWATTS`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::accounting::{Applied, Meter, MeterCursor, Tick};
use crate::edge::{
    GpuReading, MAX_NODE_POWER_MILLIWATTS, MAX_NODE_POWER_SOURCES, NodePowerReading,
    NodePowerSource,
};
use crate::ledger::GpuCursor;

/// One power source of a node.
#[derive(Debug)]
pub struct PowerSource {
    /// `"{kind}/{name}"`: its cursor's key in the ledger.
    pub(crate) key: Arc<str>,
    /// From the Hello; `None` for one known only from the ledger (resumed
    /// or no longer announced).
    pub(crate) info: Option<NodePowerSource>,
    meter: Meter,
    /// Readings applied: the sequence its meter counts readings by (one
    /// per source interval).
    readings: u64,
    /// The last reading applied.
    pub(crate) last: Option<NodePowerReading>,
    /// When `last` was taken, on the collector's monotonic clock.
    pub(crate) sampled_at: Option<Instant>,
    /// Take the next timestamp as the reference even if it is older (a new
    /// agent run, whose clock may have been stepped back).
    reanchor: bool,
}

/// The most power a source's counter deltas are believed at, as the
/// meter's "power limit" (it allows three times that).
const METER_LIMIT: u64 = MAX_NODE_POWER_MILLIWATTS / 3;

impl PowerSource {
    pub(super) fn new(info: NodePowerSource) -> Self {
        Self {
            key: Arc::from(info.key()),
            info: Some(info),
            meter: Meter::default(),
            readings: 0,
            last: None,
            sampled_at: None,
            reanchor: false,
        }
    }

    /// A source known only from the ledger, until its node says Hello.
    pub(super) fn resumed(key: &str, c: &GpuCursor) -> Self {
        let cursor = MeterCursor::from(c);
        Self {
            key: Arc::from(key),
            info: None,
            meter: Meter::resumed(&cursor, None),
            readings: 0,
            last: None,
            sampled_at: None,
            reanchor: false,
        }
    }

    /// Announced again in a Hello: keeps its meter, takes the new facts.
    pub(super) fn announce(&mut self, info: NodePowerSource, new_epoch: bool) {
        self.info = Some(info);
        if new_epoch {
            self.reanchor = true;
            self.meter.reanchor();
        }
    }

    pub(crate) fn is_node(&self) -> bool {
        self.info.as_ref().is_some_and(NodePowerSource::is_node)
    }

    /// How long one reading's power stands for: three of the source's
    /// intervals, or the node's staleness window if that is longer.
    pub(crate) fn window(&self, node_window: Duration) -> Duration {
        let own = self
            .info
            .as_ref()
            .map_or(Duration::ZERO, |i| i.interval * 3);
        own.max(node_window)
    }

    /// Whether a reading stamped `timestamp_ns` follows the last one
    /// applied (else it is a duplicate).
    pub(super) fn follows(&self, timestamp_ns: i64) -> bool {
        self.reanchor || self.meter.last_timestamp().is_none_or(|t| timestamp_ns > t)
    }

    /// Folds one checked reading in, at `now` (latest timestamp allowed:
    /// `latest_ns`); `None` where the meter found it stale.
    pub(super) fn apply(
        &mut self,
        r: NodePowerReading,
        now: Instant,
        latest_ns: i64,
        node_window: Duration,
    ) -> Option<Applied> {
        let interval = self
            .info
            .as_ref()
            .map_or(Duration::from_secs(1), |i| i.interval);
        self.readings += 1;
        let tick = Tick {
            timestamp_ns: r.timestamp_unix_nanos,
            seq: self.readings,
            now,
            latest_ns,
            interval,
            window: self.window(node_window),
        };
        let reading = GpuReading {
            power_milliwatts: r.power_milliwatts,
            energy_millijoules: r.energy_millijoules,
            ..GpuReading::default()
        };
        let applied = self.meter.apply(&reading, Some(METER_LIMIT), &tick);
        self.reanchor = false;
        if !applied.kept {
            return None;
        }
        self.last = Some(r);
        Some(applied)
    }

    /// Energy since this collector first saw the source (mJ), as its
    /// cursor carries it across restarts.
    pub(crate) fn energy_millijoules(&self) -> u64 {
        self.meter.energy_millijoules()
    }

    /// Times its counter went backwards or jumped implausibly.
    pub(crate) fn counter_resets(&self) -> u64 {
        self.meter.counter_resets()
    }

    /// The counting state the ledger keeps.
    pub(super) fn cursor(&self) -> GpuCursor {
        self.meter.cursor().into()
    }

    fn last_timestamp(&self) -> Option<i64> {
        self.meter.last_timestamp()
    }
}

/// The sources a Hello announces, in its order, taking over the meters of
/// those known before (by key); the rest are kept as departed, the most
/// recently heard first, at most `MAX_NODE_POWER_SOURCES` of them.
pub(super) fn announce(
    sources: Vec<NodePowerSource>,
    known: Vec<PowerSource>,
    new_epoch: bool,
) -> (Vec<PowerSource>, Vec<PowerSource>) {
    let mut known = known;
    let announced: Vec<PowerSource> = sources
        .into_iter()
        .map(|info| {
            let key = info.key();
            match known.iter().position(|p| *p.key == *key) {
                Some(i) => {
                    let mut p = known.swap_remove(i);
                    p.announce(info, new_epoch);
                    p
                }
                None => PowerSource::new(info),
            }
        })
        .collect();
    known.sort_by_key(|p| std::cmp::Reverse(p.last_timestamp()));
    known.truncate(MAX_NODE_POWER_SOURCES);
    // With a whole-node source announced, one that was the node's before
    // (or may have been: known only from the ledger) and is not now must
    // not come back with a delta over the time the new one counts: its
    // counter starts again from its next reading.
    let whole_node = announced.iter().any(PowerSource::is_node);
    for p in &mut known {
        if whole_node && p.info.as_ref().is_none_or(NodePowerSource::is_node) {
            p.meter.forget_baseline();
            p.readings = 0;
            p.last = None;
        }
        p.info = None;
    }
    (announced, known)
}
