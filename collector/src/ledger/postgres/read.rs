//! The reader: usage, minutes and tenants, each read in one snapshot
//! (`REPEATABLE READ, READ ONLY`), from any collector or the `usage`
//! command.

use std::sync::Arc;

use super::schema::MIGRATIONS;
use super::{
    BUCKET_COLUMNS, Fail, PgSettings, Shared, bucket_from_row, bucket_sums, kept_from,
    schema_version, u64_of,
};
use crate::accounting::Metered;
use crate::ledger::{
    Adjustment, BucketDelta, DAY, GPU_COLUMNS, GPU_FIELDS, GpuDelta, GpuHour, GpuUsage, HOUR,
    LedgerError, LedgerReader, MINUTE, Span, TenantVersion, Usage, UsageAllocation,
};

/// A reader of the PostgreSQL ledger. Never writes.
pub struct PgReader {
    shared: Arc<Shared>,
}

impl PgReader {
    /// Connects to the ledger at `settings.url`; refused where the
    /// database holds no ledger, or one of another schema version.
    pub fn open(settings: &PgSettings) -> Result<Self, LedgerError> {
        let shared = Shared::connect(settings)?;
        let database = shared.database.clone();
        shared.call(move |client| async move {
            let r = async {
                let known = MIGRATIONS.len();
                match schema_version(&client).await? {
                    None => Err(Fail::Ledger(LedgerError::PgNoLedger { database })),
                    Some(found) if found as usize > known => {
                        Err(Fail::Ledger(LedgerError::PgTooNew {
                            database,
                            found,
                            known,
                        }))
                    }
                    Some(found) if (found as usize) < known => {
                        Err(Fail::Ledger(LedgerError::PgTooOld {
                            database,
                            found,
                            known,
                        }))
                    }
                    Some(_) => Ok(()),
                }
            }
            .await;
            (client, r)
        })?;
        Ok(Self { shared })
    }

    pub(super) fn on(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

async fn minutes(
    s: &Shared,
    client: &tokio_postgres::Transaction<'_>,
    tenant: Option<&str>,
    node: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Vec<(String, i64, BucketDelta)>, Fail> {
    let rows = client
        .query(
            &format!(
                "SELECT tenant, minute_start, {}
                 FROM usage_minute
                 WHERE ($1::text IS NULL OR tenant = $1) AND minute_start >= $2
                    AND minute_start < $3 AND ($4::text IS NULL OR node = $4)
                 GROUP BY tenant, minute_start ORDER BY tenant, minute_start",
                bucket_sums("")
            ),
            &[&tenant, &from, &to, &node],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, bucket_from_row(s, r, 2)?)))
        .collect()
}

/// What one usage read asks for (`LedgerReader::usage_since`,
/// `node_usage_since`, `adjustments_since`).
struct UsageQuery {
    tenant: Option<String>,
    node: Option<String>,
    from: i64,
    to: i64,
    since_revision: u64,
    /// Without spans: the adjustments alone (`adjustments_since`).
    with_spans: bool,
    /// The meters' allocation of the minutes kept too, in the snapshot
    /// (`usage_allocated_since`), with the node minutes where `Some(true)`.
    allocation: Option<bool>,
}

/// `LedgerReader::gpu_rows_from` within the read `tx`.
async fn gpu_rows_from_in(tx: &deadpool_postgres::Transaction<'_>) -> Result<Option<i64>, Fail> {
    let since: Option<i64> = tx
        .query_one("SELECT since FROM gpu_rows WHERE only_row = 1", &[])
        .await?
        .try_get(0)?;
    let hours = kept_from(tx, HOUR).await?;
    Ok(crate::ledger::gpu_rows_from(since, hours))
}

/// A read-only snapshot of the ledger (one repeatable-read transaction),
/// with its revision and `finalized_through` as of it.
async fn snapshot<'a>(
    s: &Shared,
    client: &'a mut deadpool_postgres::Object,
) -> Result<(deadpool_postgres::Transaction<'a>, u64, i64), Fail> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let row = tx
        .query_one(
            "SELECT revision, finalized_through FROM watermark WHERE id = 1",
            &[],
        )
        .await?;
    let revision = u64_of(s, row.try_get(0)?, "revision")?;
    let finalized_through: i64 = row.try_get(1)?;
    Ok((tx, revision, finalized_through))
}

