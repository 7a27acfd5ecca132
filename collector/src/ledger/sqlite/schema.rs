//! The ledger's schema: migrations applied in order at open, and how a
//! node's GPU cursors are stored.

use std::collections::HashMap;

use prost::Message;
use rusqlite::{Transaction, params};

/// A schema migration: SQL, or code for what SQL cannot express.
pub(super) enum Migration {
    Sql(&'static str),
    Code(fn(&Transaction) -> rusqlite::Result<()>),
}

/// SQL for a new random ledger id, spelled as a version-4 UUID.
macro_rules! new_ledger_id {
    () => {
        "(SELECT lower(substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-4' || substr(h, 14, 3)
            || '-' || substr('89ab', 1 + abs(random() % 4), 1) || substr(h, 18, 3)
            || '-' || substr(h, 21, 12)) FROM (SELECT hex(randomblob(16)) AS h))"
    };
}
pub(super) use new_ledger_id;

/// Schema migrations, applied in order; the index is the version reached.
pub(super) const MIGRATIONS: &[Migration] = &[
    // 1: cursors, minute buckets and tenant totals.
    Migration::Sql(
        "CREATE TABLE node_cursor (
        node TEXT PRIMARY KEY,
        epoch INTEGER NOT NULL,
        last_seq INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE gpu_cursor (
        uuid TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        last_counter_mj INTEGER,
        last_timestamp_ns INTEGER,
        remainder_mw_ns INTEGER NOT NULL,
        energy_mj INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE usage_minute (
        tenant TEXT NOT NULL,
        node TEXT NOT NULL,
        minute_start INTEGER NOT NULL,
        energy_mj INTEGER NOT NULL,
        gpu_ns INTEGER NOT NULL,
        busy_gpu_ns INTEGER NOT NULL,
        samples INTEGER NOT NULL,
        PRIMARY KEY (tenant, node, minute_start)
     ) WITHOUT ROWID;
     CREATE TABLE tenant_total (
        tenant TEXT PRIMARY KEY,
        energy_mj INTEGER NOT NULL
     ) WITHOUT ROWID;",
    ),
    // 2: coverage, estimated energy and contract overage.
    Migration::Sql(
        "ALTER TABLE usage_minute ADD COLUMN expected_gpu_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_minute ADD COLUMN estimated_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_minute ADD COLUMN over_contract_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_minute ADD COLUMN overage_mj INTEGER NOT NULL DEFAULT 0;",
    ),
    // 3: usage queries read by time.
    Migration::Sql("CREATE INDEX usage_minute_by_time ON usage_minute (minute_start, tenant);"),
    // 4: over-contract time per tenant, so the counter survives restarts.
    Migration::Sql(
        "ALTER TABLE tenant_total ADD COLUMN over_contract_ns INTEGER NOT NULL DEFAULT 0;",
    ),
    // 5: hourly and daily rollups (per tenant and node, plus each tenant's
    // peak quarter-hour), the hours whose minutes changed since they were
    // rolled up, and how far back each granularity is kept.
    Migration::Sql(
        "CREATE TABLE usage_rollup (
        period INTEGER NOT NULL,
        start INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        node TEXT NOT NULL,
        energy_mj INTEGER NOT NULL,
        gpu_ns INTEGER NOT NULL,
        busy_gpu_ns INTEGER NOT NULL,
        samples INTEGER NOT NULL,
        expected_gpu_ns INTEGER NOT NULL,
        estimated_mj INTEGER NOT NULL,
        over_contract_ns INTEGER NOT NULL,
        overage_mj INTEGER NOT NULL,
        PRIMARY KEY (period, start, tenant, node)
     ) WITHOUT ROWID;
     CREATE TABLE demand_rollup (
        period INTEGER NOT NULL,
        start INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        peak_quarter_mj INTEGER NOT NULL,
        PRIMARY KEY (period, start, tenant)
     ) WITHOUT ROWID;
     CREATE TABLE rollup_pending (hour_start INTEGER PRIMARY KEY) WITHOUT ROWID;
     CREATE TABLE retention (
        period INTEGER PRIMARY KEY,
        kept_from INTEGER NOT NULL
     ) WITHOUT ROWID;
     INSERT OR IGNORE INTO rollup_pending
        SELECT DISTINCT minute_start - minute_start % 3600 FROM usage_minute;",
    ),
    // 6: a node's GPU cursors move into its node_cursor row, so that a
    // commit writes one row per node instead of one per GPU.
    Migration::Code(gpu_cursors_into_nodes),
    // 7: the watermark, kept by the ledger itself (minutes ending at or
    // before it never change), the revision of the last commit, and the
    // bucket deltas that arrived for minutes already final, booked as
    // adjustments instead.
    Migration::Sql(
        "CREATE TABLE watermark (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        revision INTEGER NOT NULL,
        finalized_through INTEGER NOT NULL
     );
     INSERT INTO watermark (id, revision, finalized_through) VALUES (1, 0, 0);
     CREATE TABLE adjustment (
        revision INTEGER NOT NULL,
        booked_at INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        node TEXT NOT NULL,
        minute_start INTEGER NOT NULL,
        energy_mj INTEGER NOT NULL,
        gpu_ns INTEGER NOT NULL,
        busy_gpu_ns INTEGER NOT NULL,
        samples INTEGER NOT NULL,
        expected_gpu_ns INTEGER NOT NULL,
        estimated_mj INTEGER NOT NULL,
        over_contract_ns INTEGER NOT NULL,
        overage_mj INTEGER NOT NULL,
        PRIMARY KEY (revision, tenant, node, minute_start)
     ) WITHOUT ROWID;
     CREATE INDEX adjustment_by_time ON adjustment (minute_start, tenant);",
    ),
    // 8: every version of the tenant file the collector loaded, with the
    // moment it took effect, so that samples delivered late (after a
    // restart too) are attributed by the leases of their own time.
    Migration::Sql(
        "CREATE TABLE tenant_version (
        id INTEGER PRIMARY KEY,
        effective_from_ns INTEGER NOT NULL,
        loaded_at_ns INTEGER NOT NULL,
        file TEXT NOT NULL
     );",
    ),
    // 9: the ledger's identity (a random id, when it was created, or for
    // an older ledger when this migration ran); how many commits it holds
    // is `watermark.revision`, checked against the `.last-commit` file at
    // every start.
    Migration::Sql(concat!(
        "CREATE TABLE ledger_identity (
        only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
        ledger_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        opened_at INTEGER NOT NULL
     );
     INSERT INTO ledger_identity SELECT 1, ",
        new_ledger_id!(),
        ", unixepoch(), unixepoch();"
    )),
    // 10: over-contract time and overage follow the minutes' energy in
    // sample time (`over_contract`), no longer live power at the wall
    // clock's minute. Rollups keep the evaluation of their minutes with
    // their peak (what the minutes held before is kept there for rollups
    // whose minutes are gone); hours whose minutes are kept are rolled up
    // again under the new rule; the figures booked into the minutes (node
    // "") are dropped.
    Migration::Sql(
        "ALTER TABLE demand_rollup ADD COLUMN over_contract_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE demand_rollup ADD COLUMN overage_mj INTEGER NOT NULL DEFAULT 0;
     UPDATE demand_rollup SET
        over_contract_ns = (SELECT COALESCE(SUM(r.over_contract_ns), 0) FROM usage_rollup r
            WHERE r.period = demand_rollup.period AND r.start = demand_rollup.start
                AND r.tenant = demand_rollup.tenant),
        overage_mj = (SELECT COALESCE(SUM(r.overage_mj), 0) FROM usage_rollup r
            WHERE r.period = demand_rollup.period AND r.start = demand_rollup.start
                AND r.tenant = demand_rollup.tenant);
     UPDATE usage_rollup SET over_contract_ns = 0, overage_mj = 0
        WHERE over_contract_ns != 0 OR overage_mj != 0;
     INSERT OR IGNORE INTO rollup_pending
        SELECT DISTINCT minute_start - minute_start % 3600 FROM usage_minute;
     UPDATE usage_minute SET over_contract_ns = 0, overage_mj = 0
        WHERE over_contract_ns != 0 OR overage_mj != 0;
     DELETE FROM usage_minute WHERE node = '' AND energy_mj = 0 AND gpu_ns = 0
        AND busy_gpu_ns = 0 AND samples = 0 AND expected_gpu_ns = 0 AND estimated_mj = 0;",
    ),
    // 11: who holds each node (the holder whose commits may write its
    // cursor) with a fencing generation, bumped each time the node passes
    // to another holder; and the compaction lease, one holder's at a time
    // until it expires. Nodes get their claim when first claimed or
    // committed.
    Migration::Sql(
        "CREATE TABLE node_claim (
        node TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        generation INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE compaction_lease (
        only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
        holder TEXT NOT NULL,
        expires_at INTEGER NOT NULL
     );",
    ),
    // 12: each holder's last commit id, written in the commit's own
    // transaction: what tells whether a commit whose answer was lost was
    // written, and keeps a stale copy of it from landing after its retry.
    Migration::Sql(
        "CREATE TABLE holder_commit (
        holder TEXT PRIMARY KEY,
        last_id INTEGER NOT NULL
     ) WITHOUT ROWID;",
    ),
    // 13: node and facility power. Node energy (whole-node power
    // sources, split among the tenants with GPUs on the node), the part of
    // it estimated, and the time its readings covered, in every bucket,
    // rollup and adjustment; each tenant's node energy total; the highest
    // quarter-hour of node energy in a rollup, for a contract on node
    // energy (rows from before hold 0: no node energy was measured then).
    // And the facility meters' allocation: where each meter stands (the
    // minute it reached and the reading it counts on from), each
    // meter-minute's metered, measured and unallocated energy, and each
    // tenant's part of it.
    Migration::Sql(
        "ALTER TABLE usage_minute ADD COLUMN node_energy_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_minute ADD COLUMN node_estimated_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_minute ADD COLUMN node_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_rollup ADD COLUMN node_energy_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_rollup ADD COLUMN node_estimated_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_rollup ADD COLUMN node_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE adjustment ADD COLUMN node_energy_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE adjustment ADD COLUMN node_estimated_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE adjustment ADD COLUMN node_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE tenant_total ADD COLUMN node_energy_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE demand_rollup ADD COLUMN node_peak_quarter_mj INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE meter_state (
        meter TEXT PRIMARY KEY,
        allocated_through INTEGER NOT NULL,
        reading_at_ns INTEGER NOT NULL,
        reading_raw INTEGER NOT NULL,
        carry_mj INTEGER NOT NULL
     );
     CREATE TABLE meter_minute (
        meter TEXT NOT NULL,
        minute_start INTEGER NOT NULL,
        metered_mj INTEGER NOT NULL,
        measured_mj INTEGER NOT NULL,
        unallocated_mj INTEGER NOT NULL,
        PRIMARY KEY (meter, minute_start)
     );
     CREATE TABLE meter_allocation (
        meter TEXT NOT NULL,
        tenant TEXT NOT NULL,
        minute_start INTEGER NOT NULL,
        measured_mj INTEGER NOT NULL,
        allocated_mj INTEGER NOT NULL,
        PRIMARY KEY (meter, minute_start, tenant)
     );",
    ),
    // 14: facility billing that stands. Each tenant's part of a
    // meter-minute keeps the node energy its allocation replaced, so a
    // meter's node list changing later changes no minute allocated
    // before; parts allocated before hold what their nodes measured (the
    // node energy wherever the node had a whole-node source, which the
    // facility basis needs anyway). Rollups keep each tenant's allocation,
    // the node energy it replaced and the highest quarter-hour of facility
    // energy (NULL in rollups from before: the PUE estimate); hours whose
    // minutes or allocations are kept are rolled up again to fill them.
    // Meter-minutes and tenants' parts past the minute retention are kept
    // as hourly sums (with how many minutes each holds), as long as the
    // daily usage rollups. An allocation is booked as adjustments of its
    // own revision, with each tenant-minute's allocation and the node
    // energy it replaced (0 in adjustments from before).
    Migration::Sql(
        "ALTER TABLE meter_allocation ADD COLUMN node_mj INTEGER NOT NULL DEFAULT 0;
     UPDATE meter_allocation SET node_mj = measured_mj;
     ALTER TABLE demand_rollup ADD COLUMN allocated_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE demand_rollup ADD COLUMN allocated_node_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE demand_rollup ADD COLUMN facility_peak_quarter_mj INTEGER;
     INSERT OR IGNORE INTO rollup_pending
        SELECT DISTINCT minute_start - minute_start % 3600 FROM usage_minute;
     INSERT OR IGNORE INTO rollup_pending
        SELECT DISTINCT minute_start - minute_start % 3600 FROM meter_allocation;
     CREATE TABLE meter_rollup (
        meter TEXT NOT NULL,
        start INTEGER NOT NULL,
        minutes INTEGER NOT NULL,
        metered_mj INTEGER NOT NULL,
        measured_mj INTEGER NOT NULL,
        unallocated_mj INTEGER NOT NULL,
        PRIMARY KEY (meter, start)
     ) WITHOUT ROWID;
     CREATE TABLE meter_allocation_rollup (
        meter TEXT NOT NULL,
        start INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        measured_mj INTEGER NOT NULL,
        allocated_mj INTEGER NOT NULL,
        node_mj INTEGER NOT NULL,
        PRIMARY KEY (meter, start, tenant)
     ) WITHOUT ROWID;
     ALTER TABLE adjustment ADD COLUMN facility_allocated_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE adjustment ADD COLUMN facility_node_mj INTEGER NOT NULL DEFAULT 0;",
    ),
    // 15: where each node's power readings may still book energy (the
    // earliest minute, and when the newest reading was taken), beside its
    // cursor: the meters' allocation waits for it. NULL for a node
    // without power readings and in rows written before.
    Migration::Sql(
        "ALTER TABLE node_cursor ADD COLUMN placing_from INTEGER;
     ALTER TABLE node_cursor ADD COLUMN placing_seen INTEGER;",
    ),
    // 16: per-GPU hours: each GPU's figures (the unit a tenant leases: a
    // board, or a MIG board's part) per tenant, node and hour, added to in
    // the commit's transaction, with the revision of the last commit that
    // added to it late; and from when they hold every GPU's figures
    // (`gpu_rows.since`, NULL: not complete now), and the last minute a
    // writer that kept none booked (`incomplete_through`: they are
    // complete again only after it). A ledger without commits holds them
    // all (0); an older one from the first whole hour after this
    // migration.
    Migration::Sql(
        "CREATE TABLE gpu_hour (
        tenant TEXT NOT NULL,
        node TEXT NOT NULL,
        gpu TEXT NOT NULL,
        hour_start INTEGER NOT NULL,
        energy_mj INTEGER NOT NULL,
        gpu_ns INTEGER NOT NULL,
        busy_gpu_ns INTEGER NOT NULL,
        samples INTEGER NOT NULL,
        expected_gpu_ns INTEGER NOT NULL,
        estimated_mj INTEGER NOT NULL,
        revision INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, node, gpu, hour_start)
     ) WITHOUT ROWID;
     CREATE TABLE gpu_rows (
        only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
        since INTEGER,
        incomplete_through INTEGER
     );
     INSERT INTO gpu_rows SELECT 1, CASE WHEN revision = 0 THEN 0
        ELSE (unixepoch() / 3600 + 1) * 3600 END, NULL FROM watermark WHERE id = 1;",
    ),
    // 17: the GPU time whose readings carried no utilization, told apart
    // from idle time (it counted as 0 % busy before), in every bucket,
    // rollup, adjustment and per-GPU hour; rows from before hold 0, as
    // they were read.
    Migration::Sql(
        "ALTER TABLE usage_minute ADD COLUMN busy_unknown_gpu_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_rollup ADD COLUMN busy_unknown_gpu_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE adjustment ADD COLUMN busy_unknown_gpu_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE gpu_hour ADD COLUMN busy_unknown_gpu_ns INTEGER NOT NULL DEFAULT 0;",
    ),
    // 18: energy booked for a meter's allocated minutes after their split
    // is split into them again: each meter's state keeps the revision its
    // minutes were split as of. A meter allocated before starts from the
    // ledger's revision now (what it split earlier stands as it was).
    Migration::Sql(
        "ALTER TABLE meter_state ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
     UPDATE meter_state SET revision = (SELECT revision FROM watermark WHERE id = 1);",
    ),
];

