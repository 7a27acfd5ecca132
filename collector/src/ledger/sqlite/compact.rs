//! Compaction: closed hours rolled up into hourly and daily rollups, and
//! retention applied, in one transaction.

use rusqlite::params;

use super::{BUCKET_COLUMNS, Ledger, i64_of, kept_from, sqlite_err, u64_of};
use crate::ledger::{Compacted, Compaction, CompactionLease, DAY, HOUR, LedgerError, MINUTE};
use crate::tenants::TenantHistory;

/// Most hours one compaction rolls up, so that a long backlog (the first
/// round on a ledger from before rollups) does not hold the ledger, and
/// with it every commit and ack, for long.
pub(super) const HOURS_PER_ROUND: i64 = 48;

impl Ledger {
    /// Rolls closed hours up and drops what `policy` no longer keeps, in
    /// one transaction.
    ///
    /// *Invariant:* an hour's rollup is rebuilt from its minutes whenever
    /// a commit touched them (late samples, gap energy), and a day's from
    /// its hours, so every rollup equals the sum of what it covers; minutes
    /// are dropped only after their hour has been rolled up. A rollup's
    /// over-contract time and overage are the sum of its minutes'
    /// `over_contract` against the contract of the version of `contracts`
    /// in force at each minute, evaluated as it is rolled up (they cannot
    /// be evaluated from the sums later).
    pub fn compact(
        &mut self,
        policy: &Compaction,
        contracts: &TenantHistory,
    ) -> Result<Compacted, LedgerError> {
        self.compact_checked(None, policy, contracts)
    }

