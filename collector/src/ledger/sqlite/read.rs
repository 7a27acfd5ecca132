//! The reader: a read-only connection for the usage API, the status page
//! and the `usage` command.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use super::schema::MIGRATIONS;
use super::{
    BUCKET_COLUMNS, bucket_from_row, bucket_sums, kept_from, sqlite_err, u64_of, watermark,
};
use crate::accounting::Metered;
use crate::ledger::{
    Adjustment, BucketDelta, DAY, GPU_COLUMNS, GPU_FIELDS, GpuDelta, GpuHour, GpuUsage, HOUR,
    LedgerError, LedgerReader, MINUTE, Span, TenantVersion, Usage, UsageAllocation,
};
/// A read-only view of the ledger, for the usage API and the `usage`
/// command. WAL lets it read while the collector commits.
pub struct Reader {
    pub(super) conn: Connection,
    pub(super) path: PathBuf,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        if !path.exists() {
            return Err(LedgerError::Missing {
                path: path.to_owned(),
            });
        }
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite_err(path))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sqlite_err(path))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sqlite_err(path))?;
        let known = MIGRATIONS.len();
        if version as usize > known {
            return Err(LedgerError::TooNew {
                path: path.to_owned(),
                found: version,
                known,
            });
        }
        if (version as usize) < known {
            return Err(LedgerError::TooOld {
                path: path.to_owned(),
                found: version,
                known,
            });
        }
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    /// Every tenant file version the collector recorded, in the order it
    /// loaded them (see `Ledger::tenant_versions`).
    pub fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError> {
        super::tenant_versions(&self.conn, &self.path)
    }

    /// How many tenant file versions are recorded (they are only added).
    pub fn tenant_version_count(&self) -> Result<u64, LedgerError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM tenant_version", [], |r| r.get(0))
            .map_err(sqlite_err(&self.path))?;
        u64_of(n, &self.path, "tenant versions")
    }

    /// Minute buckets in `[from, to)` (Unix seconds, minute-aligned),
    /// summed over nodes: (tenant, minute start, sums), ordered by tenant
    /// then time. `tenant` `None` reads every tenant.
    pub fn minutes(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, i64, BucketDelta)>, LedgerError> {
        self.minutes_on(tenant, None, from, to)
    }

    /// As `minutes`, of the buckets on `node` alone where one is named.
    fn minutes_on(
        &self,
        tenant: Option<&str>,
        node: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, i64, BucketDelta)>, LedgerError> {
        let p = &self.path;
        let err = sqlite_err(p);
        let mut q = self
            .conn
            .prepare_cached(&format!(
                "SELECT tenant, minute_start, {}
                 FROM usage_minute
                 WHERE (?1 IS NULL OR tenant = ?1) AND minute_start >= ?2 AND minute_start < ?3
                    AND (?4 IS NULL OR node = ?4)
                 GROUP BY tenant, minute_start ORDER BY tenant, minute_start",
                bucket_sums()
            ))
            .map_err(err)?;
        let rows = q
            .query_map(params![tenant, from, to, node], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    bucket_from_row(r, 2, p)?,
                ))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (t, m, d) = row.map_err(err)?;
            out.push((t, m, d?));
        }
        Ok(out)
    }

    /// The usage of `tenant` (`None`: every tenant) in `[from, to)`,
    /// read in one snapshot: minute buckets where they are kept, hourly
    /// and then daily rollups before, and every adjustment.
    pub fn usage(&self, tenant: Option<&str>, from: i64, to: i64) -> Result<Usage, LedgerError> {
        self.usage_since(tenant, from, to, 0)
    }

    /// As `usage`, with the adjustments booked after revision
    /// `since_revision` only. The revision, the watermark, the rows and
    /// the adjustments are read in one snapshot, so a job that asks next
    /// time since the revision returned sees every adjustment once.
    pub fn usage_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError> {
        self.usage_on(tenant, None, from, to, since_revision, true)
    }

    /// As `usage_since`, with the meters' allocation of the minutes kept
    /// read in the same snapshot (`LedgerReader::usage_allocated_since`).
    pub fn usage_allocated_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
        with_nodes: bool,
    ) -> Result<(Usage, UsageAllocation), LedgerError> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(sqlite_err(&self.path))?;
        let usage = self.usage_on(tenant, None, from, to, since_revision, true)?;
        let lo = from.max(usage.minutes_from);
        let mut allocation = UsageAllocation {
            started: super::meter::meters_started(&tx, &self.path)?,
            ..UsageAllocation::default()
        };
        if lo < to {
            allocation.minutes = super::meter::meter_minutes(&tx, &self.path, None, lo, to)?;
            if with_nodes {
                allocation.nodes = super::meter::node_minutes_of(&tx, &self.path, tenant, lo, to)?;
            }
        }
        Ok((usage, allocation))
    }

    /// As `usage_since`, of `node` alone where one is named (see
    /// `LedgerReader::node_usage_since`).
    /// Without `spans`, the adjustments alone (`adjustments_since`).
    fn usage_on(
        &self,
        tenant: Option<&str>,
        node: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
        spans: bool,
    ) -> Result<Usage, LedgerError> {
        let p = &self.path;
        let err = sqlite_err(p);
        // One snapshot: a read transaction of its own, unless the caller
        // holds one (`usage_allocated_since`).
        let _own = if self.conn.is_autocommit() {
            Some(self.conn.unchecked_transaction().map_err(err)?)
        } else {
            None
        };
        let tx: &Connection = &self.conn;
        let (revision, finalized_through) = watermark(tx, p)?;
        let mut adjustments = Vec::new();
        {
            let mut q = tx
                .prepare_cached(&format!(
                    "SELECT revision, booked_at, tenant, node, minute_start, {},
                        facility_allocated_mj, facility_node_mj
                     FROM adjustment
                     WHERE (?1 IS NULL OR tenant = ?1) AND minute_start >= ?2 AND minute_start < ?3
                        AND revision > ?4 AND (?5 IS NULL OR node = ?5)
                     ORDER BY revision, tenant, node, minute_start",
                    BUCKET_COLUMNS.join(", ")
                ))
                .map_err(err)?;
            let rows = q
                .query_map(
                    params![
                        tenant,
                        from,
                        to,
                        // Past any revision stored: nothing is after it.
                        i64::try_from(since_revision).unwrap_or(i64::MAX),
                        node
                    ],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, i64>(4)?,
                            bucket_from_row(r, 5, p)?,
                            r.get::<_, i64>(5 + BUCKET_COLUMNS.len())?,
                            r.get::<_, i64>(6 + BUCKET_COLUMNS.len())?,
                        ))
                    },
                )
                .map_err(err)?;
            for row in rows {
                let (revision, booked_at, tenant, node, minute_start, delta, alloc, alloc_node) =
                    row.map_err(err)?;
                adjustments.push(Adjustment {
                    revision: u64_of(revision, p, "revision")?,
                    booked_at,
                    tenant,
                    node,
                    minute_start,
                    delta: delta?,
                    metered: crate::accounting::MeteredChange {
                        allocated_mj: alloc,
                        node_mj: alloc_node,
                    },
                });
            }
        }
        let minutes_from = kept_from(tx, MINUTE, p)?;
        let hours_from = kept_from(tx, HOUR, p)?.min(minutes_from);
        let days_from = kept_from(tx, DAY, p)?.min(hours_from);
        let mut usage = Usage {
            spans: Vec::new(),
            minutes_from,
            hours_from,
            days_from,
            revision,
            finalized_through,
            adjustments,
        };
        if !spans {
            return Ok(usage);
        }
        for (t, start, delta) in self.minutes_on(tenant, node, from.max(minutes_from), to)? {
            usage.spans.push((
                t,
                Span {
                    start,
                    seconds: MINUTE,
                    delta,
                    peak_quarter_mj: None,
                    node_peak_quarter_mj: None,
                    metered: Metered::NONE,
                    facility_peak_quarter_mj: None,
                },
            ));
        }
        let mut q = tx
            .prepare_cached(&format!(
                "SELECT r.tenant, r.start, {}, MAX(COALESCE(d.peak_quarter_mj, 0)),
                    MAX(COALESCE(d.over_contract_ns, 0)), MAX(COALESCE(d.overage_mj, 0)),
                    MAX(COALESCE(d.node_peak_quarter_mj, 0)), MAX(COALESCE(d.allocated_mj, 0)),
                    MAX(COALESCE(d.allocated_node_mj, 0)), MAX(d.facility_peak_quarter_mj)
                 FROM usage_rollup r LEFT JOIN demand_rollup d
                    ON d.period = r.period AND d.start = r.start AND d.tenant = r.tenant
                 WHERE r.period = ?1 AND (?2 IS NULL OR r.tenant = ?2)
                    AND r.start >= ?3 AND r.start < ?4 AND (?5 IS NULL OR r.node = ?5)
                 GROUP BY r.tenant, r.start
                 UNION ALL
                 SELECT d.tenant, d.start, {}, d.peak_quarter_mj, d.over_contract_ns,
                    d.overage_mj, d.node_peak_quarter_mj, d.allocated_mj, d.allocated_node_mj,
                    d.facility_peak_quarter_mj
                 FROM demand_rollup d
                 WHERE d.period = ?1 AND (?2 IS NULL OR d.tenant = ?2)
                    AND d.start >= ?3 AND d.start < ?4 AND ?5 IS NULL
                    AND NOT EXISTS (SELECT 1 FROM usage_rollup r
                        WHERE r.period = d.period AND r.start = d.start AND r.tenant = d.tenant)
                 ORDER BY 1, 2",
                BUCKET_COLUMNS
                    .iter()
                    .map(|c| format!("SUM(r.{c})"))
                    .collect::<Vec<_>>()
                    .join(", "),
                // A tenant's part of minutes it has no bucket in (all its
                // energy there booked late): no energy of its own.
                vec!["0"; BUCKET_COLUMNS.len()].join(", ")
            ))
            .map_err(err)?;
        for (period, lo, hi) in [
            (HOUR, from.max(hours_from), to.min(minutes_from)),
            (DAY, from, to.min(hours_from)),
        ] {
            if lo >= hi {
                continue;
            }
            let rows = q
                .query_map(params![period, tenant, lo, hi, node], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        bucket_from_row(r, 2, p)?,
                        r.get::<_, i64>(2 + BUCKET_COLUMNS.len())?,
                        r.get::<_, i64>(3 + BUCKET_COLUMNS.len())?,
                        r.get::<_, i64>(4 + BUCKET_COLUMNS.len())?,
                        r.get::<_, i64>(5 + BUCKET_COLUMNS.len())?,
                        [
                            r.get::<_, i64>(6 + BUCKET_COLUMNS.len())?,
                            r.get::<_, i64>(7 + BUCKET_COLUMNS.len())?,
                        ],
                        r.get::<_, Option<i64>>(8 + BUCKET_COLUMNS.len())?,
                    ))
                })
                .map_err(err)?;
            for row in rows {
                let (
                    t,
                    start,
                    delta,
                    peak,
                    over_ns,
                    over_mj,
                    node_peak,
                    [alloc, alloc_node],
                    fpeak,
                ) = row.map_err(err)?;
                // Kept per tenant only: nothing of it is one node's.
                let (peak, over_ns, over_mj, node_peak, alloc, alloc_node, fpeak) = match node {
                    Some(_) => (0, 0, 0, 0, 0, 0, None),
                    None => (peak, over_ns, over_mj, node_peak, alloc, alloc_node, fpeak),
                };
                // The rollup's own evaluation of its minutes.
                let delta = BucketDelta {
                    over_contract_ns: u64_of(over_ns, p, "over_contract_ns")?,
                    overage_mj: u64_of(over_mj, p, "overage_mj")?,
                    ..delta?
                };
                usage.spans.push((
                    t,
                    Span {
                        start,
                        seconds: period,
                        delta,
                        peak_quarter_mj: Some(u64_of(peak, p, "peak_quarter_mj")?),
                        node_peak_quarter_mj: Some(u64_of(node_peak, p, "node_peak_quarter_mj")?),
                        metered: Metered {
                            allocated_mj: u64_of(alloc, p, "allocated_mj")?,
                            node_mj: u64_of(alloc_node, p, "allocated_node_mj")?,
                        },
                        facility_peak_quarter_mj: fpeak
                            .map(|v| u64_of(v, p, "facility_peak_quarter_mj"))
                            .transpose()?,
                    },
                ));
            }
        }
        usage
            .spans
            .sort_by(|a, b| a.0.cmp(&b.0).then(a.1.start.cmp(&b.1.start)));
        Ok(usage)
    }

    /// The nodes `tenant` has minute buckets or rollups on in
    /// `[from, to)`, sorted.
    pub fn usage_nodes(
        &self,
        tenant: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<String>, LedgerError> {
        let err = sqlite_err(&self.path);
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT node FROM usage_minute
                    WHERE tenant = ?1 AND minute_start >= ?2 AND minute_start < ?3
                 UNION
                 SELECT node FROM usage_rollup
                    WHERE tenant = ?1 AND start >= ?2 AND start < ?3
                 ORDER BY node",
            )
            .map_err(err)?;
        let rows = q
            .query_map(params![tenant, from, to], |r| r.get::<_, String>(0))
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// `LedgerReader::gpu_rows_from`.
    pub fn gpu_rows_from(&self) -> Result<Option<i64>, LedgerError> {
        let p = &self.path;
        let tx = self.conn.unchecked_transaction().map_err(sqlite_err(p))?;
        gpu_rows_from_in(&tx, p)
    }

    /// `LedgerReader::usage_gpus`.
    pub fn usage_gpus(
        &self,
        tenant: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, String)>, LedgerError> {
        let err = sqlite_err(&self.path);
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT DISTINCT node, gpu FROM gpu_hour
                    WHERE tenant = ?1 AND hour_start >= ?2 AND hour_start < ?3
                 ORDER BY node, gpu",
            )
            .map_err(err)?;
        let rows = q
            .query_map(params![tenant, from, to], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// `LedgerReader::gpu_usage`.
    pub fn gpu_usage(
        &self,
        tenant: &str,
        node: &str,
        gpu: &str,
        from: i64,
        to: i64,
    ) -> Result<GpuUsage, LedgerError> {
        let p = &self.path;
        let err = sqlite_err(p);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let (revision, finalized_through) = watermark(&tx, p)?;
        let complete_from = gpu_rows_from_in(&tx, p)?;
        let mut q = tx
            .prepare_cached(&format!(
                "SELECT hour_start, revision, {} FROM gpu_hour
                 WHERE tenant = ?1 AND node = ?2 AND gpu = ?3 AND hour_start >= ?4
                    AND hour_start < ?5
                 ORDER BY hour_start",
                GPU_COLUMNS.join(", ")
            ))
            .map_err(err)?;
        let mut rows = q.query(params![tenant, node, gpu, from, to]).map_err(err)?;
        let mut hours = Vec::new();
        while let Some(r) = rows.next().map_err(err)? {
            let mut v = [0u64; GPU_FIELDS];
            for (i, slot) in v.iter_mut().enumerate() {
                *slot = u64_of(r.get(2 + i).map_err(err)?, p, GPU_COLUMNS[i])?;
            }
            hours.push(GpuHour {
                start: r.get(0).map_err(err)?,
                revision: u64_of(r.get(1).map_err(err)?, p, "revision")?,
                delta: GpuDelta::bucket(v),
            });
        }
        Ok(GpuUsage {
            hours,
            revision,
            finalized_through,
            complete_from,
        })
    }

    /// Every tenant that has buckets.
    pub fn tenants(&self) -> Result<Vec<String>, LedgerError> {
        let p = &self.path;
        let err = sqlite_err(p);
        let mut q = self
            .conn
            .prepare_cached("SELECT tenant FROM tenant_total ORDER BY tenant")
            .map_err(err)?;
        let rows = q.query_map([], |r| r.get::<_, String>(0)).map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }
}

/// `LedgerReader::gpu_rows_from` within the read `tx`.
fn gpu_rows_from_in(
    tx: &rusqlite::Transaction<'_>,
    p: &std::path::Path,
) -> Result<Option<i64>, LedgerError> {
    let since: Option<i64> = tx
        .query_row("SELECT since FROM gpu_rows WHERE only_row = 1", [], |r| {
            r.get(0)
        })
        .map_err(sqlite_err(p))?;
    Ok(crate::ledger::gpu_rows_from(since, kept_from(tx, HOUR, p)?))
}

impl LedgerReader for Reader {
    fn finalized_through(&self) -> Result<i64, LedgerError> {
        super::watermark(&self.conn, &self.path).map(|(_, w)| w)
    }

    fn meter_state(&self, meter: &str) -> Result<Option<crate::ledger::MeterState>, LedgerError> {
        super::meter::meter_state(&self.conn, &self.path, meter)
    }

    fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError> {
        Reader::tenant_versions(self)
    }

    fn tenant_version_count(&self) -> Result<u64, LedgerError> {
        Reader::tenant_version_count(self)
    }

    fn minutes(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, i64, BucketDelta)>, LedgerError> {
        Reader::minutes(self, tenant, from, to)
    }

    fn meter_minutes(
        &self,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, crate::ledger::MeterMinute)>, LedgerError> {
        Reader::meter_minutes(self, meter, from, to)
    }

    fn meter_hours(
        &self,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, u64, crate::ledger::MeterMinute)>, LedgerError> {
        Reader::meter_hours(self, meter, from, to)
    }

    fn node_minutes(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<crate::ledger::NodeMinute>, LedgerError> {
        Reader::node_minutes(self, from, to)
    }

    fn tenant_node_minutes(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<crate::ledger::NodeMinute>, LedgerError> {
        super::meter::node_minutes_of(&self.conn, &self.path, tenant, from, to)
    }

    fn placing_holds(&self) -> Result<Vec<crate::ledger::PlacingHold>, LedgerError> {
        super::meter::placing_holds(&self.conn, &self.path)
    }

    fn revision(&self) -> Result<u64, LedgerError> {
        Ok(super::watermark(&self.conn, &self.path)?.0)
    }

    fn node_minutes_as_of(
        &self,
        from: i64,
        to: i64,
        revision: u64,
    ) -> Result<Vec<crate::ledger::NodeMinute>, LedgerError> {
        super::meter::node_minutes_as_of(&self.conn, &self.path, None, from, to, Some(revision))
    }

    fn late_in_meter_minutes(
        &self,
        meter: &str,
        after: u64,
        through: u64,
    ) -> Result<Vec<(u64, i64, String)>, LedgerError> {
        super::meter::late_in_meter_minutes(&self.conn, &self.path, meter, after, through)
    }

    fn usage(&self, tenant: Option<&str>, from: i64, to: i64) -> Result<Usage, LedgerError> {
        Reader::usage(self, tenant, from, to)
    }

    fn usage_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError> {
        Reader::usage_since(self, tenant, from, to, since_revision)
    }

    fn usage_allocated_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
        with_nodes: bool,
    ) -> Result<(Usage, UsageAllocation), LedgerError> {
        Reader::usage_allocated_since(self, tenant, from, to, since_revision, with_nodes)
    }

    fn tenants(&self) -> Result<Vec<String>, LedgerError> {
        Reader::tenants(self)
    }

    fn usage_nodes(&self, tenant: &str, from: i64, to: i64) -> Result<Vec<String>, LedgerError> {
        Reader::usage_nodes(self, tenant, from, to)
    }

    fn gpu_rows_from(&self) -> Result<Option<i64>, LedgerError> {
        Reader::gpu_rows_from(self)
    }

    fn usage_gpus(
        &self,
        tenant: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, String)>, LedgerError> {
        Reader::usage_gpus(self, tenant, from, to)
    }

    fn gpu_usage(
        &self,
        tenant: &str,
        node: &str,
        gpu: &str,
        from: i64,
        to: i64,
    ) -> Result<GpuUsage, LedgerError> {
        Reader::gpu_usage(self, tenant, node, gpu, from, to)
    }

    fn node_usage_since(
        &self,
        tenant: &str,
        node: &str,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError> {
        self.usage_on(Some(tenant), Some(node), from, to, since_revision, true)
    }

    fn adjustments_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError> {
        self.usage_on(tenant, None, from, to, since_revision, false)
    }
}