/// Migration 6: `gpu_cursor` rows become each node's `node_cursor.gpus`.
fn gpu_cursors_into_nodes(tx: &Transaction) -> rusqlite::Result<()> {
    tx.execute_batch("ALTER TABLE node_cursor ADD COLUMN gpus BLOB NOT NULL DEFAULT x'';")?;
    let mut by_node: HashMap<String, Vec<StoredGpu>> = HashMap::new();
    {
        let unsigned = |i: usize, v: i64| {
            u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v))
        };
        let mut q = tx.prepare(
            "SELECT uuid, node, last_counter_mj, last_timestamp_ns, remainder_mw_ns, energy_mj
             FROM gpu_cursor ORDER BY node, uuid",
        )?;
        let mut rows = q.query([])?;
        while let Some(r) = rows.next()? {
            let gpu = StoredGpu {
                changed_ns: None,
                uuid: r.get(0)?,
                last_counter_mj: r
                    .get::<_, Option<i64>>(2)?
                    .map(|v| unsigned(2, v))
                    .transpose()?,
                last_timestamp_ns: r.get(3)?,
                remainder_mw_ns: unsigned(4, r.get(4)?)?,
                energy_mj: unsigned(5, r.get(5)?)?,
                counter_resets: 0,
            };
            by_node.entry(r.get(1)?).or_default().push(gpu);
        }
    }
    let mut put = tx.prepare(
        "INSERT INTO node_cursor (node, epoch, last_seq, gpus) VALUES (?1, 0, 0, ?2)
         ON CONFLICT (node) DO UPDATE SET gpus = ?2",
    )?;
    for (node, gpus) in by_node {
        let stored = StoredGpus {
            stretch: Vec::new(),
            gpus,
            power: Vec::new(),
        };
        put.execute(params![node, stored.encode_to_vec()])?;
    }
    tx.execute_batch("DROP TABLE gpu_cursor;")
}

