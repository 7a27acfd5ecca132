//! Each tenant's last day, for the status page: average power in bins of
//! a few minutes on the basis its contract is sold on, the contract over
//! the same bins, and today's (UTC) energy and time over contract.
//!
//! Read from the ledger's minute buckets, like the usage rows, so that it
//! survives restarts and, with several collectors on one database, shows
//! every node of a tenant, not only those streaming to this collector.
//! Reading ([`read`]) is one snapshot of the minute rows with the energy
//! that reached them after they were final (their adjustments, added to
//! their minute, as the over-contract counter counts them) and one query
//! of the meters' allocated minutes; the arithmetic ([`recent`]) runs on
//! what was read, after the reader is free again.
//!
//! A reload reads only what may have changed ([`read_kept`]): the final
//! minutes read before are kept ([`Kept`]) with the revision they are up
//! to date through, and each reload reads the minutes from the watermark
//! on and the adjustments booked since that revision, so a day of minute
//! rows is read once, not at every reload.
//!
//! A bin's power is the average over its minutes that hold a reading on
//! the contract's basis: a bin with none is a gap (`None`), never 0 W; the
//! minute still open is left out (its energy is still arriving). Over
//! contract is counted per minute as the usage rows count it
//! (`accounting::over_contract` of the minute's basis energy against the
//! contract of its time), open minute included.

use std::collections::BTreeMap;

use crate::accounting::{Basis, Metered, over_contract};
use crate::ledger::{BucketDelta, DAY, LedgerError, LedgerReader, UsageAllocation};
use crate::tenants::TenantHistory;

use super::facility::Facility;

const MINUTE: i64 = 60;

/// The day a chart covers: `bins` bins of `bin` seconds, ending with the
/// bin that holds `now`, and the UTC day `now` is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Start of the first bin (Unix seconds).
    pub from: i64,
    /// Bin length, seconds (a whole number of minutes dividing a day).
    pub bin: i64,
    pub bins: usize,
    /// Start of the open minute: minutes from here on are still filling.
    pub open_minute: i64,
    /// Start of today (UTC).
    pub today: i64,
}

impl Window {
    /// The last day before `now` (Unix seconds) in bins of `bin` seconds
    /// (rounded to whole minutes dividing a day; at least one minute).
    pub fn last_day(now: i64, bin: i64) -> Self {
        let mut bin = (bin / MINUTE).max(1) * MINUTE;
        while DAY % bin != 0 {
            bin -= MINUTE;
        }
        let open_minute = now.div_euclid(MINUTE) * MINUTE;
        let to = (open_minute.div_euclid(bin) + 1) * bin;
        Self {
            from: to - DAY,
            bin,
            bins: (DAY / bin) as usize,
            open_minute,
            today: now.div_euclid(DAY) * DAY,
        }
    }

    /// What the reads cover: the first bin to the end of the open minute
    /// (today starts inside it: a bin length divides a day).
    fn read_range(&self) -> (i64, i64) {
        (self.from, self.open_minute + MINUTE)
    }
}

/// What [`read`] took from the ledger.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    /// (tenant, minute start, sums over nodes), as `LedgerReader::minutes`,
    /// with each minute's adjustments added.
    pub minutes: Vec<(String, i64, BucketDelta)>,
    /// The meters' allocated minutes, as `LedgerReader::meter_minutes`
    /// (nothing else of the allocation: the day's power is the parts).
    pub allocated: UsageAllocation,
}

/// Reads `tenant`'s (`None`: every tenant's) minutes of `w`.
pub fn read(
    reader: &dyn LedgerReader,
    tenant: Option<&str>,
    w: &Window,
) -> Result<Rows, LedgerError> {
    let (from, to) = w.read_range();
    let usage = reader.usage(tenant, from, to)?;
    let mut minutes: BTreeMap<(String, i64), BucketDelta> = BTreeMap::new();
    // A day is inside the minute retention: every span is a minute.
    for (t, span) in usage.spans.iter().filter(|(_, s)| s.seconds == MINUTE) {
        minutes
            .entry((t.clone(), span.start))
            .or_default()
            .add(&span.delta);
    }
    for a in &usage.adjustments {
        minutes
            .entry((a.tenant.clone(), a.minute_start))
            .or_default()
            .add(&a.delta);
    }
    Ok(Rows {
        minutes: minutes.into_iter().map(|((t, m), d)| (t, m, d)).collect(),
        allocated: UsageAllocation {
            minutes: reader.meter_minutes(None, from, to)?,
            ..UsageAllocation::default()
        },
    })
}

