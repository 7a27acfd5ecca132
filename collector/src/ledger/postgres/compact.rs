//! Compaction: closed hours rolled up and retention applied, in one
//! transaction, under the lease (checked by the database's clock in the
//! same transaction). The same rules as the SQLite ledger's (see
//! `sqlite::compact`): rollups rebuilt from what they cover, minutes
//! dropped only once their hour is rolled up.

use std::sync::Arc;

use super::{BUCKET_COLUMNS, Fail, Shared, i64_of, kept_from, u64_of};
use crate::ledger::{Compacted, Compaction, CompactionLease, DAY, HOUR, LedgerError, MINUTE};
use crate::tenants::TenantHistory;

/// Most hours one compaction rolls up (as the SQLite ledger).
const HOURS_PER_ROUND: i64 = 48;

pub(super) fn compact(
    shared: &Arc<Shared>,
    lease: Option<&CompactionLease>,
    policy: &Compaction,
    contracts: &TenantHistory,
) -> Result<Compacted, LedgerError> {
    let lease = lease.cloned();
    let policy = *policy;
    let contracts = contracts.clone();
    let s = shared.clone();
    shared.call(move |mut client| async move {
        let r = run(&s, &mut client, lease, policy, contracts).await;
        (client, r)
    })
}

async fn run(
    s: &Shared,
    client: &mut deadpool_postgres::Object,
    lease: Option<CompactionLease>,
    policy: Compaction,
    contracts: TenantHistory,
) -> Result<Compacted, Fail> {
    let tx = client.transaction().await?;
    if let Some(lease) = &lease
        && !super::claim::lease_held(&tx, lease).await?
    {
        return Err(Fail::Ledger(LedgerError::LeaseLost {
            holder: lease.holder.clone(),
        }));
    }
    // A meter's allocation splits its minutes again only while they are
    // kept minute by minute; its state rows, locked here first, keep it
    // from writing while this folds them (it then finds them gone).
    tx.execute(
        "SELECT meter FROM meter_state ORDER BY meter FOR UPDATE",
        &[],
    )
    .await?;
    // Only hours the ledger's watermark has passed: a commit books a
    // minute before the watermark as a live row (not an adjustment), and
    // the compactor's clock is not the committers'. An hour rolled up
    // before a late live row of it landed would miss it for good.
    let finalized: i64 = tx
        .query_one("SELECT finalized_through FROM watermark WHERE id = 1", &[])
        .await?
        .try_get(0)?;
    let policy = Compaction {
        closed_before: policy.closed_before.min(finalized),
        ..policy
    };
    let mut done = Compacted::default();
    let hours: Vec<i64> = tx
        .query(
            "SELECT hour_start FROM rollup_pending WHERE hour_start + 3600 <= $1
             ORDER BY hour_start LIMIT $2",
            &[&policy.closed_before, &HOURS_PER_ROUND],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let cols = BUCKET_COLUMNS.join(", ");
    let sums = BUCKET_COLUMNS
        .iter()
        .map(|c| format!("SUM({c})"))
        .collect::<Vec<_>>()
        .join(", ");
    let clear = tx
        .prepare("DELETE FROM usage_rollup WHERE period = $1 AND start = $2")
        .await?;
    let clear_peak = tx
        .prepare("DELETE FROM demand_rollup WHERE period = $1 AND start = $2")
        .await?;
    let hour = tx
        .prepare(&format!(
            "INSERT INTO usage_rollup (period, start, tenant, node, {cols})
             SELECT 3600, $1, tenant, node, {sums} FROM usage_minute
             WHERE minute_start >= $1 AND minute_start < $1 + 3600
             GROUP BY tenant, node"
        ))
        .await?;
    let hour_peak = tx
        .prepare(
            "INSERT INTO demand_rollup (period, start, tenant, peak_quarter_mj, node_peak_quarter_mj)
             SELECT 3600, $1, tenant, MAX(e), MAX(n) FROM (
                SELECT tenant, minute_start / 900 AS quarter, SUM(energy_mj) AS e,
                            SUM(node_energy_mj) AS n
                FROM usage_minute
                WHERE minute_start >= $1 AND minute_start < $1 + 3600
                GROUP BY tenant, quarter) q
             GROUP BY tenant",
        )
        .await?;
    let day = tx
        .prepare(&format!(
            "INSERT INTO usage_rollup (period, start, tenant, node, {cols})
             SELECT 86400, $1, tenant, node, {sums} FROM usage_rollup
             WHERE period = 3600 AND start >= $1 AND start < $1 + 86400
             GROUP BY tenant, node"
        ))
        .await?;
    let day_peak = tx
        .prepare(
            "INSERT INTO demand_rollup
                (period, start, tenant, peak_quarter_mj, over_contract_ns, overage_mj,
                    node_peak_quarter_mj, allocated_mj, allocated_node_mj,
                    facility_peak_quarter_mj)
             SELECT 86400, $1, tenant, MAX(peak_quarter_mj), SUM(over_contract_ns),
                SUM(overage_mj), MAX(node_peak_quarter_mj), SUM(allocated_mj),
                SUM(allocated_node_mj),
                CASE WHEN COUNT(facility_peak_quarter_mj) = COUNT(*)
                    THEN MAX(facility_peak_quarter_mj) END
             FROM demand_rollup
             WHERE period = 3600 AND start >= $1 AND start < $1 + 86400
             GROUP BY tenant",
        )
        .await?;
    let add = tx
        .prepare(&format!(
            "INSERT INTO usage_rollup (period, start, tenant, node, {cols})
             SELECT $2, $3, tenant, node, {sums} FROM usage_minute
             WHERE minute_start >= $1 AND minute_start < $1 + 3600
             GROUP BY tenant, node
             ON CONFLICT (period, start, tenant, node) DO UPDATE SET {}",
            BUCKET_COLUMNS
                .iter()
                .map(|c| format!("{c} = usage_rollup.{c} + excluded.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .await?;
    let add_peak = tx
        .prepare(
            "INSERT INTO demand_rollup (period, start, tenant, peak_quarter_mj, node_peak_quarter_mj)
             SELECT $2, $3, tenant, MAX(e), MAX(n) FROM (
                SELECT tenant, minute_start / 900 AS quarter, SUM(energy_mj) AS e,
                            SUM(node_energy_mj) AS n
                FROM usage_minute
                WHERE minute_start >= $1 AND minute_start < $1 + 3600
                GROUP BY tenant, quarter) q
             GROUP BY tenant
             ON CONFLICT (period, start, tenant) DO UPDATE
                SET peak_quarter_mj =
                    GREATEST(demand_rollup.peak_quarter_mj, excluded.peak_quarter_mj),
                    node_peak_quarter_mj = GREATEST(
                        demand_rollup.node_peak_quarter_mj, excluded.node_peak_quarter_mj)",
        )
        .await?;
    let minutes_of_hour = tx
        .prepare(
            "SELECT tenant, minute_start, SUM(energy_mj)::int8, SUM(node_energy_mj)::int8
             FROM usage_minute
             WHERE minute_start >= $1 AND minute_start < $1 + 3600
             GROUP BY tenant, minute_start",
        )
        .await?;
    let allocations_of_hour = tx
        .prepare(
            "SELECT tenant, minute_start, SUM(allocated_mj)::int8, SUM(node_mj)::int8
             FROM meter_allocation
             WHERE minute_start >= $1 AND minute_start < $1 + 3600
             GROUP BY tenant, minute_start",
        )
        .await?;
    // A tenant the meters gave a part of a minute it has no bucket in
    // (its energy there all booked late) gets a row of its own.
    let set_over = tx
        .prepare(
            "INSERT INTO demand_rollup (period, start, tenant, peak_quarter_mj,
                node_peak_quarter_mj, over_contract_ns, overage_mj, allocated_mj,
                allocated_node_mj, facility_peak_quarter_mj)
             VALUES ($1, $2, $3, 0, 0, $4, $5, $6, $7, $8)
             ON CONFLICT (period, start, tenant) DO UPDATE
                SET over_contract_ns = excluded.over_contract_ns,
                    overage_mj = excluded.overage_mj,
                    allocated_mj = excluded.allocated_mj,
                    allocated_node_mj = excluded.allocated_node_mj,
                    facility_peak_quarter_mj = excluded.facility_peak_quarter_mj",
        )
        .await?;
    // A rollup without a facility peak (from before) keeps none.
    let add_over = tx
        .prepare(
            "INSERT INTO demand_rollup (period, start, tenant, peak_quarter_mj,
                node_peak_quarter_mj, over_contract_ns, overage_mj, allocated_mj,
                allocated_node_mj, facility_peak_quarter_mj)
             VALUES ($1, $2, $3, 0, 0, $4, $5, $6, $7, $8)
             ON CONFLICT (period, start, tenant) DO UPDATE
                SET over_contract_ns = demand_rollup.over_contract_ns + excluded.over_contract_ns,
                    overage_mj = demand_rollup.overage_mj + excluded.overage_mj,
                    allocated_mj = demand_rollup.allocated_mj + excluded.allocated_mj,
                    allocated_node_mj =
                        demand_rollup.allocated_node_mj + excluded.allocated_node_mj,
                    facility_peak_quarter_mj =
                        CASE WHEN demand_rollup.facility_peak_quarter_mj IS NULL THEN NULL
                        ELSE GREATEST(demand_rollup.facility_peak_quarter_mj,
                            excluded.facility_peak_quarter_mj) END",
        )
        .await?;
    let (old_minutes_from, old_hours_from) =
        (kept_from(&tx, MINUTE).await?, kept_from(&tx, HOUR).await?);
    let mut days = Vec::new();
    for &h in &hours {
        let d = h.div_euclid(DAY) * DAY;
        // Each tenant-minute of the hour against its contract, with what
        // the meters allocated of it (`roll_minutes`).
        let read = async |q: &tokio_postgres::Statement,
                          what: &'static str|
               -> Result<Vec<(String, i64, u64, u64)>, Fail> {
            let mut out = Vec::new();
            for row in tx.query(q, &[&h]).await? {
                out.push((
                    row.try_get(0)?,
                    row.try_get(1)?,
                    u64_of(s, row.try_get(2)?, what)?,
                    u64_of(s, row.try_get(3)?, what)?,
                ));
            }
            Ok(out)
        };
        let minutes = read(&minutes_of_hour, "minute energy").await?;
        let allocated = read(&allocations_of_hour, "allocated energy").await?;
        let mut over = Vec::new();
        for (t, r) in crate::ledger::roll_minutes(minutes, allocated, &contracts) {
            over.push((
                t,
                [
                    i64_of(s, r.over_contract_ns, "over-contract time")?,
                    i64_of(s, r.overage_mj, "overage")?,
                    i64_of(s, r.metered.allocated_mj, "allocated energy")?,
                    i64_of(s, r.metered.node_mj, "allocated node energy")?,
                    i64_of(s, r.facility_peak_quarter_mj, "facility peak")?,
                ],
            ));
        }
        if h >= old_minutes_from {
            tx.execute(&clear, &[&HOUR, &h]).await?;
            tx.execute(&clear_peak, &[&HOUR, &h]).await?;
            tx.execute(&hour, &[&h]).await?;
            tx.execute(&hour_peak, &[&h]).await?;
            for (t, v) in &over {
                tx.execute(
                    &set_over,
                    &[&HOUR, &h, t, &v[0], &v[1], &v[2], &v[3], &v[4]],
                )
                .await?;
            }
        } else if h >= old_hours_from {
            tx.execute(&add, &[&h, &HOUR, &h]).await?;
            tx.execute(&add_peak, &[&h, &HOUR, &h]).await?;
            for (t, v) in &over {
                tx.execute(
                    &add_over,
                    &[&HOUR, &h, t, &v[0], &v[1], &v[2], &v[3], &v[4]],
                )
                .await?;
            }
        }
        if d >= old_hours_from {
            days.push(d);
        } else {
            tx.execute(&add, &[&h, &DAY, &d]).await?;
            tx.execute(&add_peak, &[&h, &DAY, &d]).await?;
            for (t, v) in &over {
                tx.execute(&add_over, &[&DAY, &d, t, &v[0], &v[1], &v[2], &v[3], &v[4]])
                    .await?;
            }
        }
        if h < old_minutes_from {
            tx.execute(
                "DELETE FROM usage_minute WHERE minute_start >= $1 AND minute_start < $1 + 3600",
                &[&h],
            )
            .await?;
        }
    }
    days.dedup();
    for &d in &days {
        tx.execute(&clear, &[&DAY, &d]).await?;
        tx.execute(&clear_peak, &[&DAY, &d]).await?;
        tx.execute(&day, &[&d]).await?;
        tx.execute(&day_peak, &[&d]).await?;
    }
    tx.execute(
        "DELETE FROM rollup_pending WHERE hour_start = ANY($1)",
        &[&hours],
    )
    .await?;
    done.hours_rolled_up = hours.len();
    done.days_rolled_up = days.len();
    let oldest_pending: Option<i64> = tx
        .query_one("SELECT MIN(hour_start) FROM rollup_pending", &[])
        .await?
        .try_get(0)?;
    let minutes_from = policy
        .minutes_from
        .min(policy.closed_before)
        .min(oldest_pending.unwrap_or(i64::MAX))
        .min(policy.allocating_from.unwrap_or(i64::MAX))
        .div_euclid(HOUR)
        * HOUR;
    done.minute_rows_dropped = tx
        .execute(
            "DELETE FROM usage_minute WHERE minute_start < $1",
            &[&minutes_from],
        )
        .await? as usize;
    let keep = tx
        .prepare(
            "INSERT INTO retention (period, kept_from) VALUES ($1, $2)
             ON CONFLICT (period) DO UPDATE
                SET kept_from = GREATEST(retention.kept_from, excluded.kept_from)",
        )
        .await?;
    tx.execute(&keep, &[&MINUTE, &minutes_from]).await?;
    // Meter-minutes go with the minutes they were split by, into hourly
    // sums; never those of an hour still to be rolled up (as the SQLite
    // ledger).
    let meters_from = minutes_from
        .max(old_minutes_from)
        .min(oldest_pending.unwrap_or(i64::MAX))
        .div_euclid(HOUR)
        * HOUR;
    done.meter_rows_rolled_up = super::meter::roll_up(&tx, meters_from).await?;
    let hours_from = policy.hours_from.min(minutes_from).div_euclid(DAY) * DAY;
    let mut dropped = [0usize; 2];
    let mut periods = vec![(HOUR, hours_from)];
    let mut days_from = None;
    if let Some(from) = policy.days_from {
        let from = from.min(hours_from).div_euclid(DAY) * DAY;
        periods.push((DAY, from));
        days_from = Some(from);
    }
    for (i, (period, from)) in periods.into_iter().enumerate() {
        dropped[i] = tx
            .execute(
                "DELETE FROM usage_rollup WHERE period = $1 AND start < $2",
                &[&period, &from],
            )
            .await? as usize;
        tx.execute(
            "DELETE FROM demand_rollup WHERE period = $1 AND start < $2",
            &[&period, &from],
        )
        .await?;
        tx.execute(&keep, &[&period, &from]).await?;
    }
    done.hour_rows_dropped = dropped[0];
    // Per-GPU hours are kept as long as the hourly rollups.
    done.gpu_hour_rows_dropped = tx
        .execute("DELETE FROM gpu_hour WHERE hour_start < $1", &[&hours_from])
        .await? as usize;
    if let Some(from) = days_from {
        done.day_rows_dropped = dropped[1];
        done.adjustment_rows_dropped = tx
            .execute("DELETE FROM adjustment WHERE minute_start < $1", &[&from])
            .await? as usize;
        for table in ["meter_rollup", "meter_allocation_rollup"] {
            tx.execute(&format!("DELETE FROM {table} WHERE start < $1"), &[&from])
                .await?;
        }
    }
    tx.commit().await?;
    Ok(done)
}
