//! Facility meters' allocation, as the SQLite ledger's: the state row
//! inserted or moved by a conditional UPDATE in the transaction that
//! writes the minutes, so two collectors never allocate a minute twice.

use std::sync::Arc;

use super::{Fail, Shared, i64_of, u64_of};
use crate::ledger::{LedgerError, MeterMinute, MeterResplit, MeterShare, MeterState, NodeMinute};

/// A register's raw value in a BIGINT: its 64 bits as they are.
fn raw_in(v: u64) -> i64 {
    v as i64
}

fn raw_out(v: i64) -> u64 {
    v as u64
}

pub(super) fn meter_state(
    shared: &Arc<Shared>,
    meter: &str,
) -> Result<Option<MeterState>, LedgerError> {
    let meter = meter.to_string();
    let s = shared.clone();
    shared.call(move |client| async move {
        let r = async {
            let row = client
                .query_opt(
                    "SELECT allocated_through, reading_at_ns, reading_raw, carry_mj, revision
                     FROM meter_state WHERE meter = $1",
                    &[&meter],
                )
                .await?;
            Ok(match row {
                None => None,
                Some(row) => Some(MeterState {
                    allocated_through: row.try_get(0)?,
                    reading_at_ns: row.try_get(1)?,
                    reading_raw: raw_out(row.try_get(2)?),
                    carry_mj: u64_of(&s, row.try_get(3)?, "carry_mj")?,
                    revision: u64_of(&s, row.try_get(4)?, "meter revision")?,
                }),
            })
        }
        .await;
        (client, r)
    })
}

/// `LedgerReader::late_in_meter_minutes`.
pub(super) fn late_in_meter_minutes(
    shared: &Arc<Shared>,
    meter: &str,
    after: u64,
    through: u64,
) -> Result<Vec<(u64, i64, String)>, LedgerError> {
    let meter = meter.to_string();
    let after = i64_of(shared, after, "revision")?;
    let through = i64_of(shared, through, "revision")?;
    let s = shared.clone();
    shared.call(move |client| async move {
        let r = async {
            let rows = client
                .query(
                    "SELECT DISTINCT a.revision, a.minute_start, a.node FROM adjustment a
                     WHERE a.revision > $2 AND a.revision <= $3 AND a.node <> ''
                        AND EXISTS (SELECT 1 FROM meter_minute m
                            WHERE m.meter = $1 AND m.minute_start = a.minute_start)
                     ORDER BY a.revision, a.minute_start, a.node",
                    &[&meter, &after, &through],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                out.push((
                    u64_of(&s, row.try_get(0)?, "revision")?,
                    row.try_get(1)?,
                    row.try_get(2)?,
                ));
            }
            Ok(out)
        }
        .await;
        (client, r)
    })
}

pub(super) fn node_minutes(
    shared: &Arc<Shared>,
    from: i64,
    to: i64,
) -> Result<Vec<NodeMinute>, LedgerError> {
    node_minutes_of(shared, None, from, to)
}

/// Every node whose power readings may still book energy into a minute.
pub(super) fn placing_holds(
    shared: &Arc<Shared>,
) -> Result<Vec<crate::ledger::PlacingHold>, LedgerError> {
    shared.call(move |client| async move {
        let r = async {
            let rows = client
                .query(
                    "SELECT node, placing_from, placing_seen FROM node_claim
                     WHERE placing_from IS NOT NULL AND placing_seen IS NOT NULL",
                    &[],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                out.push(crate::ledger::PlacingHold {
                    node: row.try_get(0)?,
                    from_minute: row.try_get(1)?,
                    seen: row.try_get(2)?,
                });
            }
            Ok(out)
        }
        .await;
        (client, r)
    })
}