fn stored(list: &[(std::sync::Arc<str>, crate::ledger::GpuCursor)]) -> Vec<StoredGpu> {
    list.iter()
        .map(|(uuid, g)| StoredGpu {
            uuid: uuid.to_string(),
            last_counter_mj: g.last_counter_mj,
            last_timestamp_ns: g.last_timestamp_ns,
            remainder_mw_ns: g.remainder_mw_ns,
            energy_mj: g.energy_mj,
            counter_resets: g.counter_resets,
            changed_ns: g.changed_ns,
        })
        .collect()
}

fn cursors(list: Vec<StoredGpu>) -> Vec<(std::sync::Arc<str>, crate::ledger::GpuCursor)> {
    list.into_iter()
        .map(|g| {
            (
                std::sync::Arc::from(g.uuid),
                crate::ledger::GpuCursor {
                    last_counter_mj: g.last_counter_mj,
                    last_timestamp_ns: g.last_timestamp_ns,
                    remainder_mw_ns: g.remainder_mw_ns,
                    energy_mj: g.energy_mj,
                    counter_resets: g.counter_resets,
                    changed_ns: g.changed_ns,
                },
            )
        })
        .collect()
}

impl StoredGpus {
    /// A node's GPU cursors (by UUID) and power source cursors (by
    /// `"{kind}/{name}"`) as stored.
    pub(in crate::ledger) fn of(n: &crate::ledger::NodeCursor) -> Self {
        Self {
            gpus: stored(&n.gpus),
            power: stored(&n.power),
            stretch: n
                .stretch
                .iter()
                .map(|(tenant, w)| StoredStretch {
                    tenant: tenant.to_string(),
                    gpu_energy_mj: w.gpu_energy_mj,
                    gpu_ns: w.gpu_ns,
                    // The hull of the runs, for a reader that knows no
                    // runs.
                    span_from_ns: w.runs.iter().map(|r| r.from_ns).min(),
                    span_to_ns: w.runs.iter().map(|r| r.to_ns).max(),
                    runs: w
                        .runs
                        .iter()
                        .map(|r| StoredRun {
                            from_ns: r.from_ns,
                            to_ns: r.to_ns,
                            gpu_ns: r.gpu_ns,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The node's cursor as stored, at (`epoch`, `last_seq`).
    pub(in crate::ledger) fn into_cursor(
        self,
        epoch: u64,
        last_seq: u64,
    ) -> crate::ledger::NodeCursor {
        crate::ledger::NodeCursor {
            epoch,
            last_seq,
            gpus: cursors(self.gpus),
            power: cursors(self.power),
            stretch: self
                .stretch
                .into_iter()
                .map(|s| {
                    let mut runs: Vec<crate::accounting::Run> = s
                        .runs
                        .iter()
                        .map(|r| crate::accounting::Run {
                            from_ns: r.from_ns,
                            to_ns: r.to_ns,
                            gpu_ns: r.gpu_ns,
                        })
                        .collect();
                    if runs.is_empty()
                        && let Some((from_ns, to_ns)) = s.span_from_ns.zip(s.span_to_ns)
                    {
                        // Written before runs were kept: its span, as one.
                        runs.push(crate::accounting::Run {
                            from_ns,
                            to_ns,
                            gpu_ns: s.gpu_ns,
                        });
                    }
                    (
                        std::sync::Arc::from(s.tenant),
                        crate::accounting::StretchWeight {
                            gpu_energy_mj: s.gpu_energy_mj,
                            gpu_ns: s.gpu_ns,
                            runs,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// How a node's GPU cursors are stored (`node_cursor.gpus`): protobuf, so
/// that a later version can add fields and still read older rows.
#[derive(Clone, PartialEq, prost::Message)]
pub(in crate::ledger) struct StoredGpus {
    #[prost(message, repeated, tag = "1")]
    pub(in crate::ledger) gpus: Vec<StoredGpu>,
    /// Added later: the node's power sources, each keyed by
    /// `"{kind}/{name}"` in `uuid`, counted as a GPU is; a cursor written
    /// before reads with none.
    #[prost(message, repeated, tag = "2")]
    pub(in crate::ledger) power: Vec<StoredGpu>,
    /// Added later: the node's open whole-node stretch, one entry per
    /// tenant (`NodeCursor::stretch`); a cursor written before reads with
    /// none.
    #[prost(message, repeated, tag = "3")]
    pub(in crate::ledger) stretch: Vec<StoredStretch>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(in crate::ledger) struct StoredStretch {
    #[prost(string, tag = "1")]
    pub(in crate::ledger) tenant: String,
    #[prost(uint64, tag = "2")]
    pub(in crate::ledger) gpu_energy_mj: u64,
    #[prost(uint64, tag = "3")]
    pub(in crate::ledger) gpu_ns: u64,
    #[prost(sint64, optional, tag = "4")]
    pub(in crate::ledger) span_from_ns: Option<i64>,
    #[prost(sint64, optional, tag = "5")]
    pub(in crate::ledger) span_to_ns: Option<i64>,
    /// Added later: where its GPU time lies (`StretchWeight::runs`); a
    /// stretch written before has its span alone.
    #[prost(message, repeated, tag = "6")]
    pub(in crate::ledger) runs: Vec<StoredRun>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(in crate::ledger) struct StoredRun {
    #[prost(sint64, tag = "1")]
    pub(in crate::ledger) from_ns: i64,
    #[prost(sint64, tag = "2")]
    pub(in crate::ledger) to_ns: i64,
    #[prost(uint64, tag = "3")]
    pub(in crate::ledger) gpu_ns: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(in crate::ledger) struct StoredGpu {
    #[prost(string, tag = "1")]
    pub(in crate::ledger) uuid: String,
    #[prost(uint64, optional, tag = "2")]
    pub(in crate::ledger) last_counter_mj: Option<u64>,
    #[prost(sint64, optional, tag = "3")]
    pub(in crate::ledger) last_timestamp_ns: Option<i64>,
    #[prost(uint64, tag = "4")]
    pub(in crate::ledger) remainder_mw_ns: u64,
    #[prost(uint64, tag = "5")]
    pub(in crate::ledger) energy_mj: u64,
    /// Added later: a cursor written before it reads as 0.
    #[prost(uint64, tag = "6")]
    pub(in crate::ledger) counter_resets: u64,
    /// Added later (`GpuCursor::changed_ns`): a cursor written before it
    /// reads as unknown.
    #[prost(sint64, optional, tag = "7")]
    pub(in crate::ledger) changed_ns: Option<i64>,
}