async fn usage_since(
    s: &Shared,
    client: &mut deadpool_postgres::Object,
    q: UsageQuery,
) -> Result<(Usage, UsageAllocation), Fail> {
    let UsageQuery {
        from,
        to,
        since_revision,
        with_spans,
        allocation: with_allocation,
        ..
    } = q;
    let tenant = q.tenant.as_deref();
    let node = q.node.as_deref();
    let (tx, revision, finalized_through) = snapshot(s, client).await?;
    let since = i64::try_from(since_revision).unwrap_or(i64::MAX);
    let mut adjustments = Vec::new();
    for r in tx
        .query(
            &format!(
                "SELECT revision, booked_at, tenant, node, minute_start, {},
                    facility_allocated_mj, facility_node_mj
                 FROM adjustment
                 WHERE ($1::text IS NULL OR tenant = $1) AND minute_start >= $2
                    AND minute_start < $3 AND revision > $4
                    AND ($5::text IS NULL OR node = $5)
                 ORDER BY revision, tenant, node, minute_start",
                BUCKET_COLUMNS.join(", ")
            ),
            &[&tenant, &from, &to, &since, &node],
        )
        .await?
    {
        adjustments.push(Adjustment {
            revision: u64_of(s, r.try_get(0)?, "revision")?,
            booked_at: r.try_get(1)?,
            tenant: r.try_get(2)?,
            node: r.try_get(3)?,
            minute_start: r.try_get(4)?,
            delta: bucket_from_row(s, &r, 5)?,
            metered: crate::accounting::MeteredChange {
                allocated_mj: r.try_get(5 + BUCKET_COLUMNS.len())?,
                node_mj: r.try_get(6 + BUCKET_COLUMNS.len())?,
            },
        });
    }
    let minutes_from = kept_from(&tx, MINUTE).await?;
    let hours_from = kept_from(&tx, HOUR).await?.min(minutes_from);
    let days_from = kept_from(&tx, DAY).await?.min(hours_from);
    let mut usage = Usage {
        spans: Vec::new(),
        minutes_from,
        hours_from,
        days_from,
        revision,
        finalized_through,
        adjustments,
    };
    if !with_spans {
        tx.commit().await?;
        return Ok((usage, UsageAllocation::default()));
    }
    for (t, start, delta) in minutes(s, &tx, tenant, node, from.max(minutes_from), to).await? {
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
    let rollups = tx
        .prepare(&format!(
            "SELECT r.tenant, r.start, {},
                MAX(COALESCE(d.peak_quarter_mj, 0))::int8,
                MAX(COALESCE(d.over_contract_ns, 0))::int8, MAX(COALESCE(d.overage_mj, 0))::int8,
                MAX(COALESCE(d.node_peak_quarter_mj, 0))::int8,
                MAX(COALESCE(d.allocated_mj, 0))::int8, MAX(COALESCE(d.allocated_node_mj, 0))::int8,
                MAX(d.facility_peak_quarter_mj)::int8
             FROM usage_rollup r LEFT JOIN demand_rollup d
                ON d.period = r.period AND d.start = r.start AND d.tenant = r.tenant
             WHERE r.period = $1 AND ($2::text IS NULL OR r.tenant = $2)
                AND r.start >= $3 AND r.start < $4 AND ($5::text IS NULL OR r.node = $5)
             GROUP BY r.tenant, r.start
             UNION ALL
             SELECT d.tenant, d.start, {}, d.peak_quarter_mj, d.over_contract_ns,
                d.overage_mj, d.node_peak_quarter_mj, d.allocated_mj, d.allocated_node_mj,
                d.facility_peak_quarter_mj
             FROM demand_rollup d
             WHERE d.period = $1 AND ($2::text IS NULL OR d.tenant = $2)
                AND d.start >= $3 AND d.start < $4 AND $5::text IS NULL
                AND NOT EXISTS (SELECT 1 FROM usage_rollup r
                    WHERE r.period = d.period AND r.start = d.start AND r.tenant = d.tenant)
             ORDER BY 1, 2",
            bucket_sums("r."),
            // A tenant's part of minutes it has no bucket in (all its
            // energy there booked late): no energy of its own.
            vec!["0::int8"; BUCKET_COLUMNS.len()].join(", ")
        ))
        .await?;
    for (period, lo, hi) in [
        (HOUR, from.max(hours_from), to.min(minutes_from)),
        (DAY, from, to.min(hours_from)),
    ] {
        if lo >= hi {
            continue;
        }
        for r in tx
            .query(&rollups, &[&period, &tenant, &lo, &hi, &node])
            .await?
        {
            let n = BUCKET_COLUMNS.len();
            let delta = BucketDelta {
                over_contract_ns: u64_of(s, r.try_get(3 + n)?, "over_contract_ns")?,
                overage_mj: u64_of(s, r.try_get(4 + n)?, "overage_mj")?,
                ..bucket_from_row(s, &r, 2)?
            };
            let mut span = Span {
                start: r.try_get(1)?,
                seconds: period,
                delta,
                peak_quarter_mj: Some(u64_of(s, r.try_get(2 + n)?, "peak_quarter_mj")?),
                node_peak_quarter_mj: Some(u64_of(s, r.try_get(5 + n)?, "node_peak_quarter_mj")?),
                metered: Metered {
                    allocated_mj: u64_of(s, r.try_get(6 + n)?, "allocated_mj")?,
                    node_mj: u64_of(s, r.try_get(7 + n)?, "allocated_node_mj")?,
                },
                facility_peak_quarter_mj: r
                    .try_get::<_, Option<i64>>(8 + n)?
                    .map(|v| u64_of(s, v, "facility_peak_quarter_mj"))
                    .transpose()?,
            };
            if node.is_some() {
                // Kept per tenant only: nothing of it is one node's.
                span.delta.over_contract_ns = 0;
                span.delta.overage_mj = 0;
                span.peak_quarter_mj = Some(0);
                span.node_peak_quarter_mj = Some(0);
                span.metered = Metered::NONE;
                span.facility_peak_quarter_mj = None;
            }
            usage.spans.push((r.try_get(0)?, span));
        }
    }
    let mut allocation = UsageAllocation::default();
    let lo = from.max(minutes_from);
    if let Some(with_nodes) = with_allocation {
        allocation.started = super::meter::meters_started_in(&tx).await?;
        if lo < to {
            allocation.minutes = super::meter::meter_minutes_in(s, &tx, None, lo, to).await?;
            if with_nodes {
                allocation.nodes =
                    super::meter::node_minutes_in(s, &tx, tenant, lo, to, None).await?;
            }
        }
    }
    tx.commit().await?;
    usage
        .spans
        .sort_by(|a, b| a.0.cmp(&b.0).then(a.1.start.cmp(&b.1.start)));
    Ok((usage, allocation))
}

impl PgReader {
    /// Runs `q` on a pooled connection.
    fn read_usage(&self, q: UsageQuery) -> Result<(Usage, UsageAllocation), LedgerError> {
        let s = self.shared.clone();
        self.shared.call(move |mut client| async move {
            let r = usage_since(&s, &mut client, q).await;
            (client, r)
        })
    }
}

impl LedgerReader for PgReader {
    fn finalized_through(&self) -> Result<i64, LedgerError> {
        self.shared.call(move |client| async move {
            let r = async {
                Ok(client
                    .query_one("SELECT finalized_through FROM watermark WHERE id = 1", &[])
                    .await?
                    .try_get(0)?)
            }
            .await;
            (client, r)
        })
    }

    fn meter_state(&self, meter: &str) -> Result<Option<crate::ledger::MeterState>, LedgerError> {
        super::meter::meter_state(&self.shared, meter)
    }

    fn node_minutes(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<crate::ledger::NodeMinute>, LedgerError> {
        super::meter::node_minutes(&self.shared, from, to)
    }

    fn tenant_node_minutes(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<crate::ledger::NodeMinute>, LedgerError> {
        super::meter::node_minutes_of(&self.shared, tenant, from, to)
    }

    fn placing_holds(&self) -> Result<Vec<crate::ledger::PlacingHold>, LedgerError> {
        super::meter::placing_holds(&self.shared)
    }

    fn revision(&self) -> Result<u64, LedgerError> {
        super::revision_of(&self.shared)
    }

    fn node_minutes_as_of(
        &self,
        from: i64,
        to: i64,
        revision: u64,
    ) -> Result<Vec<crate::ledger::NodeMinute>, LedgerError> {
        super::meter::node_minutes_as_of(&self.shared, None, from, to, Some(revision))
    }

    fn late_in_meter_minutes(
        &self,
        meter: &str,
        after: u64,
        through: u64,
    ) -> Result<Vec<(u64, i64, String)>, LedgerError> {
        super::meter::late_in_meter_minutes(&self.shared, meter, after, through)
    }

    fn meter_minutes(
        &self,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, crate::ledger::MeterMinute)>, LedgerError> {
        super::meter::meter_minutes(&self.shared, meter, from, to)
    }

    fn meter_hours(
        &self,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, u64, crate::ledger::MeterMinute)>, LedgerError> {
        super::meter::meter_hours(&self.shared, meter, from, to)
    }

    fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError> {
        super::tenant_versions(&self.shared)
    }

    fn tenant_version_count(&self) -> Result<u64, LedgerError> {
        let s = self.shared.clone();
        self.shared.call(move |client| async move {
            let r = async {
                let n: i64 = client
                    .query_one("SELECT COUNT(*) FROM tenant_version", &[])
                    .await?
                    .try_get(0)?;
                Ok(u64_of(&s, n, "tenant versions")?)
            }
            .await;
            (client, r)
        })
    }

    fn minutes(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, i64, BucketDelta)>, LedgerError> {
        let s = self.shared.clone();
        let tenant = tenant.map(str::to_string);
        self.shared.call(move |mut client| async move {
            let r = async {
                let tx = client.build_transaction().read_only(true).start().await?;
                let rows = minutes(&s, &tx, tenant.as_deref(), None, from, to).await?;
                tx.commit().await?;
                Ok(rows)
            }
            .await;
            (client, r)
        })
    }

    fn usage_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError> {
        self.read_usage(UsageQuery {
            tenant: tenant.map(str::to_string),
            node: None,
            from,
            to,
            since_revision,
            with_spans: true,
            allocation: None,
        })
        .map(|(u, _)| u)
    }

    fn usage_allocated_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
        with_nodes: bool,
    ) -> Result<(Usage, UsageAllocation), LedgerError> {
        self.read_usage(UsageQuery {
            tenant: tenant.map(str::to_string),
            node: None,
            from,
            to,
            since_revision,
            with_spans: true,
            allocation: Some(with_nodes),
        })
    }

    fn adjustments_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError> {
        self.read_usage(UsageQuery {
            tenant: tenant.map(str::to_string),
            node: None,
            from,
            to,
            since_revision,
            with_spans: false,
            allocation: None,
        })
        .map(|(u, _)| u)
    }

    fn usage_nodes(&self, tenant: &str, from: i64, to: i64) -> Result<Vec<String>, LedgerError> {
        let tenant = tenant.to_string();
        self.shared.call(move |client| async move {
            let r = async {
                Ok(client
                    .query(
                        "SELECT node FROM usage_minute
                            WHERE tenant = $1 AND minute_start >= $2 AND minute_start < $3
                         UNION
                         SELECT node FROM usage_rollup
                            WHERE tenant = $1 AND start >= $2 AND start < $3
                         ORDER BY node",
                        &[&tenant, &from, &to],
                    )
                    .await?
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<_, _>>()?)
            }
            .await;
            (client, r)
        })
    }

    fn gpu_rows_from(&self) -> Result<Option<i64>, LedgerError> {
        self.shared.call(move |mut client| async move {
            let r = async {
                let tx = client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await?;
                let from = gpu_rows_from_in(&tx).await?;
                tx.commit().await?;
                Ok(from)
            }
            .await;
            (client, r)
        })
    }

    fn usage_gpus(
        &self,
        tenant: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, String)>, LedgerError> {
        let tenant = tenant.to_string();
        self.shared.call(move |client| async move {
            let r = async {
                let rows = client
                    .query(
                        "SELECT DISTINCT node, gpu FROM gpu_hour
                            WHERE tenant = $1 AND hour_start >= $2 AND hour_start < $3
                         ORDER BY node, gpu",
                        &[&tenant, &from, &to],
                    )
                    .await?;
                rows.iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect::<Result<_, Fail>>()
            }
            .await;
            (client, r)
        })
    }

    fn gpu_usage(
        &self,
        tenant: &str,
        node: &str,
        gpu: &str,
        from: i64,
        to: i64,
    ) -> Result<GpuUsage, LedgerError> {
        let (tenant, node, gpu) = (tenant.to_string(), node.to_string(), gpu.to_string());
        let s = self.shared.clone();
        self.shared.call(move |mut client| async move {
            let r = async {
                let (tx, revision, finalized_through) = snapshot(&s, &mut client).await?;
                let complete_from = gpu_rows_from_in(&tx).await?;
                let rows = tx
                    .query(
                        &format!(
                            "SELECT hour_start, revision, {} FROM gpu_hour
                             WHERE tenant = $1 AND node = $2 AND gpu = $3 AND hour_start >= $4
                                AND hour_start < $5
                             ORDER BY hour_start",
                            GPU_COLUMNS.join(", ")
                        ),
                        &[&tenant, &node, &gpu, &from, &to],
                    )
                    .await?;
                let mut hours = Vec::with_capacity(rows.len());
                for r in &rows {
                    let mut v = [0u64; GPU_FIELDS];
                    for (i, slot) in v.iter_mut().enumerate() {
                        *slot = u64_of(&s, r.try_get(2 + i)?, GPU_COLUMNS[i])?;
                    }
                    hours.push(GpuHour {
                        start: r.try_get(0)?,
                        revision: u64_of(&s, r.try_get(1)?, "revision")?,
                        delta: GpuDelta::bucket(v),
                    });
                }
                tx.commit().await?;
                Ok(GpuUsage {
                    hours,
                    revision,
                    finalized_through,
                    complete_from,
                })
            }
            .await;
            (client, r)
        })
    }

    fn node_usage_since(
        &self,
        tenant: &str,
        node: &str,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError> {
        self.read_usage(UsageQuery {
            tenant: Some(tenant.to_string()),
            node: Some(node.to_string()),
            from,
            to,
            since_revision,
            with_spans: true,
            allocation: None,
        })
        .map(|(u, _)| u)
    }

    fn tenants(&self) -> Result<Vec<String>, LedgerError> {
        self.shared.call(move |client| async move {
            let r = async {
                Ok(client
                    .query("SELECT tenant FROM tenant_total ORDER BY tenant", &[])
                    .await?
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<_, _>>()?)
            }
            .await;
            (client, r)
        })
    }
}