/// `node_minutes` of `tenant` alone (`None`: every tenant).
pub(super) fn node_minutes_of(
    shared: &Arc<Shared>,
    tenant: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Vec<NodeMinute>, LedgerError> {
    node_minutes_as_of(shared, tenant, from, to, None)
}

/// `node_minutes_of` with the adjustments booked by `revision` alone
/// (`None`: every one).
pub(super) fn node_minutes_as_of(
    shared: &Arc<Shared>,
    tenant: Option<&str>,
    from: i64,
    to: i64,
    revision: Option<u64>,
) -> Result<Vec<NodeMinute>, LedgerError> {
    let tenant = tenant.map(str::to_string);
    let s = shared.clone();
    shared.call(move |client| async move {
        let r = node_minutes_in(&s, &client, tenant.as_deref(), from, to, revision).await;
        (client, r)
    })
}

/// `node_minutes_as_of` on `client` (a transaction: in its snapshot).
pub(super) async fn node_minutes_in(
    s: &Shared,
    client: &impl deadpool_postgres::GenericClient,
    tenant: Option<&str>,
    from: i64,
    to: i64,
    revision: Option<u64>,
) -> Result<Vec<NodeMinute>, Fail> {
    let revision = revision.map(|r| i64_of(s, r, "revision")).transpose()?;
    let rows = client
        .query(
            "SELECT tenant, node, minute_start,
                (CASE WHEN SUM(node_ns) > 0 OR SUM(node_energy_mj) > 0
                    THEN SUM(node_energy_mj) ELSE SUM(energy_mj) END)::bigint,
                SUM(row_node_mj)::bigint
             FROM (
                SELECT tenant, node, minute_start, node_ns, node_energy_mj, energy_mj,
                    node_energy_mj AS row_node_mj
                FROM usage_minute
                WHERE minute_start >= $1 AND minute_start < $2
                    AND ($3::text IS NULL OR tenant = $3)
                UNION ALL
                SELECT tenant, node, minute_start, node_ns, node_energy_mj, energy_mj, 0
                FROM adjustment
                WHERE node <> '' AND minute_start >= $1 AND minute_start < $2
                    AND ($3::text IS NULL OR tenant = $3)
                    AND ($4::bigint IS NULL OR revision <= $4)
             ) AS m
             GROUP BY minute_start, node, tenant
             ORDER BY minute_start, node, tenant",
            &[&from, &to, &tenant, &revision],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(NodeMinute {
            tenant: row.try_get(0)?,
            node: row.try_get(1)?,
            minute: row.try_get(2)?,
            measured_mj: u64_of(s, row.try_get(3)?, "measured energy")?,
            node_energy_mj: u64_of(s, row.try_get(4)?, "node energy")?,
        });
    }
    Ok(out)
}

pub(super) fn allocate_meter(
    shared: &Arc<Shared>,
    meter: &str,
    from: Option<&MeterState>,
    to: &MeterState,
    minutes: &[MeterMinute],
    again: &[MeterResplit],
) -> Result<bool, LedgerError> {
    let meter = meter.to_string();
    let from = from.copied();
    let to = *to;
    // Columns of the minutes and of the tenants' parts, as arrays.
    let mut m_minute = Vec::new();
    let mut m_cols: [Vec<i64>; 3] = Default::default();
    let mut t_tenant = Vec::new();
    let mut t_minute = Vec::new();
    let mut t_cols: [Vec<i64>; 3] = Default::default();
    // The adjustments the allocation books: parts with something in them.
    let (mut a_tenant, mut a_minute) = (Vec::new(), Vec::new());
    let mut a_cols: [Vec<i64>; 2] = Default::default();
    for m in minutes {
        m_minute.push(m.minute);
        m_cols[0].push(i64_of(shared, m.metered_mj, "metered_mj")?);
        m_cols[1].push(i64_of(shared, m.measured_mj, "measured_mj")?);
        m_cols[2].push(i64_of(shared, m.unallocated_mj, "unallocated_mj")?);
        for t in &m.tenants {
            if t.allocated_mj > 0 || t.node_mj > 0 {
                a_tenant.push(t.tenant.clone());
                a_minute.push(m.minute);
                a_cols[0].push(i64_of(shared, t.allocated_mj, "allocated_mj")?);
                a_cols[1].push(i64_of(shared, t.node_mj, "node_mj")?);
            }
        }
    }
    // The minutes split again: their new figures, their changes (with the
    // allocation's adjustments).
    let mut g_minute = Vec::new();
    let mut g_cols: [Vec<i64>; 3] = Default::default();
    for a in again {
        let m = &a.minute;
        g_minute.push(m.minute);
        g_cols[0].push(i64_of(shared, m.measured_mj, "measured_mj")?);
        g_cols[1].push(i64_of(shared, m.unallocated_mj, "unallocated_mj")?);
        g_cols[2].push(i64_of(shared, m.metered_mj, "metered_mj")?);
        for (tenant, allocated, node) in &a.changes {
            a_tenant.push(tenant.clone());
            a_minute.push(m.minute);
            a_cols[0].push(*allocated);
            a_cols[1].push(*node);
        }
    }
    // Every part written: the new minutes' and those split again.
    for m in minutes.iter().chain(again.iter().map(|a| &a.minute)) {
        for t in &m.tenants {
            t_tenant.push(t.tenant.clone());
            t_minute.push(m.minute);
            t_cols[0].push(i64_of(shared, t.measured_mj, "measured_mj")?);
            t_cols[1].push(i64_of(shared, t.allocated_mj, "allocated_mj")?);
            t_cols[2].push(i64_of(shared, t.node_mj, "node_mj")?);
        }
    }
    let pending: Vec<i64> = m_minute.iter().chain(&g_minute).copied().collect();
    let carry = i64_of(shared, to.carry_mj, "carry_mj")?;
    let to_revision = i64_of(shared, to.revision, "meter revision")?;
    let from_revision = from
        .map(|f| i64_of(shared, f.revision, "meter revision"))
        .transpose()?;
    shared.call(move |mut client| async move {
        let r = async {
            let tx = client.transaction().await?;
            let moved = match from {
                None => {
                    tx.execute(
                        "INSERT INTO meter_state
                            (meter, allocated_through, reading_at_ns, reading_raw, carry_mj,
                                revision)
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (meter) DO NOTHING",
                        &[
                            &meter,
                            &to.allocated_through,
                            &to.reading_at_ns,
                            &raw_in(to.reading_raw),
                            &carry,
                            &to_revision,
                        ],
                    )
                    .await?
                }
                Some(f) => {
                    tx.execute(
                        "UPDATE meter_state SET allocated_through = $2, reading_at_ns = $3,
                            reading_raw = $4, carry_mj = $5, revision = $6
                         WHERE meter = $1 AND allocated_through = $7 AND revision = $8",
                        &[
                            &meter,
                            &to.allocated_through,
                            &to.reading_at_ns,
                            &raw_in(to.reading_raw),
                            &carry,
                            &to_revision,
                            &f.allocated_through,
                            &from_revision,
                        ],
                    )
                    .await?
                }
            };
            if moved == 0 {
                // Dropped: rolls back.
                return Ok(false);
            }
            if !g_minute.is_empty() {
                // Each minute split again is still kept minute by minute
                // (compaction locks the meters' state rows before it folds
                // minutes, so it folded none since this read them), else
                // nothing is written.
                let kept = tx
                    .execute(
                        "UPDATE meter_minute m SET measured_mj = x.me, unallocated_mj = x.un
                         FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
                            AS x (mi, me, un, mt)
                         WHERE m.meter = $1 AND m.minute_start = x.mi AND m.metered_mj = x.mt",
                        &[&meter, &g_minute, &g_cols[0], &g_cols[1], &g_cols[2]],
                    )
                    .await?;
                if kept != g_minute.len() as u64 {
                    return Ok(false);
                }
                tx.execute(
                    "DELETE FROM meter_allocation WHERE meter = $1 AND minute_start = ANY($2)",
                    &[&meter, &g_minute],
                )
                .await?;
            }
            // The allocation restates the minutes' facility energy: booked
            // as adjustments of a revision of its own (as the SQLite
            // ledger), the watermark row locked before any other row a
            // commit also writes, in the order commits lock them.
            if !a_tenant.is_empty() {
                let revision: i64 = tx
                    .query_one(
                        "UPDATE watermark SET revision = revision + 1 WHERE id = 1
                         RETURNING revision",
                        &[],
                    )
                    .await?
                    .try_get(0)?;
                tx.execute(
                    &format!(
                        "INSERT INTO adjustment (revision, booked_at, tenant, node, minute_start,
                            {}, facility_allocated_mj, facility_node_mj)
                         SELECT $1, ledger_now(), t, '', m, {}, a, n
                         FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
                            AS x (t, m, a, n)",
                        super::BUCKET_COLUMNS.join(", "),
                        ["0"; crate::ledger::BUCKET_FIELDS].join(", ")
                    ),
                    &[&revision, &a_tenant, &a_minute, &a_cols[0], &a_cols[1]],
                )
                .await?;
            }
            tx.execute(
                "INSERT INTO meter_minute
                    (meter, minute_start, metered_mj, measured_mj, unallocated_mj)
                 SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])",
                &[&meter, &m_minute, &m_cols[0], &m_cols[1], &m_cols[2]],
            )
            .await?;
            tx.execute(
                "INSERT INTO meter_allocation
                    (meter, tenant, minute_start, measured_mj, allocated_mj, node_mj)
                 SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                    $6::bigint[])",
                &[
                    &meter, &t_tenant, &t_minute, &t_cols[0], &t_cols[1], &t_cols[2],
                ],
            )
            .await?;
            // The hours of the minutes are rolled up again, with their
            // allocation.
            tx.execute(
                "INSERT INTO rollup_pending (hour_start)
                 SELECT DISTINCT m - m % 3600 FROM unnest($1::bigint[]) AS m
                 ON CONFLICT DO NOTHING",
                &[&pending],
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        }
        .await;
        (client, r)
    })
}