    /// `compact`, under `lease` at the given time where there is one
    /// (`LedgerWriter::compact_under`): the lease is checked in the
    /// compaction's own transaction.
    pub(super) fn compact_checked(
        &mut self,
        lease: Option<(&CompactionLease, i64)>,
        policy: &Compaction,
        contracts: &TenantHistory,
    ) -> Result<Compacted, LedgerError> {
        let p = self.path.clone();
        let err = sqlite_err(&p);
        let tx = self.conn.transaction().map_err(err)?;
        if let Some((lease, now)) = lease
            && !super::claim::lease_held(&tx, &p, lease, now)?
        {
            return Err(LedgerError::LeaseLost {
                holder: lease.holder.clone(),
            });
        }
        let mut done = Compacted::default();
        {
            let hours: Vec<i64> = {
                let mut q = tx
                    .prepare_cached(
                        "SELECT hour_start FROM rollup_pending WHERE hour_start + 3600 <= ?1
                         ORDER BY hour_start LIMIT ?2",
                    )
                    .map_err(err)?;
                q.query_map([policy.closed_before, HOURS_PER_ROUND], |r| r.get(0))
                    .map_err(err)?
                    .collect::<Result<_, _>>()
                    .map_err(err)?
            };
            let cols = BUCKET_COLUMNS.join(", ");
            let sums = BUCKET_COLUMNS
                .iter()
                .map(|c| format!("SUM({c})"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut clear = tx
                .prepare_cached("DELETE FROM usage_rollup WHERE period = ?1 AND start = ?2")
                .map_err(err)?;
            let mut clear_peak = tx
                .prepare_cached("DELETE FROM demand_rollup WHERE period = ?1 AND start = ?2")
                .map_err(err)?;
            let mut hour = tx
                .prepare_cached(&format!(
                    "INSERT INTO usage_rollup (period, start, tenant, node, {cols})
                     SELECT 3600, ?1, tenant, node, {sums} FROM usage_minute
                     WHERE minute_start >= ?1 AND minute_start < ?1 + 3600
                     GROUP BY tenant, node"
                ))
                .map_err(err)?;
            let mut hour_peak = tx
                .prepare_cached(
                    "INSERT INTO demand_rollup (period, start, tenant, peak_quarter_mj, node_peak_quarter_mj)
                     SELECT 3600, ?1, tenant, MAX(e), MAX(n) FROM (
                        SELECT tenant, minute_start / 900 AS quarter, SUM(energy_mj) AS e,
                            SUM(node_energy_mj) AS n
                        FROM usage_minute
                        WHERE minute_start >= ?1 AND minute_start < ?1 + 3600
                        GROUP BY tenant, quarter)
                     GROUP BY tenant",
                )
                .map_err(err)?;
            let mut day = tx
                .prepare_cached(&format!(
                    "INSERT INTO usage_rollup (period, start, tenant, node, {cols})
                     SELECT 86400, ?1, tenant, node, {sums} FROM usage_rollup
                     WHERE period = 3600 AND start >= ?1 AND start < ?1 + 86400
                     GROUP BY tenant, node"
                ))
                .map_err(err)?;
            let mut day_peak = tx
                .prepare_cached(
                    "INSERT INTO demand_rollup
                        (period, start, tenant, peak_quarter_mj, over_contract_ns, overage_mj,
                            node_peak_quarter_mj, allocated_mj, allocated_node_mj,
                            facility_peak_quarter_mj)
                     SELECT 86400, ?1, tenant, MAX(peak_quarter_mj), SUM(over_contract_ns),
                        SUM(overage_mj), MAX(node_peak_quarter_mj), SUM(allocated_mj),
                        SUM(allocated_node_mj),
                        CASE WHEN COUNT(facility_peak_quarter_mj) = COUNT(*)
                            THEN MAX(facility_peak_quarter_mj) END
                     FROM demand_rollup
                     WHERE period = 3600 AND start >= ?1 AND start < ?1 + 86400
                     GROUP BY tenant",
                )
                .map_err(err)?;
            // Minutes that arrived for an hour whose minutes were already
            // dropped (only possible with a retention shorter than the
            // oldest write the collector accepts) are added to the rollups
            // that still exist, never replacing them.
            let mut add = tx
                .prepare_cached(&format!(
                    "INSERT INTO usage_rollup (period, start, tenant, node, {cols})
                     SELECT ?2, ?3, tenant, node, {sums} FROM usage_minute
                     WHERE minute_start >= ?1 AND minute_start < ?1 + 3600
                     GROUP BY tenant, node
                     ON CONFLICT (period, start, tenant, node) DO UPDATE SET {}",
                    BUCKET_COLUMNS
                        .iter()
                        .map(|c| format!("{c} = {c} + excluded.{c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .map_err(err)?;
            let mut add_peak = tx
                .prepare_cached(
                    "INSERT INTO demand_rollup (period, start, tenant, peak_quarter_mj, node_peak_quarter_mj)
                     SELECT ?2, ?3, tenant, MAX(e), MAX(n) FROM (
                        SELECT tenant, minute_start / 900 AS quarter, SUM(energy_mj) AS e,
                            SUM(node_energy_mj) AS n
                        FROM usage_minute
                        WHERE minute_start >= ?1 AND minute_start < ?1 + 3600
                        GROUP BY tenant, quarter)
                     GROUP BY tenant
                     ON CONFLICT (period, start, tenant) DO UPDATE
                        SET peak_quarter_mj = MAX(peak_quarter_mj, excluded.peak_quarter_mj),
                            node_peak_quarter_mj =
                                MAX(node_peak_quarter_mj, excluded.node_peak_quarter_mj)",
                )
                .map_err(err)?;
            // Each tenant-minute of an hour against its contract, with
            // what the meters allocated of it (`roll_minutes`).
            let mut minutes_of_hour = tx
                .prepare_cached(
                    "SELECT tenant, minute_start, SUM(energy_mj), SUM(node_energy_mj)
                     FROM usage_minute
                     WHERE minute_start >= ?1 AND minute_start < ?1 + 3600
                     GROUP BY tenant, minute_start",
                )
                .map_err(err)?;
            let mut allocations_of_hour = tx
                .prepare_cached(
                    "SELECT tenant, minute_start, SUM(allocated_mj), SUM(node_mj)
                     FROM meter_allocation
                     WHERE minute_start >= ?1 AND minute_start < ?1 + 3600
                     GROUP BY tenant, minute_start",
                )
                .map_err(err)?;
            let mut evaluate = |h: i64| -> Result<Vec<(String, [i64; 5])>, LedgerError> {
                let read = |q: &mut rusqlite::CachedStatement<'_>,
                            what: &'static str|
                 -> Result<Vec<(String, i64, u64, u64)>, LedgerError> {
                    let rows = q
                        .query_map([h], |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, i64>(2)?,
                                r.get::<_, i64>(3)?,
                            ))
                        })
                        .map_err(err)?;
                    let mut out = Vec::new();
                    for row in rows {
                        let (t, m, a, b) = row.map_err(err)?;
                        out.push((t, m, u64_of(a, &p, what)?, u64_of(b, &p, what)?));
                    }
                    Ok(out)
                };
                let minutes = read(&mut minutes_of_hour, "minute energy")?;
                let allocated = read(&mut allocations_of_hour, "allocated energy")?;
                crate::ledger::roll_minutes(minutes, allocated, contracts)
                    .into_iter()
                    .map(|(t, r)| {
                        Ok((
                            t,
                            [
                                i64_of(r.over_contract_ns, &p, "over-contract time")?,
                                i64_of(r.overage_mj, &p, "overage")?,
                                i64_of(r.metered.allocated_mj, &p, "allocated energy")?,
                                i64_of(r.metered.node_mj, &p, "allocated node energy")?,
                                i64_of(r.facility_peak_quarter_mj, &p, "facility peak")?,
                            ],
                        ))
                    })
                    .collect()
            };
            // Into the rollup's row written just before: set for a rollup
            // rebuilt from its minutes, added for late minutes added to it
            // (its facility peak, if it has one, the higher of the two). A
            // tenant the meters gave a part of a minute it has no bucket
            // in (its energy there all booked late) gets a row of its own.
            let mut set_over = tx
                .prepare_cached(
                    "INSERT INTO demand_rollup (period, start, tenant, peak_quarter_mj,
                        node_peak_quarter_mj, over_contract_ns, overage_mj, allocated_mj,
                        allocated_node_mj, facility_peak_quarter_mj)
                     VALUES (?1, ?2, ?3, 0, 0, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (period, start, tenant) DO UPDATE
                        SET over_contract_ns = excluded.over_contract_ns,
                            overage_mj = excluded.overage_mj,
                            allocated_mj = excluded.allocated_mj,
                            allocated_node_mj = excluded.allocated_node_mj,
                            facility_peak_quarter_mj = excluded.facility_peak_quarter_mj",
                )
                .map_err(err)?;
            let mut add_over = tx
                .prepare_cached(
                    "INSERT INTO demand_rollup (period, start, tenant, peak_quarter_mj,
                        node_peak_quarter_mj, over_contract_ns, overage_mj, allocated_mj,
                        allocated_node_mj, facility_peak_quarter_mj)
                     VALUES (?1, ?2, ?3, 0, 0, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (period, start, tenant) DO UPDATE
                        SET over_contract_ns = over_contract_ns + excluded.over_contract_ns,
                            overage_mj = overage_mj + excluded.overage_mj,
                            allocated_mj = allocated_mj + excluded.allocated_mj,
                            allocated_node_mj = allocated_node_mj + excluded.allocated_node_mj,
                            facility_peak_quarter_mj =
                                MAX(facility_peak_quarter_mj, excluded.facility_peak_quarter_mj)",
                )
                .map_err(err)?;
            let (old_minutes_from, old_hours_from) =
                (kept_from(&tx, MINUTE, &p)?, kept_from(&tx, HOUR, &p)?);
            let mut days = Vec::new();
            for &h in &hours {
                let d = h.div_euclid(DAY) * DAY;
                let over = evaluate(h)?;
                if h >= old_minutes_from {
                    clear.execute([HOUR, h]).map_err(err)?;
                    clear_peak.execute([HOUR, h]).map_err(err)?;
                    hour.execute([h]).map_err(err)?;
                    hour_peak.execute([h]).map_err(err)?;
                    for (t, v) in &over {
                        set_over
                            .execute(params![HOUR, h, t, v[0], v[1], v[2], v[3], v[4]])
                            .map_err(err)?;
                    }
                } else if h >= old_hours_from {
                    // Only the late minutes are left to evaluate: the
                    // energy dropped with the others is not in them.
                    add.execute([h, HOUR, h]).map_err(err)?;
                    add_peak.execute([h, HOUR, h]).map_err(err)?;
                    for (t, v) in &over {
                        add_over
                            .execute(params![HOUR, h, t, v[0], v[1], v[2], v[3], v[4]])
                            .map_err(err)?;
                    }
                }
                if d >= old_hours_from {
                    days.push(d);
                } else {
                    add.execute([h, DAY, d]).map_err(err)?;
                    add_peak.execute([h, DAY, d]).map_err(err)?;
                    for (t, v) in &over {
                        add_over
                            .execute(params![DAY, d, t, v[0], v[1], v[2], v[3], v[4]])
                            .map_err(err)?;
                    }
                }
                if h < old_minutes_from {
                    // Added once; gone before the next round could add
                    // them again.
                    tx.execute(
                        "DELETE FROM usage_minute WHERE minute_start >= ?1 AND minute_start < ?1 + 3600",
                        [h],
                    )
                    .map_err(err)?;
                }
            }
            days.dedup();
            for &d in &days {
                clear.execute([DAY, d]).map_err(err)?;
                clear_peak.execute([DAY, d]).map_err(err)?;
                day.execute([d]).map_err(err)?;
                day_peak.execute([d]).map_err(err)?;
            }
            let mut unpend = tx
                .prepare_cached("DELETE FROM rollup_pending WHERE hour_start = ?1")
                .map_err(err)?;
            for &h in &hours {
                unpend.execute([h]).map_err(err)?;
            }
            done.hours_rolled_up = hours.len();
            done.days_rolled_up = days.len();
            // Minutes go only where their hours are rolled up: closed, and
            // no longer pending (a long backlog takes several rounds); and
            // only once every configured meter has allocated them, so that
            // a meter down for longer than the minute retention still
            // splits its energy by what was measured when it returns (its
            // `CapwatchMeterDown` alert says why the minutes stay).
            let oldest_pending: Option<i64> = tx
                .query_row("SELECT MIN(hour_start) FROM rollup_pending", [], |r| {
                    r.get(0)
                })
                .map_err(err)?;
            let minutes_from = policy
                .minutes_from
                .min(policy.closed_before)
                .min(oldest_pending.unwrap_or(i64::MAX))
                .min(policy.allocating_from.unwrap_or(i64::MAX))
                .div_euclid(HOUR)
                * HOUR;
            done.minute_rows_dropped = tx
                .execute(
                    "DELETE FROM usage_minute WHERE minute_start < ?1",
                    [minutes_from],
                )
                .map_err(err)?;
            let mut keep = tx
                .prepare_cached(
                    "INSERT INTO retention (period, kept_from) VALUES (?1, ?2)
                     ON CONFLICT (period) DO UPDATE SET kept_from = MAX(kept_from, ?2)",
                )
                .map_err(err)?;
            keep.execute([MINUTE, minutes_from]).map_err(err)?;
            // Meter-minutes go with the minutes they were split by (and
            // those a meter wrote for minutes gone before), into hourly
            // sums; never those of an hour still to be rolled up, whose
            // rollup reads their allocation.
            let meters_from = minutes_from
                .max(old_minutes_from)
                .min(oldest_pending.unwrap_or(i64::MAX))
                .div_euclid(HOUR)
                * HOUR;
            done.meter_rows_rolled_up = super::meter::roll_up(&tx, &p, meters_from)?;
            let mut drop = |period: i64, from: i64| -> Result<usize, LedgerError> {
                let n = tx
                    .execute(
                        "DELETE FROM usage_rollup WHERE period = ?1 AND start < ?2",
                        [period, from],
                    )
                    .map_err(err)?;
                tx.execute(
                    "DELETE FROM demand_rollup WHERE period = ?1 AND start < ?2",
                    [period, from],
                )
                .map_err(err)?;
                keep.execute([period, from]).map_err(err)?;
                Ok(n)
            };
            // Hours go only where their days are rolled up, which closed
            // hours are.
            let hours_from = policy.hours_from.min(minutes_from).div_euclid(DAY) * DAY;
            done.hour_rows_dropped = drop(HOUR, hours_from)?;
            // Per-GPU hours are kept as long as the hourly rollups.
            done.gpu_hour_rows_dropped = tx
                .execute("DELETE FROM gpu_hour WHERE hour_start < ?1", [hours_from])
                .map_err(err)?;
            if let Some(days_from) = policy.days_from {
                let days_from = days_from.min(hours_from).div_euclid(DAY) * DAY;
                done.day_rows_dropped = drop(DAY, days_from)?;
                // Adjustments are kept as long as the days they belong to,
                // and the meters' hourly sums too.
                done.adjustment_rows_dropped = tx
                    .execute(
                        "DELETE FROM adjustment WHERE minute_start < ?1",
                        [days_from],
                    )
                    .map_err(err)?;
                for table in ["meter_rollup", "meter_allocation_rollup"] {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE start < ?1"),
                        [days_from],
                    )
                    .map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)?;
        Ok(done)
    }
}
