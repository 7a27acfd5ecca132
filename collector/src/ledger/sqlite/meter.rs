//! Facility meters' allocation: each meter's state row, its minutes and
//! each tenant's part, written in one transaction that moves the state
//! only from where the writer saw it.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Ledger, Reader, i64_of, sqlite_err, u64_of};
use crate::ledger::{LedgerError, MeterMinute, MeterResplit, MeterShare, MeterState, NodeMinute};

/// A register's raw value in an INTEGER column: its 64 bits as they are
/// (values past 2^63 read back as themselves).
fn raw_in(v: u64) -> i64 {
    v as i64
}

fn raw_out(v: i64) -> u64 {
    v as u64
}

pub(super) fn meter_state(
    conn: &Connection,
    path: &Path,
    meter: &str,
) -> Result<Option<MeterState>, LedgerError> {
    let err = sqlite_err(path);
    let row = conn
        .query_row(
            "SELECT allocated_through, reading_at_ns, reading_raw, carry_mj, revision
             FROM meter_state WHERE meter = ?1",
            params![meter],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            },
        )
        .optional()
        .map_err(err)?;
    row.map(|(a, at, raw, carry, revision)| {
        Ok(MeterState {
            allocated_through: a,
            reading_at_ns: at,
            reading_raw: raw_out(raw),
            carry_mj: u64_of(carry, path, "carry_mj")?,
            revision: u64_of(revision, path, "meter revision")?,
        })
    })
    .transpose()
}

/// `LedgerReader::late_in_meter_minutes`.
pub(super) fn late_in_meter_minutes(
    conn: &Connection,
    path: &Path,
    meter: &str,
    after: u64,
    through: u64,
) -> Result<Vec<(u64, i64, String)>, LedgerError> {
    let err = sqlite_err(path);
    let mut q = conn
        .prepare_cached(
            "SELECT DISTINCT a.revision, a.minute_start, a.node FROM adjustment a
             WHERE a.revision > ?2 AND a.revision <= ?3 AND a.node <> ''
                AND EXISTS (SELECT 1 FROM meter_minute m
                    WHERE m.meter = ?1 AND m.minute_start = a.minute_start)
             ORDER BY a.revision, a.minute_start, a.node",
        )
        .map_err(err)?;
    let rows = q
        .query_map(
            params![
                meter,
                i64_of(after, path, "revision")?,
                i64_of(through, path, "revision")?
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            },
        )
        .map_err(err)?;
    let mut out = Vec::new();
    for row in rows {
        let (revision, minute, node) = row.map_err(err)?;
        out.push((u64_of(revision, path, "revision")?, minute, node));
    }
    Ok(out)
}

pub(super) fn node_minutes(
    conn: &Connection,
    path: &Path,
    from: i64,
    to: i64,
) -> Result<Vec<NodeMinute>, LedgerError> {
    node_minutes_of(conn, path, None, from, to)
}

/// Every node whose power readings may still book energy into a minute.
pub(super) fn placing_holds(
    conn: &Connection,
    path: &Path,
) -> Result<Vec<crate::ledger::PlacingHold>, LedgerError> {
    let err = sqlite_err(path);
    let mut q = conn
        .prepare_cached(
            "SELECT node, placing_from, placing_seen FROM node_cursor
             WHERE placing_from IS NOT NULL AND placing_seen IS NOT NULL",
        )
        .map_err(err)?;
    let rows = q
        .query_map([], |r| {
            Ok(crate::ledger::PlacingHold {
                node: r.get(0)?,
                from_minute: r.get(1)?,
                seen: r.get(2)?,
            })
        })
        .map_err(err)?;
    rows.collect::<Result<_, _>>().map_err(err)
}