pub(super) fn meter_minutes(
    shared: &Arc<Shared>,
    meter: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Vec<(String, MeterMinute)>, LedgerError> {
    let meter = meter.map(str::to_string);
    let s = shared.clone();
    shared.call(move |client| async move {
        let r = meter_minutes_in(&s, &client, meter.as_deref(), from, to).await;
        (client, r)
    })
}

/// Where each meter's allocation started (`UsageAllocation::started`),
/// on `client` (a transaction: in its snapshot).
pub(super) async fn meters_started_in(
    client: &impl deadpool_postgres::GenericClient,
) -> Result<Vec<(String, i64)>, Fail> {
    let rows = client
        .query(
            "SELECT meter, MIN(m) FROM (
                SELECT meter, allocated_through AS m FROM meter_state
                UNION ALL SELECT meter, MIN(minute_start) FROM meter_minute GROUP BY meter
                UNION ALL SELECT meter, MIN(start) FROM meter_rollup GROUP BY meter
             ) AS s
             GROUP BY meter ORDER BY meter",
            &[],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push((row.try_get(0)?, row.try_get(1)?));
    }
    Ok(out)
}

/// `meter_minutes` on `client` (a transaction: in its snapshot).
pub(super) async fn meter_minutes_in(
    s: &Shared,
    client: &impl deadpool_postgres::GenericClient,
    meter: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Vec<(String, MeterMinute)>, Fail> {
    let rows = client
        .query(
            "SELECT m.meter, m.minute_start, m.metered_mj, m.measured_mj, m.unallocated_mj,
                    a.tenant, a.measured_mj, a.allocated_mj, a.node_mj
             FROM meter_minute m
             LEFT JOIN meter_allocation a
                ON a.meter = m.meter AND a.minute_start = m.minute_start
             WHERE ($1::text IS NULL OR m.meter = $1)
               AND m.minute_start >= $2 AND m.minute_start < $3
             ORDER BY m.meter, m.minute_start, a.tenant",
            &[&meter, &from, &to],
        )
        .await?;
    let mut out: Vec<(String, MeterMinute)> = Vec::new();
    for row in rows {
        let meter: String = row.try_get(0)?;
        let minute: i64 = row.try_get(1)?;
        let same = out
            .last()
            .is_some_and(|(m, mm)| *m == meter && mm.minute == minute);
        if !same {
            out.push((
                meter,
                MeterMinute {
                    minute,
                    metered_mj: u64_of(s, row.try_get(2)?, "metered_mj")?,
                    measured_mj: u64_of(s, row.try_get(3)?, "measured_mj")?,
                    unallocated_mj: u64_of(s, row.try_get(4)?, "unallocated_mj")?,
                    tenants: Vec::new(),
                },
            ));
        }
        if let Some(tenant) = row.try_get::<_, Option<String>>(5)?
            && let Some((_, mm)) = out.last_mut()
        {
            let measured: i64 = row.try_get(6)?;
            let allocated: i64 = row.try_get(7)?;
            let node: i64 = row.try_get(8)?;
            mm.tenants.push(MeterShare {
                tenant,
                measured_mj: u64_of(s, measured, "measured_mj")?,
                allocated_mj: u64_of(s, allocated, "allocated_mj")?,
                node_mj: u64_of(s, node, "node_mj")?,
            });
        }
    }
    Ok(out)
}

/// Folds the meter-minutes and tenants' parts before `before` (an hour
/// start) into hourly sums, added to those there are, and drops them (as
/// the SQLite ledger). Returns how many meter-minutes were folded.
pub(super) async fn roll_up(
    tx: &deadpool_postgres::Transaction<'_>,
    before: i64,
) -> Result<usize, tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO meter_rollup (meter, start, minutes, metered_mj, measured_mj, unallocated_mj)
         SELECT meter, minute_start - minute_start % 3600, COUNT(*), SUM(metered_mj),
            SUM(measured_mj), SUM(unallocated_mj)
         FROM meter_minute WHERE minute_start < $1
         GROUP BY meter, minute_start - minute_start % 3600
         ON CONFLICT (meter, start) DO UPDATE
            SET minutes = meter_rollup.minutes + excluded.minutes,
                metered_mj = meter_rollup.metered_mj + excluded.metered_mj,
                measured_mj = meter_rollup.measured_mj + excluded.measured_mj,
                unallocated_mj = meter_rollup.unallocated_mj + excluded.unallocated_mj",
        &[&before],
    )
    .await?;
    tx.execute(
        "INSERT INTO meter_allocation_rollup
            (meter, start, tenant, measured_mj, allocated_mj, node_mj)
         SELECT meter, minute_start - minute_start % 3600, tenant, SUM(measured_mj),
            SUM(allocated_mj), SUM(node_mj)
         FROM meter_allocation WHERE minute_start < $1
         GROUP BY meter, minute_start - minute_start % 3600, tenant
         ON CONFLICT (meter, start, tenant) DO UPDATE
            SET measured_mj = meter_allocation_rollup.measured_mj + excluded.measured_mj,
                allocated_mj = meter_allocation_rollup.allocated_mj + excluded.allocated_mj,
                node_mj = meter_allocation_rollup.node_mj + excluded.node_mj",
        &[&before],
    )
    .await?;
    tx.execute(
        "DELETE FROM meter_allocation WHERE minute_start < $1",
        &[&before],
    )
    .await?;
    let n = tx
        .execute(
            "DELETE FROM meter_minute WHERE minute_start < $1",
            &[&before],
        )
        .await?;
    Ok(n as usize)
}