/// The final minutes [`read_kept`] read before, summed over nodes, up to
/// date through a revision.
#[derive(Debug, Clone, Default)]
pub struct Kept {
    /// The first minute kept.
    from: i64,
    /// Every minute before this (and from `from` on) is kept: they are
    /// final, so only adjustments can change them.
    through: i64,
    /// The revision the kept minutes are up to date through.
    revision: u64,
    minutes: BTreeMap<(String, i64), BucketDelta>,
}

/// As [`read`], with the final minutes of earlier reads kept in `kept`
/// (per `tenant`: the caller keeps one per page). Reads the minutes from
/// the last kept one on (spans and every adjustment of them) and the
/// adjustments of the kept minutes booked after the revision they are up
/// to date through; of those, only the ones no later than the first
/// read's revision are taken, so the kept minutes are up to date through
/// that revision exactly, whatever was committed between the two reads.
/// A ledger whose revision or watermark went back (restored from a
/// backup) is read whole again; the caller drops kept minutes not read
/// for a while, so a ledger restored and then committed past the kept
/// revision is not read by them for long.
pub fn read_kept(
    reader: &dyn LedgerReader,
    tenant: Option<&str>,
    w: &Window,
    kept: &mut Option<Kept>,
) -> Result<Rows, LedgerError> {
    let (from, to) = w.read_range();
    let empty = || Kept {
        from,
        through: from,
        ..Kept::default()
    };
    let mut k = match kept.take() {
        Some(k) if k.from <= from && k.through <= to => k,
        _ => empty(),
    };
    let mut fresh = reader.usage(tenant, k.through.max(from), to)?;
    // Revision and watermark never go back in one ledger.
    if fresh.revision < k.revision || fresh.finalized_through < k.through {
        k = empty();
        fresh = reader.usage(tenant, from, to)?;
    }
    if k.through > from {
        let late = reader.adjustments_since(tenant, from, k.through, k.revision)?;
        for a in late
            .adjustments
            .iter()
            .filter(|a| a.revision <= fresh.revision)
        {
            k.minutes
                .entry((a.tenant.clone(), a.minute_start))
                .or_default()
                .add(&a.delta);
        }
    }
    k.minutes.retain(|(_, m), _| *m >= from);
    k.from = from;
    // Minutes ending at or before the watermark are final: kept.
    let final_through = fresh.finalized_through.div_euclid(MINUTE) * MINUTE;
    let mut open: BTreeMap<(String, i64), BucketDelta> = BTreeMap::new();
    let mut add = |t: &str, minute: i64, d: &BucketDelta| {
        let into = if minute + MINUTE <= final_through {
            &mut k.minutes
        } else {
            &mut open
        };
        into.entry((t.to_string(), minute)).or_default().add(d);
    };
    // A day is inside the minute retention: every span is a minute.
    for (t, span) in fresh.spans.iter().filter(|(_, s)| s.seconds == MINUTE) {
        add(t, span.start, &span.delta);
    }
    for a in &fresh.adjustments {
        add(&a.tenant, a.minute_start, &a.delta);
    }
    k.through = k.through.max(final_through).min(to);
    k.revision = fresh.revision;
    let mut minutes = k.minutes.clone();
    for (key, d) in open {
        minutes.entry(key).or_default().add(&d);
    }
    *kept = Some(k);
    Ok(Rows {
        minutes: minutes.into_iter().map(|((t, m), d)| (t, m, d)).collect(),
        allocated: UsageAllocation {
            minutes: reader.meter_minutes(None, from, to)?,
            ..UsageAllocation::default()
        },
    })
}

/// One tenant's day.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantRecent {
    /// Average power (W) on the contract's basis, per bin; `None`: no
    /// reading on that basis in the bin.
    pub watts: Vec<Option<f64>>,
    /// The contract (W) in force at each bin's start; `None`: none.
    pub contract_watts: Vec<Option<f64>>,
    /// Time over contract today (UTC), seconds: whole minutes.
    pub over_contract_today_s: u64,
    /// GPU energy committed today (mJ).
    pub energy_today_mj: u64,
}