/// `node_minutes` of `tenant` alone (`None`: every tenant).
pub(super) fn node_minutes_of(
    conn: &Connection,
    path: &Path,
    tenant: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Vec<NodeMinute>, LedgerError> {
    node_minutes_as_of(conn, path, tenant, from, to, None)
}

/// `node_minutes_of` with the adjustments booked by `revision` alone
/// (`None`: every one).
pub(super) fn node_minutes_as_of(
    conn: &Connection,
    path: &Path,
    tenant: Option<&str>,
    from: i64,
    to: i64,
    revision: Option<u64>,
) -> Result<Vec<NodeMinute>, LedgerError> {
    let err = sqlite_err(path);
    let revision = revision.map(|r| i64_of(r, path, "revision")).transpose()?;
    let mut q = conn
        .prepare_cached(
            "SELECT tenant, node, minute_start,
                    CASE WHEN SUM(node_ns) > 0 OR SUM(node_energy_mj) > 0
                        THEN SUM(node_energy_mj) ELSE SUM(energy_mj) END,
                    SUM(row_node_mj)
             FROM (
                SELECT tenant, node, minute_start, node_ns, node_energy_mj, energy_mj,
                    node_energy_mj AS row_node_mj
                FROM usage_minute
                WHERE minute_start >= ?1 AND minute_start < ?2 AND (?3 IS NULL OR tenant = ?3)
                UNION ALL
                SELECT tenant, node, minute_start, node_ns, node_energy_mj, energy_mj, 0
                FROM adjustment
                WHERE node <> '' AND minute_start >= ?1 AND minute_start < ?2
                    AND (?3 IS NULL OR tenant = ?3) AND (?4 IS NULL OR revision <= ?4)
             )
             GROUP BY minute_start, node, tenant
             ORDER BY minute_start, node, tenant",
        )
        .map_err(err)?;
    let rows = q
        .query_map(params![from, to, tenant, revision], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .map_err(err)?;
    let mut out = Vec::new();
    for row in rows {
        let (tenant, node, minute, mj, node_mj) = row.map_err(err)?;
        out.push(NodeMinute {
            tenant,
            node,
            minute,
            measured_mj: u64_of(mj, path, "measured energy")?,
            node_energy_mj: u64_of(node_mj, path, "node energy")?,
        });
    }
    Ok(out)
}

impl Ledger {
    pub fn meter_state(&self, meter: &str) -> Result<Option<MeterState>, LedgerError> {
        meter_state(&self.conn, &self.path, meter)
    }

    pub fn node_minutes(&self, from: i64, to: i64) -> Result<Vec<NodeMinute>, LedgerError> {
        node_minutes(&self.conn, &self.path, from, to)
    }

    /// `LedgerWriter::allocate_meter`.
    pub fn allocate_meter(
        &mut self,
        meter: &str,
        from: Option<&MeterState>,
        to: &MeterState,
        minutes: &[MeterMinute],
    ) -> Result<bool, LedgerError> {
        self.allocate_meter_again(meter, from, to, minutes, &[])
    }

    /// `LedgerWriter::allocate_meter_again`: the state row is inserted
    /// (none yet) or moved by a conditional UPDATE on the state the writer
    /// saw; either touching no row means another writer allocated first,
    /// and the transaction is dropped unwritten, as it is where a minute
    /// to split again is no longer kept.
    pub fn allocate_meter_again(
        &mut self,
        meter: &str,
        from: Option<&MeterState>,
        to: &MeterState,
        minutes: &[MeterMinute],
        again: &[MeterResplit],
    ) -> Result<bool, LedgerError> {
        let path = self.path.clone();
        let p = path.as_path();
        let err = sqlite_err(p);
        let tx = self.conn.transaction().map_err(err)?;
        let carry = i64_of(to.carry_mj, p, "carry_mj")?;
        let to_revision = i64_of(to.revision, p, "meter revision")?;
        let moved = match from {
            None => tx
                .execute(
                    "INSERT INTO meter_state
                        (meter, allocated_through, reading_at_ns, reading_raw, carry_mj, revision)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (meter) DO NOTHING",
                    params![
                        meter,
                        to.allocated_through,
                        to.reading_at_ns,
                        raw_in(to.reading_raw),
                        carry,
                        to_revision
                    ],
                )
                .map_err(err)?,
            Some(f) => tx
                .execute(
                    "UPDATE meter_state SET allocated_through = ?2, reading_at_ns = ?3,
                        reading_raw = ?4, carry_mj = ?5, revision = ?6
                     WHERE meter = ?1 AND allocated_through = ?7 AND revision = ?8",
                    params![
                        meter,
                        to.allocated_through,
                        to.reading_at_ns,
                        raw_in(to.reading_raw),
                        carry,
                        to_revision,
                        f.allocated_through,
                        i64_of(f.revision, p, "meter revision")?
                    ],
                )
                .map_err(err)?,
        };
        if moved == 0 {
            return Ok(false);
        }
        // The allocation restates the minutes' facility energy: booked as
        // adjustments of a revision of its own, in this transaction, so
        // once with the minutes (none where no tenant got a part, or no
        // part changed).
        let booked = minutes.iter().any(|m| {
            m.tenants
                .iter()
                .any(|t| t.allocated_mj > 0 || t.node_mj > 0)
        }) || again.iter().any(|a| !a.changes.is_empty());
        let revision = if booked {
            let (last, _) = super::watermark(&tx, p)?;
            let revision = last + 1;
            tx.execute(
                "UPDATE watermark SET revision = ?1 WHERE id = 1",
                [i64_of(revision, p, "revision")?],
            )
            .map_err(err)?;
            Some(revision)
        } else {
            None
        };
        if let Some(revision) = revision {
            let mut adj = tx
                .prepare_cached(&format!(
                    "INSERT INTO adjustment (revision, booked_at, tenant, node, minute_start, {},
                        facility_allocated_mj, facility_node_mj)
                     VALUES (?1, unixepoch(), ?2, '', ?3, {}, ?4, ?5)",
                    super::BUCKET_COLUMNS.join(", "),
                    ["0"; crate::ledger::BUCKET_FIELDS].join(", ")
                ))
                .map_err(err)?;
            let rev = i64_of(revision, p, "revision")?;
            for m in minutes {
                for t in m
                    .tenants
                    .iter()
                    .filter(|t| t.allocated_mj > 0 || t.node_mj > 0)
                {
                    adj.execute(params![
                        rev,
                        t.tenant,
                        m.minute,
                        i64_of(t.allocated_mj, p, "allocated_mj")?,
                        i64_of(t.node_mj, p, "node_mj")?
                    ])
                    .map_err(err)?;
                }
            }
            for a in again {
                for (tenant, allocated, node) in &a.changes {
                    adj.execute(params![rev, tenant, a.minute.minute, allocated, node])
                        .map_err(err)?;
                }
            }
        }
        {
            let mut minute_q = tx
                .prepare_cached(
                    "INSERT INTO meter_minute (meter, minute_start, metered_mj, measured_mj, unallocated_mj)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(err)?;
            let mut again_q = tx
                .prepare_cached(
                    "UPDATE meter_minute SET measured_mj = ?3, unallocated_mj = ?4
                     WHERE meter = ?1 AND minute_start = ?2 AND metered_mj = ?5",
                )
                .map_err(err)?;
            let mut clear_q = tx
                .prepare_cached(
                    "DELETE FROM meter_allocation WHERE meter = ?1 AND minute_start = ?2",
                )
                .map_err(err)?;
            let mut tenant_q = tx
                .prepare_cached(
                    "INSERT INTO meter_allocation
                        (meter, tenant, minute_start, measured_mj, allocated_mj, node_mj)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(err)?;
            // The hours of the minutes are rolled up again, with their
            // allocation.
            let mut pend = tx
                .prepare_cached("INSERT OR IGNORE INTO rollup_pending (hour_start) VALUES (?1)")
                .map_err(err)?;
            for m in minutes {
                minute_q
                    .execute(params![
                        meter,
                        m.minute,
                        i64_of(m.metered_mj, p, "metered_mj")?,
                        i64_of(m.measured_mj, p, "measured_mj")?,
                        i64_of(m.unallocated_mj, p, "unallocated_mj")?
                    ])
                    .map_err(err)?;
            }
            for a in again {
                let m = &a.minute;
                let kept = again_q
                    .execute(params![
                        meter,
                        m.minute,
                        i64_of(m.measured_mj, p, "measured_mj")?,
                        i64_of(m.unallocated_mj, p, "unallocated_mj")?,
                        i64_of(m.metered_mj, p, "metered_mj")?
                    ])
                    .map_err(err)?;
                if kept == 0 {
                    // Folded into hourly sums meanwhile: nothing written.
                    return Ok(false);
                }
                clear_q.execute(params![meter, m.minute]).map_err(err)?;
            }
            for m in minutes.iter().chain(again.iter().map(|a| &a.minute)) {
                pend.execute([m.minute.div_euclid(3600) * 3600])
                    .map_err(err)?;
                for t in &m.tenants {
                    tenant_q
                        .execute(params![
                            meter,
                            t.tenant,
                            m.minute,
                            i64_of(t.measured_mj, p, "measured_mj")?,
                            i64_of(t.allocated_mj, p, "allocated_mj")?,
                            i64_of(t.node_mj, p, "node_mj")?
                        ])
                        .map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)?;
        if let Some(revision) = revision {
            self.revision = revision;
            self.mark();
        }
        Ok(true)
    }
}

/// Where each meter's allocation started (`UsageAllocation::started`).
pub(super) fn meters_started(
    conn: &Connection,
    path: &Path,
) -> Result<Vec<(String, i64)>, LedgerError> {
    let err = sqlite_err(path);
    let mut q = conn
        .prepare_cached(
            "SELECT meter, MIN(m) FROM (
                SELECT meter, allocated_through AS m FROM meter_state
                UNION ALL SELECT meter, MIN(minute_start) FROM meter_minute GROUP BY meter
                UNION ALL SELECT meter, MIN(start) FROM meter_rollup GROUP BY meter
             ) AS s
             GROUP BY meter ORDER BY meter",
        )
        .map_err(err)?;
    let rows = q
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(err)?;
    rows.collect::<Result<_, _>>().map_err(err)
}

pub(super) fn meter_minutes(
    conn: &Connection,
    path: &Path,
    meter: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Vec<(String, MeterMinute)>, LedgerError> {
    let err = sqlite_err(path);
    let mut q = conn
        .prepare_cached(
            "SELECT m.meter, m.minute_start, m.metered_mj, m.measured_mj, m.unallocated_mj,
                    a.tenant, a.measured_mj, a.allocated_mj, a.node_mj
             FROM meter_minute m
             LEFT JOIN meter_allocation a
                ON a.meter = m.meter AND a.minute_start = m.minute_start
             WHERE (?1 IS NULL OR m.meter = ?1) AND m.minute_start >= ?2 AND m.minute_start < ?3
             ORDER BY m.meter, m.minute_start, a.tenant",
        )
        .map_err(err)?;
    let rows = q
        .query_map(params![meter, from, to], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                [
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ],
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, Option<i64>>(7)?,
                r.get::<_, Option<i64>>(8)?,
            ))
        })
        .map_err(err)?;
    let mut out: Vec<(String, MeterMinute)> = Vec::new();
    for row in rows {
        let (meter, minute, [metered, measured, unallocated], tenant, t_measured, t_alloc, t_node) =
            row.map_err(err)?;
        let same = out
            .last()
            .is_some_and(|(m, mm)| *m == meter && mm.minute == minute);
        if !same {
            out.push((
                meter,
                MeterMinute {
                    minute,
                    metered_mj: u64_of(metered, path, "metered_mj")?,
                    measured_mj: u64_of(measured, path, "measured_mj")?,
                    unallocated_mj: u64_of(unallocated, path, "unallocated_mj")?,
                    tenants: Vec::new(),
                },
            ));
        }
        if let (Some(t), Some(tm), Some(ta), Some(tn)) = (tenant, t_measured, t_alloc, t_node)
            && let Some((_, mm)) = out.last_mut()
        {
            mm.tenants.push(MeterShare {
                tenant: t,
                measured_mj: u64_of(tm, path, "measured_mj")?,
                allocated_mj: u64_of(ta, path, "allocated_mj")?,
                node_mj: u64_of(tn, path, "node_mj")?,
            });
        }
    }
    Ok(out)
}

impl Reader {
    pub fn meter_hours(
        &self,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, u64, MeterMinute)>, LedgerError> {
        meter_hours(&self.conn, &self.path, meter, from, to)
    }

    pub fn meter_minutes(
        &self,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, MeterMinute)>, LedgerError> {
        meter_minutes(&self.conn, &self.path, meter, from, to)
    }

    pub fn node_minutes(&self, from: i64, to: i64) -> Result<Vec<NodeMinute>, LedgerError> {
        node_minutes(&self.conn, &self.path, from, to)
    }
}

/// Folds the meter-minutes and tenants' parts before `before` (an hour
/// start) into hourly sums, added to those there are, and drops them.
/// Returns how many meter-minutes were folded.
pub(super) fn roll_up(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    before: i64,
) -> Result<usize, LedgerError> {
    let err = sqlite_err(path);
    tx.execute(
        "INSERT INTO meter_rollup (meter, start, minutes, metered_mj, measured_mj, unallocated_mj)
         SELECT meter, minute_start - minute_start % 3600, COUNT(*), SUM(metered_mj),
            SUM(measured_mj), SUM(unallocated_mj)
         FROM meter_minute WHERE minute_start < ?1
         GROUP BY meter, minute_start - minute_start % 3600
         ON CONFLICT (meter, start) DO UPDATE SET minutes = minutes + excluded.minutes,
            metered_mj = metered_mj + excluded.metered_mj,
            measured_mj = measured_mj + excluded.measured_mj,
            unallocated_mj = unallocated_mj + excluded.unallocated_mj",
        [before],
    )
    .map_err(err)?;
    tx.execute(
        "INSERT INTO meter_allocation_rollup
            (meter, start, tenant, measured_mj, allocated_mj, node_mj)
         SELECT meter, minute_start - minute_start % 3600, tenant, SUM(measured_mj),
            SUM(allocated_mj), SUM(node_mj)
         FROM meter_allocation WHERE minute_start < ?1
         GROUP BY meter, minute_start - minute_start % 3600, tenant
         ON CONFLICT (meter, start, tenant) DO UPDATE
            SET measured_mj = measured_mj + excluded.measured_mj,
                allocated_mj = allocated_mj + excluded.allocated_mj,
                node_mj = node_mj + excluded.node_mj",
        [before],
    )
    .map_err(err)?;
    tx.execute(
        "DELETE FROM meter_allocation WHERE minute_start < ?1",
        [before],
    )
    .map_err(err)?;
    tx.execute("DELETE FROM meter_minute WHERE minute_start < ?1", [before])
        .map_err(err)
}

/// The hourly sums of `meter` (`None`: every meter) starting in
/// `[from, to)`: (meter, minutes it holds, sums with `minute` the hour's
/// start), by meter then time.
pub(super) fn meter_hours(
    conn: &Connection,
    path: &Path,
    meter: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Vec<(String, u64, MeterMinute)>, LedgerError> {
    let err = sqlite_err(path);
    let mut q = conn
        .prepare_cached(
            "SELECT m.meter, m.start, m.minutes, m.metered_mj, m.measured_mj, m.unallocated_mj,
                    a.tenant, a.measured_mj, a.allocated_mj, a.node_mj
             FROM meter_rollup m
             LEFT JOIN meter_allocation_rollup a ON a.meter = m.meter AND a.start = m.start
             WHERE (?1 IS NULL OR m.meter = ?1) AND m.start >= ?2 AND m.start < ?3
             ORDER BY m.meter, m.start, a.tenant",
        )
        .map_err(err)?;
    let rows = q
        .query_map(params![meter, from, to], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                [
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ],
                r.get::<_, Option<String>>(6)?,
                [
                    r.get::<_, Option<i64>>(7)?,
                    r.get::<_, Option<i64>>(8)?,
                    r.get::<_, Option<i64>>(9)?,
                ],
            ))
        })
        .map_err(err)?;
    let mut out: Vec<(String, u64, MeterMinute)> = Vec::new();
    for row in rows {
        let (meter, start, [n, metered, measured, unallocated], tenant, part) = row.map_err(err)?;
        let same = out
            .last()
            .is_some_and(|(m, _, mm)| *m == meter && mm.minute == start);
        if !same {
            out.push((
                meter,
                u64_of(n, path, "minutes")?,
                MeterMinute {
                    minute: start,
                    metered_mj: u64_of(metered, path, "metered_mj")?,
                    measured_mj: u64_of(measured, path, "measured_mj")?,
                    unallocated_mj: u64_of(unallocated, path, "unallocated_mj")?,
                    tenants: Vec::new(),
                },
            ));
        }
        if let (Some(t), [Some(tm), Some(ta), Some(tn)]) = (tenant, part)
            && let Some((_, _, mm)) = out.last_mut()
        {
            mm.tenants.push(MeterShare {
                tenant: t,
                measured_mj: u64_of(tm, path, "measured_mj")?,
                allocated_mj: u64_of(ta, path, "allocated_mj")?,
                node_mj: u64_of(tn, path, "node_mj")?,
            });
        }
    }
    Ok(out)
}