/// The hourly sums of `meter` (`None`: every meter) starting in
/// `[from, to)` (as the SQLite ledger's).
pub(super) fn meter_hours(
    shared: &Arc<Shared>,
    meter: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Vec<(String, u64, MeterMinute)>, LedgerError> {
    let meter = meter.map(str::to_string);
    let s = shared.clone();
    shared.call(move |client| async move {
        let r = async {
            let rows = client
                .query(
                    "SELECT m.meter, m.start, m.minutes, m.metered_mj, m.measured_mj,
                            m.unallocated_mj, a.tenant, a.measured_mj, a.allocated_mj, a.node_mj
                     FROM meter_rollup m
                     LEFT JOIN meter_allocation_rollup a
                        ON a.meter = m.meter AND a.start = m.start
                     WHERE ($1::text IS NULL OR m.meter = $1) AND m.start >= $2 AND m.start < $3
                     ORDER BY m.meter, m.start, a.tenant",
                    &[&meter, &from, &to],
                )
                .await?;
            let mut out: Vec<(String, u64, MeterMinute)> = Vec::new();
            for row in rows {
                let meter: String = row.try_get(0)?;
                let start: i64 = row.try_get(1)?;
                let same = out
                    .last()
                    .is_some_and(|(m, _, mm)| *m == meter && mm.minute == start);
                if !same {
                    out.push((
                        meter,
                        u64_of(&s, row.try_get(2)?, "minutes")?,
                        MeterMinute {
                            minute: start,
                            metered_mj: u64_of(&s, row.try_get(3)?, "metered_mj")?,
                            measured_mj: u64_of(&s, row.try_get(4)?, "measured_mj")?,
                            unallocated_mj: u64_of(&s, row.try_get(5)?, "unallocated_mj")?,
                            tenants: Vec::new(),
                        },
                    ));
                }
                if let Some(tenant) = row.try_get::<_, Option<String>>(6)?
                    && let Some((_, _, mm)) = out.last_mut()
                {
                    mm.tenants.push(MeterShare {
                        tenant,
                        measured_mj: u64_of(&s, row.try_get(7)?, "measured_mj")?,
                        allocated_mj: u64_of(&s, row.try_get(8)?, "allocated_mj")?,
                        node_mj: u64_of(&s, row.try_get(9)?, "node_mj")?,
                    });
                }
            }
            Ok(out)
        }
        .await;
        (client, r)
    })
}