/// The day of each of `tenants` (ids), from `rows`, each minute measured
/// against the contract `history` gives it at its start.
pub fn recent(
    rows: &Rows,
    w: &Window,
    tenants: &[&str],
    history: &TenantHistory,
) -> BTreeMap<String, TenantRecent> {
    let facility = Facility::of(&[], &rows.allocated);
    let mut by_tenant: BTreeMap<&str, Vec<(i64, &BucketDelta)>> = BTreeMap::new();
    for (t, minute, d) in &rows.minutes {
        by_tenant.entry(t.as_str()).or_default().push((*minute, d));
    }
    let mut out = BTreeMap::new();
    for &tenant in tenants {
        let contract_watts = (0..w.bins)
            .map(|i| {
                let c = history.contract_at(tenant, w.from + i as i64 * w.bin);
                (c.milliwatts > 0).then(|| c.milliwatts as f64 / 1000.0)
            })
            .collect();
        // Per bin: basis energy (mJ) and minutes with a reading.
        let mut sums = vec![(0u64, 0u32); w.bins];
        let (mut over_ns, mut energy_today) = (0u64, 0u64);
        let facility = facility.of_tenant(tenant);
        for (minute, d) in by_tenant.get(tenant).map_or(&[][..], Vec::as_slice) {
            let contract = history.contract_at(tenant, *minute);
            let metered = facility.at(*minute).metered;
            let basis_mj = contract.basis_energy(d.energy_mj, d.node_energy_mj, metered);
            if *minute >= w.today {
                energy_today = energy_today.saturating_add(d.energy_mj);
                over_ns = over_ns.saturating_add(over_contract(basis_mj, contract.milliwatts).0);
            }
            let read = match contract.basis {
                Basis::Gpu => d.gpu_ns > 0 || d.samples > 0,
                Basis::Node => d.node_ns > 0,
                Basis::Facility => {
                    (d.node_ns > 0 || metered != Metered::NONE)
                        && contract
                            .facility_energy(d.node_energy_mj, metered)
                            .is_some()
                }
            };
            if !read || *minute >= w.open_minute || *minute < w.from {
                continue;
            }
            let i = ((minute - w.from) / w.bin) as usize;
            if let Some(s) = sums.get_mut(i) {
                s.0 = s.0.saturating_add(basis_mj);
                s.1 += 1;
            }
        }
        let watts = sums
            .iter()
            // mJ / s = mW.
            .map(|&(mj, n)| (n > 0).then(|| mj as f64 / (f64::from(n) * MINUTE as f64) / 1000.0))
            .collect();
        out.insert(
            tenant.to_string(),
            TenantRecent {
                watts,
                contract_watts,
                over_contract_today_s: over_ns / 1_000_000_000,
                energy_today_mj: energy_today,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::Tenants;

    fn history(file: &str) -> TenantHistory {
        TenantHistory::new(std::sync::Arc::new(Tenants::from_toml(file).unwrap()))
    }

    fn minute(tenant: &str, start: i64, watts: u64) -> (String, i64, BucketDelta) {
        (
            tenant.to_string(),
            start,
            BucketDelta {
                energy_mj: watts * 60 * 1000,
                gpu_ns: 60_000_000_000,
                samples: 60,
                ..BucketDelta::default()
            },
        )
    }

    #[test]
    fn the_window_ends_with_the_bin_of_the_open_minute_and_divides_the_day() {
        let now = 10 * DAY + 3600 + 7 * 60 + 5;
        let w = Window::last_day(now, 900);
        assert_eq!(w.open_minute, 10 * DAY + 3600 + 420);
        assert_eq!(w.from + DAY, 10 * DAY + 3600 + 900);
        assert_eq!((w.bin, w.bins, w.today), (900, 96, 10 * DAY));
        // 7 minutes do not divide a day: 6 do.
        assert_eq!(Window::last_day(now, 420).bin, 360);
        assert_eq!(Window::last_day(now, 5).bin, 60);
    }

    #[test]
    fn bins_average_the_minutes_with_readings_and_leave_gaps_empty() {
        let h = history("[[tenant]]\nid = \"a\"\ncontracted_kw = 1\n");
        let now = 5 * DAY + 1800 + 30;
        let w = Window::last_day(now, 900);
        let today = w.today;
        let rows = Rows {
            minutes: vec![
                // Bin 0 of today: 1200 W and 600 W, one minute each, no
                // minute in between: the average of the two, not of 15.
                minute("a", today, 1200),
                minute("a", today + 600, 600),
                // The bin before today: 500 W.
                minute("a", today - 900, 500),
                // The open minute: over contract, counted, not charted.
                minute("a", w.open_minute, 5000),
            ],
            allocated: UsageAllocation::default(),
        };
        let r = &recent(&rows, &w, &["a", "b"], &h);
        let a = &r["a"];
        let bin = |t: i64| ((t - w.from) / 900) as usize;
        assert_eq!(a.watts.len(), 96);
        assert_eq!(a.watts[bin(today)], Some(900.0));
        assert_eq!(a.watts[bin(today - 900)], Some(500.0));
        // The bin holding the open minute has nothing else: a gap.
        assert_eq!(a.watts[bin(w.open_minute)], None);
        assert_eq!(a.watts.iter().flatten().count(), 2);
        assert!(a.contract_watts.iter().all(|c| *c == Some(1000.0)));
        // 1200 W and 5000 W minutes are over 1 kW; yesterday's is not today.
        assert_eq!(a.over_contract_today_s, 120);
        assert_eq!(a.energy_today_mj, (1200 + 600 + 5000) * 60_000);
        // A tenant with no rows: all gaps, and no contract line.
        let b = &r["b"];
        assert!(b.watts.iter().all(Option::is_none));
        assert!(b.contract_watts.iter().all(Option::is_none));
        assert_eq!(b.over_contract_today_s, 0);
    }

    #[test]
    fn a_node_contract_charts_node_energy_and_gaps_without_node_readings() {
        let h = history("[[tenant]]\nid = \"n\"\ncontracted_kw = 1\nbasis = \"node\"\n");
        let now = 3 * DAY + 600;
        let w = Window::last_day(now, 300);
        let mut gpu_only = minute("n", w.today, 2000);
        let mut with_node = minute("n", w.today + 300, 100);
        with_node.2.node_energy_mj = 1500 * 60_000;
        with_node.2.node_ns = 60_000_000_000;
        gpu_only.2.node_energy_mj = 0;
        let rows = Rows {
            minutes: vec![gpu_only, with_node],
            allocated: UsageAllocation::default(),
        };
        let n = &recent(&rows, &w, &["n"], &h)["n"];
        let bin = |t: i64| ((t - w.from) / 300) as usize;
        assert_eq!(n.watts[bin(w.today)], None, "GPU power is no node reading");
        assert_eq!(n.watts[bin(w.today + 300)], Some(1500.0));
        // Only the node minute is over 1 kW on the node basis.
        assert_eq!(n.over_contract_today_s, 60);
    }

    /// Energy that reached a minute after it was final (an adjustment) is
    /// that minute's for the status page too: its power and today's time
    /// over contract count it, as the over-contract counter does.
    #[test]
    fn late_energy_counts_in_its_minute() {
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut ledger = crate::ledger::Ledger::create(&path).unwrap();
        let now = 10 * DAY + 3600;
        let w = Window::last_day(now, 300);
        let minute_at = now - 1800;
        let bucket = |mj: u64| BucketDelta {
            energy_mj: mj,
            gpu_ns: 60_000_000_000,
            samples: 60,
            ..BucketDelta::default()
        };
        let mut c = crate::ledger::Commit::default();
        c.nodes
            .insert(Arc::from("n1"), crate::ledger::NodeCursor::default());
        // 500 W for the minute, final at once.
        c.buckets.insert(
            (Arc::from("a"), Arc::from("n1"), minute_at),
            bucket(30_000_000),
        );
        ledger.commit_at(&c, now, now - 60).unwrap();
        // 1 kW more of it, late: an adjustment.
        c.buckets.insert(
            (Arc::from("a"), Arc::from("n1"), minute_at),
            bucket(60_000_000),
        );
        ledger.commit_at(&c, now, now - 60).unwrap();
        let reader = crate::ledger::Reader::open(&path).unwrap();
        let rows = read(&reader, None, &w).unwrap();
        assert_eq!(rows.minutes.len(), 1);
        assert_eq!(rows.minutes[0].2.energy_mj, 90_000_000);
        let h = history("[[tenant]]\nid = \"a\"\ncontracted_kw = 1\n");
        let r = &recent(&rows, &w, &["a"], &h)["a"];
        assert_eq!(r.over_contract_today_s, 60);
        assert_eq!(r.energy_today_mj, 90_000_000);
        let bin = ((minute_at - w.from) / w.bin) as usize;
        assert_eq!(r.watts[bin], Some(1500.0));
    }

    /// Invariant: a reload that reads only what may have changed (the
    /// minutes from the watermark on, the adjustments booked since) gives
    /// the rows a whole read gives, across commits of open minutes, late
    /// energy to final ones, a moving watermark and window, and a ledger
    /// whose revision went back.
    #[test]
    fn a_reload_from_kept_minutes_reads_what_a_whole_read_does() {
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut ledger = crate::ledger::Ledger::create(&path).unwrap();
        let now = 10 * DAY + 3600;
        let bucket = |mj: u64| BucketDelta {
            energy_mj: mj,
            gpu_ns: 60_000_000_000,
            samples: 60,
            ..BucketDelta::default()
        };
        let commit = |minutes: &[(&str, &str, i64, u64)]| {
            let mut c = crate::ledger::Commit::default();
            for (t, n, m, mj) in minutes {
                c.nodes
                    .insert(Arc::from(*n), crate::ledger::NodeCursor::default());
                c.buckets
                    .insert((Arc::from(*t), Arc::from(*n), *m), bucket(*mj));
            }
            c
        };
        let minute = |k: i64| now - 3600 + k * MINUTE;
        // An hour of two tenants on two nodes, final up to 20 minutes ago.
        let mut first = Vec::new();
        for k in 0..60 {
            first.push(("a", "n1", minute(k), 1_000 + k as u64));
            first.push(("b", "n2", minute(k), 2_000 + k as u64));
        }
        ledger
            .commit_at(&commit(&first), now, now - 20 * MINUTE)
            .unwrap();
        let reader = crate::ledger::Reader::open(&path).unwrap();
        let w = Window::last_day(now, 300);
        let mut kept = None;
        for tenant in [None, Some("a")] {
            let mut k = None;
            assert_eq!(
                read_kept(&reader, tenant, &w, &mut k).unwrap().minutes,
                read(&reader, tenant, &w).unwrap().minutes
            );
        }
        assert_eq!(
            read_kept(&reader, None, &w, &mut kept).unwrap().minutes,
            read(&reader, None, &w).unwrap().minutes
        );
        assert_eq!(kept.as_ref().unwrap().through, now - 20 * MINUTE);

        // Late energy to a kept minute (an adjustment), more energy to an
        // open one, the watermark on by 5 minutes, a new minute.
        ledger
            .commit_at(
                &commit(&[
                    ("a", "n1", minute(10), 7),
                    ("b", "n2", minute(50), 9),
                    ("a", "n1", minute(60), 11),
                ]),
                now + 60,
                now - 15 * MINUTE,
            )
            .unwrap();
        let w = Window::last_day(now + 60, 300);
        let whole = read(&reader, None, &w).unwrap().minutes;
        assert_eq!(
            read_kept(&reader, None, &w, &mut kept).unwrap().minutes,
            whole
        );
        assert_eq!(kept.as_ref().unwrap().through, now - 15 * MINUTE);
        let late = whole
            .iter()
            .find(|(t, m, _)| t == "a" && *m == minute(10))
            .unwrap();
        assert_eq!(late.2.energy_mj, 1_010 + 7);
        // Read again with nothing new: the same.
        assert_eq!(
            read_kept(&reader, None, &w, &mut kept).unwrap().minutes,
            whole
        );

        // A day later the window has moved past every minute.
        let w = Window::last_day(now + DAY + 3600, 300);
        assert_eq!(
            read_kept(&reader, None, &w, &mut kept).unwrap().minutes,
            read(&reader, None, &w).unwrap().minutes
        );

        // A ledger that went back (another one read in its place, one
        // commit): read whole again, nothing of the old one kept.
        let path = dir.path().join("other.db");
        let mut ledger = crate::ledger::Ledger::create(&path).unwrap();
        ledger
            .commit_at(
                &commit(&[("a", "n1", minute(30), 5)]),
                now,
                now - 20 * MINUTE,
            )
            .unwrap();
        let reader = crate::ledger::Reader::open(&path).unwrap();
        let w = Window::last_day(now, 300);
        // Minutes kept from another ledger, up to date through `revision`,
        // read against this one: read whole, nothing of them kept.
        let from_another = |revision: u64| {
            let mut kept = Some(Kept {
                from: w.from,
                through: now - 10 * MINUTE,
                revision,
                minutes: [(("a".to_string(), minute(40)), bucket(1))].into(),
            });
            let got = read_kept(&reader, None, &w, &mut kept).unwrap().minutes;
            assert_eq!(got, read(&reader, None, &w).unwrap().minutes);
            assert_eq!(got.len(), 1);
        };
        // Its revision went back.
        from_another(99);
        // One restored and committed past the kept revision: its watermark
        // is behind the kept minutes, so it is read whole too.
        from_another(1);
    }
}
