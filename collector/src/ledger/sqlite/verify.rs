//! `capwatch-collector verify`: every rollup and total of a ledger file
//! recomputed from what it is made of, and any difference reported.
//!
//! What compaction keeps (see `compact`) decides what can be checked:
//!
//! - An hourly rollup (usage and demand) equals its minutes, for hours
//!   from `retention` of minutes on that are not `rollup_pending` (a
//!   pending hour's minutes changed since it was rolled up, or it is not
//!   closed yet). Older hours' minutes are gone.
//! - A daily rollup equals its hourly rollups (sums; peaks are the
//!   highest hour's), for days from `retention` of hours on.
//! - A tenant's `tenant_total` (GPU and node energy, over-contract time)
//!   equals its minutes, plus its hourly rollups of hours whose minutes
//!   are gone, plus its daily rollups of days whose hours are gone, plus
//!   its adjustments. That holds while no daily rollup was dropped: the
//!   adjustments of dropped days go with them, and the totals then hold
//!   more than the ledger still shows.
//!
//! Over-contract time and overage are evaluated against the tenant file
//! versions the ledger recorded, as compaction does; without them they
//! are not checked. Everything is read in one read transaction, so a
//! collector may commit meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{BUCKET_COLUMNS, kept_from, sqlite_err, u64_of, watermark};
use crate::accounting::{Metered, over_contract};
use crate::ledger::{DAY, HOUR, LedgerError, MINUTE};
use crate::tenants::TenantHistory;

/// (hour, tenant) to that hour's minutes as `roll_minutes` takes them:
/// (tenant, minute, and two energies: measured GPU and node energy, or
/// allocated energy and the node energy it replaced).
type ByHour = BTreeMap<(i64, String), Vec<(String, i64, u64, u64)>>;

/// One figure the ledger records that is not what it is made of.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    /// `usage_rollup`, `demand_rollup` or `tenant_total`.
    pub table: &'static str,
    /// 3600 or 86400 for a rollup.
    pub period: Option<i64>,
    /// A rollup's start (Unix seconds).
    pub start: Option<i64>,
    pub tenant: String,
    /// A usage rollup's node.
    pub node: Option<String>,
    pub column: &'static str,
    /// What the ledger holds; none where the row is missing.
    pub recorded: Option<i64>,
    /// What it is made of; none where there is nothing it is made of.
    pub recomputed: Option<i64>,
}

/// What `verify` checked and found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verification {
    pub ledger_id: String,
    pub revision: u64,
    /// Hourly rollups (usage rows and demand rows) compared.
    pub hour_rows_checked: usize,
    /// Daily rollups (usage rows and demand rows) compared.
    pub day_rows_checked: usize,
    /// Tenant totals compared.
    pub tenants_checked: usize,
    /// What could not be checked, and why.
    pub not_checked: Vec<String>,
    pub differences: Vec<Difference>,
}

/// The columns of a demand rollup that `verify` compares.
const DEMAND_COLUMNS: [&str; 6] = [
    "peak_quarter_mj",
    "node_peak_quarter_mj",
    "over_contract_ns",
    "overage_mj",
    "allocated_mj",
    "allocated_node_mj",
];

/// (period, start, tenant, node) to a row's figures.
type Rows = BTreeMap<(i64, String, String), Vec<i64>>;

/// Runs `sql` (one integer key column, two text columns, then integers)
/// into rows keyed by the first three columns.
fn rows(
    conn: &Connection,
    path: &Path,
    sql: &str,
    params: &[i64],
    width: usize,
) -> Result<Rows, LedgerError> {
    let err = sqlite_err(path);
    let mut q = conn.prepare(sql).map_err(err)?;
    let mut out = Rows::new();
    let mut r = q
        .query(rusqlite::params_from_iter(params.iter()))
        .map_err(err)?;
    while let Some(row) = r.next().map_err(err)? {
        let key = (
            row.get::<_, i64>(0).map_err(err)?,
            row.get::<_, String>(1).map_err(err)?,
            row.get::<_, String>(2).map_err(err)?,
        );
        let mut v = Vec::with_capacity(width);
        for i in 0..width {
            v.push(row.get::<_, i64>(3 + i).map_err(err)?);
        }
        out.insert(key, v);
    }
    Ok(out)
}

/// Every difference between `recorded` and `recomputed` rows.
#[allow(clippy::too_many_arguments)]
fn compare(
    table: &'static str,
    period: i64,
    columns: &[&'static str],
    with_node: bool,
    recorded: &Rows,
    recomputed: &Rows,
    skip: &dyn Fn(&str) -> bool,
    out: &mut Vec<Difference>,
) -> usize {
    let keys: BTreeSet<_> = recorded.keys().chain(recomputed.keys()).collect();
    for key in &keys {
        let (a, b) = (recorded.get(*key), recomputed.get(*key));
        for (i, column) in columns.iter().enumerate() {
            if skip(column) {
                continue;
            }
            let (x, y) = (a.map(|v| v[i]), b.map(|v| v[i]));
            if x != y {
                out.push(Difference {
                    table,
                    period: Some(period),
                    start: Some(key.0),
                    tenant: key.1.clone(),
                    node: with_node.then(|| key.2.clone()),
                    column,
                    recorded: x,
                    recomputed: y,
                });
            }
        }
    }
    keys.len()
}

/// Recomputes every rollup and total of the ledger at `path` that its
/// retention still allows (see the module) and reports every difference.
/// `contracts`: the tenant file versions the ledger recorded, for
/// over-contract time and overage.
pub fn verify(path: &Path, contracts: Option<&TenantHistory>) -> Result<Verification, LedgerError> {
    if path.symlink_metadata().is_err() {
        return Err(LedgerError::Missing {
            path: path.to_owned(),
        });
    }
    let err = sqlite_err(path);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(err)?;
    if version as usize != super::schema::MIGRATIONS.len() {
        return Err(if version == 0 {
            LedgerError::NotALedger {
                path: path.to_owned(),
            }
        } else if version as usize > super::schema::MIGRATIONS.len() {
            LedgerError::TooNew {
                path: path.to_owned(),
                found: version,
                known: super::schema::MIGRATIONS.len(),
            }
        } else {
            LedgerError::TooOld {
                path: path.to_owned(),
                found: version,
                known: super::schema::MIGRATIONS.len(),
            }
        });
    }
    conn.execute_batch("BEGIN DEFERRED").map_err(err)?;
    let ledger_id: String = conn
        .query_row("SELECT ledger_id FROM ledger_identity", [], |r| r.get(0))
        .map_err(err)?;
    let (revision, _) = watermark(&conn, path)?;
    let minutes_from = kept_from(&conn, MINUTE, path)?;
    let hours_from = kept_from(&conn, HOUR, path)?;
    let days_from = kept_from(&conn, DAY, path)?;
    let pending: BTreeSet<i64> = {
        let mut q = conn
            .prepare("SELECT hour_start FROM rollup_pending")
            .map_err(err)?;
        q.query_map([], |r| r.get(0))
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?
    };
    let mut differences = Vec::new();
    let mut not_checked = Vec::new();
    if !pending.is_empty() {
        not_checked.push(format!(
            "{} hours not rolled up yet (rollup_pending): their minutes count in the totals",
            pending.len()
        ));
    }
    if minutes_from > 0 {
        not_checked.push(format!(
            "hourly rollups before {minutes_from} (Unix s): their minutes are past retention"
        ));
    }
    if hours_from > 0 {
        not_checked.push(format!(
            "daily rollups before {hours_from} (Unix s): their hours are past retention"
        ));
    }
    let no_contracts =
        |c: &str| contracts.is_none() && (c == "over_contract_ns" || c == "overage_mj");
    if contracts.is_none() {
        not_checked.push(
            "over-contract time and overage: the ledger records no tenant file version".into(),
        );
    }

    // Hourly usage rollups against their minutes.
    let cols = BUCKET_COLUMNS.join(", ");
    let sums = BUCKET_COLUMNS
        .iter()
        .map(|c| format!("SUM({c})"))
        .collect::<Vec<_>>()
        .join(", ");
    let keep_hours = |mut r: Rows| {
        r.retain(|(h, _, _), _| !pending.contains(h));
        r
    };
    let recorded = keep_hours(rows(
        &conn,
        path,
        &format!(
            "SELECT start, tenant, node, {cols} FROM usage_rollup
             WHERE period = 3600 AND start >= ?1"
        ),
        &[minutes_from],
        BUCKET_COLUMNS.len(),
    )?);
    let recomputed = keep_hours(rows(
        &conn,
        path,
        &format!(
            "SELECT minute_start / 3600 * 3600 AS h, tenant, node, {sums} FROM usage_minute
             WHERE minute_start >= ?1 GROUP BY h, tenant, node"
        ),
        &[minutes_from],
        BUCKET_COLUMNS.len(),
    )?);
    let mut hour_rows = compare(
        "usage_rollup",
        HOUR,
        &BUCKET_COLUMNS,
        true,
        &recorded,
        &recomputed,
        &|_| false,
        &mut differences,
    );

    // Per-GPU hours against the minutes and adjustments of their tenant
    // and node (GPU rows include late energy), where they are complete and
    // the minutes are kept.
    let gpu_since: Option<i64> = conn
        .query_row("SELECT since FROM gpu_rows WHERE only_row = 1", [], |r| {
            r.get(0)
        })
        .map_err(err)?;
    match gpu_since {
        None => not_checked
            .push("per-GPU hours: a collector without usage_gpu_rows committed last".into()),
        Some(since) => {
            let from = since.max(minutes_from);
            let gcols = crate::ledger::GPU_COLUMNS;
            let gsums = |t: &str| {
                gcols
                    .iter()
                    .map(|c| format!("SUM({t}{c})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let recorded = rows(
                &conn,
                path,
                &format!(
                    "SELECT hour_start, tenant, node, {} FROM gpu_hour
                     WHERE hour_start >= ?1 GROUP BY hour_start, tenant, node",
                    gsums("")
                ),
                &[from],
                gcols.len(),
            )?;
            let recomputed = rows(
                &conn,
                path,
                &format!(
                    "SELECT h, tenant, node, {} FROM (
                        SELECT minute_start / 3600 * 3600 AS h, tenant, node, {cols}
                            FROM usage_minute WHERE minute_start >= ?1
                        UNION ALL
                        SELECT minute_start / 3600 * 3600 AS h, tenant, node, {cols}
                            FROM adjustment WHERE minute_start >= ?1 AND node != '') AS m
                     GROUP BY h, tenant, node
                     HAVING SUM(m.samples) > 0 OR SUM(m.energy_mj) > 0",
                    gsums("m.")
                ),
                &[from],
                gcols.len(),
            )?;
            hour_rows += compare(
                "gpu_hour",
                HOUR,
                &gcols,
                true,
                &recorded,
                &recomputed,
                &|_| false,
                &mut differences,
            );
        }
    }

    // Each tenant-minute's energy over all nodes: the hourly demand
    // rollups' peaks and evaluations, and the totals' over-contract time.
    let mut tenant_minutes: Vec<(String, i64, u64, u64)> = Vec::new();
    {
        let mut q = conn
            .prepare(
                "SELECT tenant, minute_start, SUM(energy_mj), SUM(node_energy_mj)
                 FROM usage_minute GROUP BY tenant, minute_start",
            )
            .map_err(err)?;
        let mut r = q.query([]).map_err(err)?;
        while let Some(row) = r.next().map_err(err)? {
            tenant_minutes.push((
                row.get(0).map_err(err)?,
                row.get(1).map_err(err)?,
                u64_of(row.get(2).map_err(err)?, path, "minute energy")?,
                u64_of(row.get(3).map_err(err)?, path, "minute node energy")?,
            ));
        }
    }
    // What the meters allocated of each tenant-minute (summed over
    // meters) and the node energy that replaced: a rollup evaluates its
    // minutes with it, as compaction does (`roll_minutes`).
    let mut tenant_allocations: ByHour = BTreeMap::new();
    {
        let mut q = conn
            .prepare(
                "SELECT tenant, minute_start, SUM(allocated_mj), SUM(node_mj)
                 FROM meter_allocation WHERE minute_start >= ?1 GROUP BY tenant, minute_start",
            )
            .map_err(err)?;
        let mut r = q.query([minutes_from]).map_err(err)?;
        while let Some(row) = r.next().map_err(err)? {
            let (tenant, minute): (String, i64) =
                (row.get(0).map_err(err)?, row.get(1).map_err(err)?);
            let allocated = u64_of(row.get(2).map_err(err)?, path, "allocated energy")?;
            let node = u64_of(row.get(3).map_err(err)?, path, "allocated node energy")?;
            tenant_allocations
                .entry((minute.div_euclid(HOUR) * HOUR, tenant.clone()))
                .or_default()
                .push((tenant, minute, allocated, node));
        }
    }
    let evaluate = |tenant: &str, minute: i64, energy: u64, node_energy: u64| -> (u64, u64) {
        match contracts {
            Some(c) => {
                let contract = c.contract_at(tenant, minute);
                over_contract(
                    contract.basis_energy(energy, node_energy, Metered::NONE),
                    contract.milliwatts,
                )
            }
            None => (0, 0),
        }
    };
    let recorded = keep_hours(rows(
        &conn,
        path,
        &format!(
            "SELECT start, tenant, '', {} FROM demand_rollup WHERE period = 3600 AND start >= ?1",
            DEMAND_COLUMNS.join(", ")
        ),
        &[minutes_from],
        DEMAND_COLUMNS.len(),
    )?);
    let recomputed = {
        // (hour, tenant) to each quarter's (energy, node energy) and the
        // hour's evaluation.
        let mut quarters: BTreeMap<(i64, String), BTreeMap<i64, (u64, u64)>> = BTreeMap::new();
        let mut minutes_of: ByHour = BTreeMap::new();
        for (tenant, minute, e, n) in &tenant_minutes {
            if *minute < minutes_from {
                continue;
            }
            let key = (minute.div_euclid(HOUR) * HOUR, tenant.clone());
            let q = quarters
                .entry(key.clone())
                .or_default()
                .entry(minute.div_euclid(900))
                .or_default();
            q.0 += e;
            q.1 += n;
            minutes_of
                .entry(key)
                .or_default()
                .push((tenant.clone(), *minute, *e, *n));
        }
        // A tenant the meters gave a part of minutes it has no bucket in
        // (its energy there all booked late) has a demand row of its own.
        for key in tenant_allocations.keys() {
            if key.0 >= minutes_from {
                quarters.entry(key.clone()).or_default();
            }
        }
        let mut out = Rows::new();
        for ((h, tenant), qs) in quarters {
            let peak = qs.values().map(|q| q.0).max().unwrap_or(0);
            let node_peak = qs.values().map(|q| q.1).max().unwrap_or(0);
            let key = (h, tenant.clone());
            let allocations = tenant_allocations.get(&key).cloned().unwrap_or_default();
            let (allocated, allocated_node) = allocations.iter().fold((0u64, 0u64), |(a, n), x| {
                (a.saturating_add(x.2), n.saturating_add(x.3))
            });
            let (ns, mj) = match contracts {
                Some(c) => crate::ledger::roll_minutes(
                    minutes_of.get(&key).cloned().unwrap_or_default(),
                    allocations,
                    c,
                )
                .get(&tenant)
                .map(|r| (r.over_contract_ns, r.overage_mj))
                .unwrap_or_default(),
                None => (0, 0),
            };
            let v = [peak, node_peak, ns, mj, allocated, allocated_node]
                .into_iter()
                .map(|x| i64::try_from(x).unwrap_or(i64::MAX))
                .collect();
            out.insert((h, tenant, String::new()), v);
        }
        keep_hours(out)
    };
    hour_rows += compare(
        "demand_rollup",
        HOUR,
        &DEMAND_COLUMNS,
        false,
        &recorded,
        &recomputed,
        &no_contracts,
        &mut differences,
    );

    // Daily rollups against their hours.
    let recorded = rows(
        &conn,
        path,
        &format!(
            "SELECT start, tenant, node, {cols} FROM usage_rollup
             WHERE period = 86400 AND start >= ?1"
        ),
        &[hours_from],
        BUCKET_COLUMNS.len(),
    )?;
    let recomputed = rows(
        &conn,
        path,
        &format!(
            "SELECT start / 86400 * 86400 AS d, tenant, node, {sums} FROM usage_rollup
             WHERE period = 3600 AND start >= ?1 GROUP BY d, tenant, node"
        ),
        &[hours_from],
        BUCKET_COLUMNS.len(),
    )?;
    let mut day_rows = compare(
        "usage_rollup",
        DAY,
        &BUCKET_COLUMNS,
        true,
        &recorded,
        &recomputed,
        &|_| false,
        &mut differences,
    );
    let recorded = rows(
        &conn,
        path,
        &format!(
            "SELECT start, tenant, '', {} FROM demand_rollup WHERE period = 86400 AND start >= ?1",
            DEMAND_COLUMNS.join(", ")
        ),
        &[hours_from],
        DEMAND_COLUMNS.len(),
    )?;
    let recomputed = rows(
        &conn,
        path,
        "SELECT start / 86400 * 86400 AS d, tenant, '', MAX(peak_quarter_mj),
            MAX(node_peak_quarter_mj), SUM(over_contract_ns), SUM(overage_mj),
            SUM(allocated_mj), SUM(allocated_node_mj)
         FROM demand_rollup WHERE period = 3600 AND start >= ?1 GROUP BY d, tenant",
        &[hours_from],
        DEMAND_COLUMNS.len(),
    )?;
    day_rows += compare(
        "demand_rollup",
        DAY,
        &DEMAND_COLUMNS,
        false,
        &recorded,
        &recomputed,
        &|_| false,
        &mut differences,
    );

    // Tenant totals against minutes, rollups of what is gone, and
    // adjustments.
    let mut tenants_checked = 0;
    if days_from > 0 {
        not_checked.push(format!(
            "tenant totals: daily rollups and adjustments before {days_from} (Unix s) were dropped by retention"
        ));
    } else {
        let part = |sql: &str, params: &[i64]| {
            rows(&conn, path, sql, params, 3).map(|r| {
                r.into_iter()
                    .map(|((_, t, _), v)| (t, v))
                    .collect::<Vec<_>>()
            })
        };
        let mut sums: BTreeMap<String, [i64; 3]> = BTreeMap::new();
        let mut add = |parts: Vec<(String, Vec<i64>)>| {
            for (t, v) in parts {
                let s = sums.entry(t).or_default();
                for i in 0..3 {
                    s[i] = s[i].saturating_add(v[i]);
                }
            }
        };
        add(part(
            "SELECT 0, tenant, '', SUM(energy_mj), SUM(node_energy_mj), 0
             FROM usage_minute GROUP BY tenant",
            &[],
        )?);
        add(part(
            "SELECT 0, tenant, '', SUM(energy_mj), SUM(node_energy_mj), 0 FROM usage_rollup
             WHERE (period = 3600 AND start >= ?1 AND start < ?2)
                OR (period = 86400 AND start < ?1)
             GROUP BY tenant",
            &[hours_from, minutes_from],
        )?);
        add(part(
            "SELECT 0, tenant, '', 0, 0, SUM(over_contract_ns) FROM demand_rollup
             WHERE (period = 3600 AND start >= ?1 AND start < ?2)
                OR (period = 86400 AND start < ?1)
             GROUP BY tenant",
            &[hours_from, minutes_from],
        )?);
        add(part(
            "SELECT 0, tenant, '', SUM(energy_mj), SUM(node_energy_mj), SUM(over_contract_ns)
             FROM adjustment GROUP BY tenant",
            &[],
        )?);
        let mut over: BTreeMap<String, u64> = BTreeMap::new();
        for (tenant, minute, e, n) in &tenant_minutes {
            let (ns, _) = evaluate(tenant, *minute, *e, *n);
            *over.entry(tenant.clone()).or_default() += ns;
        }
        add(over
            .into_iter()
            .map(|(t, ns)| (t, vec![0, 0, i64::try_from(ns).unwrap_or(i64::MAX)]))
            .collect());
        let recorded: Rows = part(
            "SELECT 0, tenant, '', energy_mj, node_energy_mj, over_contract_ns FROM tenant_total",
            &[],
        )?
        .into_iter()
        .map(|(t, v)| ((0, t, String::new()), v))
        .collect();
        // A tenant with nothing recorded and nothing to add up has no row.
        let recomputed: Rows = sums
            .into_iter()
            .filter(|(t, v)| {
                v.iter().any(|x| *x != 0) || recorded.contains_key(&(0, t.clone(), String::new()))
            })
            .map(|(t, v)| ((0, t, String::new()), v.to_vec()))
            .collect();
        // A tenant's over-contract time is counted into its total as it is
        // booked, on the estimate; an hour rolled up after its meter
        // allocated it is evaluated on the allocation. Where such hours'
        // minutes are gone, the total cannot be recomputed.
        let allocated_rolled: BTreeSet<String> = part(
            "SELECT 0, tenant, '', 0, 0, 0 FROM demand_rollup
             WHERE ((period = 3600 AND start >= ?1 AND start < ?2)
                OR (period = 86400 AND start < ?1)) AND allocated_mj > 0
             GROUP BY tenant",
            &[hours_from, minutes_from],
        )?
        .into_iter()
        .map(|(t, _)| t)
        .collect();
        if !allocated_rolled.is_empty() {
            not_checked.push(format!(
                "over-contract time in the totals of {}: rollups past the minutes' retention hold allocated facility energy",
                allocated_rolled.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let columns = ["energy_mj", "node_energy_mj", "over_contract_ns"];
        let before = differences.len();
        tenants_checked = compare(
            "tenant_total",
            0,
            &columns,
            false,
            &recorded,
            &recomputed,
            &no_contracts,
            &mut differences,
        );
        let mut kept = before;
        for i in before..differences.len() {
            let skip = differences[i].column == "over_contract_ns"
                && allocated_rolled.contains(&differences[i].tenant);
            if !skip {
                differences.swap(kept, i);
                kept += 1;
            }
        }
        differences.truncate(kept);
        for d in &mut differences[before..] {
            d.period = None;
            d.start = None;
        }
    }
    conn.execute_batch("COMMIT").map_err(err)?;
    Ok(Verification {
        ledger_id,
        revision,
        hour_rows_checked: hour_rows,
        day_rows_checked: day_rows,
        tenants_checked,
        not_checked,
        differences,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ledger::sqlite::Ledger;
    use crate::ledger::{BucketDelta, Commit, Compaction};
    use crate::tenants::Tenants;

    const T0: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z

    fn contracts() -> Arc<TenantHistory> {
        Arc::new(TenantHistory::new(Arc::new(
            Tenants::from_toml("[[tenant]]\nid = \"a\"\ncontracted_kw = 1\nnodes = [\"n*\"]\n")
                .unwrap(),
        )))
    }

    /// A commit of (tenant, node, minute, mJ), with its tenant energy, as
    /// the collector makes them.
    fn commit(entries: &[(&str, &str, i64, u64)]) -> Commit {
        let mut c = Commit::default();
        for &(t, n, m, e) in entries {
            c.buckets
                .entry((Arc::from(t), Arc::from(n), m))
                .or_default()
                .add(&BucketDelta {
                    energy_mj: e,
                    node_energy_mj: e / 2,
                    gpu_ns: 60_000_000_000,
                    samples: 60,
                    ..BucketDelta::default()
                });
            *c.tenant_energy.entry(Arc::from(t)).or_default() += e;
            // One GPU per node, its hours from the same figures.
            c.gpu_hours
                .entry((
                    Arc::from(t),
                    Arc::from(n),
                    Arc::from("GPU-1"),
                    m / HOUR * HOUR,
                ))
                .or_default()
                .add(&crate::ledger::GpuDelta {
                    delta: BucketDelta {
                        energy_mj: e,
                        gpu_ns: 60_000_000_000,
                        samples: 60,
                        ..BucketDelta::default()
                    },
                    first_minute: m,
                });
        }
        c.contracts = Some(contracts());
        c
    }

    /// Three hours over two days, a late minute and a final minute's
    /// adjustment, compacted with the first day's minutes dropped.
    fn ledger(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("ledger.db");
        let mut l = Ledger::create(&path).unwrap();
        let mut entries = Vec::new();
        for m in 0..60 {
            entries.push(("a", "n1", T0 + m * 60, 50_000_000 + m as u64 * 500_000));
            entries.push(("a", "n2", T0 + HOUR + m * 60, 1_000));
            entries.push(("b", "n3", T0 + DAY + m * 60, 7_000));
        }
        l.commit(&commit(&entries)).unwrap();
        let policy = |closed: i64, minutes_from: i64| Compaction {
            closed_before: closed,
            minutes_from,
            hours_from: 0,
            days_from: None,
            allocating_from: None,
        };
        l.compact(&policy(T0 + 2 * HOUR, 0), &contracts()).unwrap();
        // A late minute re-rolls hour 0; a final minute's delta becomes an
        // adjustment.
        l.commit(&commit(&[("a", "n1", T0 + 30 * 60, 20_000_000)]))
            .unwrap();
        l.commit_at(&Commit::default(), T0, T0 + DAY).unwrap();
        l.commit_at(
            &commit(&[("a", "n1", T0 + 5 * 60, 30_000_000)]),
            T0 + DAY,
            T0 + DAY,
        )
        .unwrap();
        l.compact(&policy(T0 + DAY + HOUR, T0 + DAY), &contracts())
            .unwrap();
        path
    }

    /// A facility tenant's hour the meter allocated, then rolled up: its
    /// over-contract time and overage are measured on the allocation (over
    /// its contract every minute, where the PUE estimate is under it), and
    /// `verify` recomputes them the same way.
    #[test]
    fn a_facility_tenants_rollups_verify_against_the_meters_allocation() {
        use crate::ledger::{MeterMinute, MeterShare, MeterState};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut l = Ledger::create(&path).unwrap();
        let history = Arc::new(TenantHistory::new(Arc::new(
            Tenants::from_toml(
                "[[tenant]]\nid = \"f\"\nnodes = [\"m1\"]\ncontracted_kw = 0.0025\nbasis = \"facility\"\npue = 1.5\n
                 [[tenant]]\nid = \"h\"\nnodes = []\ncontracted_kw = 0.0025\nbasis = \"facility\"\npue = 1.5\n",
            )
            .unwrap(),
        )));
        let mut c = Commit::default();
        let mut minutes = Vec::new();
        for m in 0..60 {
            let minute = T0 + m * 60;
            c.buckets.insert(
                (Arc::from("f"), Arc::from("m1"), minute),
                BucketDelta {
                    energy_mj: 20_000,
                    node_energy_mj: 60_000,
                    node_ns: 60_000_000_000,
                    samples: 1,
                    ..BucketDelta::default()
                },
            );
            minutes.push(MeterMinute {
                minute,
                metered_mj: 160_000,
                measured_mj: 60_000,
                unallocated_mj: 0,
                tenants: vec![MeterShare::new("f", 60_000, 160_000, 60_000)],
            });
        }
        // "h" has a part of a minute it has no bucket in (its energy there
        // all booked late), over its contract.
        let late = &mut minutes[7];
        late.tenants.push(MeterShare::new("h", 5_000, 200_000, 0));
        late.metered_mj += 200_000;
        late.measured_mj += 5_000;
        *c.tenant_energy.entry(Arc::from("f")).or_default() += 60 * 20_000;
        c.gpu_rows = crate::ledger::GpuRows::NotKept;
        c.contracts = Some(history.clone());
        l.commit(&c).unwrap();
        let state = MeterState {
            allocated_through: T0 + HOUR,
            reading_at_ns: (T0 + HOUR) * 1_000_000_000,
            reading_raw: 0,
            carry_mj: 0,
            revision: 0,
        };
        assert!(l.allocate_meter("row-a", None, &state, &minutes).unwrap());
        let policy = Compaction {
            closed_before: T0 + HOUR,
            minutes_from: 0,
            hours_from: 0,
            days_from: None,
            allocating_from: None,
        };
        l.compact(&policy, &history).unwrap();
        drop(l);
        let v = verify(&path, Some(&history)).unwrap();
        assert_eq!(v.differences, vec![], "{v:?}");
        assert!(v.hour_rows_checked >= 2, "{v:?}");
        // The rollup holds the allocation: a changed hour is named against
        // its minutes, and its day against the hours.
        raw(
            &path,
            &format!(
                "UPDATE demand_rollup SET allocated_mj = 1 WHERE period = 3600 AND start = {T0} AND tenant = 'f'"
            ),
        );
        let v = verify(&path, Some(&history)).unwrap();
        assert_eq!(
            v.differences
                .iter()
                .map(|d| (d.column, d.period, d.recorded, d.recomputed))
                .collect::<Vec<_>>(),
            vec![
                ("allocated_mj", Some(3600), Some(1), Some(9_600_000)),
                ("allocated_mj", Some(86400), Some(9_600_000), Some(1)),
            ],
            "{v:?}"
        );
    }

    fn raw(path: &Path, sql: &str) {
        let c = Connection::open(path).unwrap();
        assert_eq!(c.execute(sql, []).unwrap(), 1, "{sql}");
    }

    #[test]
    fn a_whole_ledger_verifies_and_each_damaged_figure_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = ledger(dir.path());
        let ok = verify(&path, Some(&contracts())).unwrap();
        assert_eq!(ok.differences, vec![], "{ok:?}");
        // Hours 0 and 1 (minutes gone: not checked), day 1's hour: its
        // usage and demand rows; days 0 and 1.
        assert!(ok.hour_rows_checked >= 2, "{ok:?}");
        assert!(ok.day_rows_checked >= 4, "{ok:?}");
        assert_eq!(ok.tenants_checked, 2, "{ok:?}");
        assert!(
            ok.not_checked
                .iter()
                .any(|n| n.contains("hourly rollups before")),
            "{ok:?}"
        );

        raw(
            &path,
            &format!(
                "UPDATE usage_rollup SET energy_mj = energy_mj + 1 WHERE period = 3600 AND start = {} AND tenant = 'b'",
                T0 + DAY
            ),
        );
        raw(
            &path,
            &format!(
                "UPDATE demand_rollup SET over_contract_ns = 7 WHERE period = 86400 AND start = {T0} AND tenant = 'a'"
            ),
        );
        raw(
            &path,
            "UPDATE tenant_total SET node_energy_mj = node_energy_mj - 1 WHERE tenant = 'a'",
        );
        raw(
            &path,
            &format!(
                "UPDATE gpu_hour SET energy_mj = energy_mj - 2 WHERE hour_start = {} AND tenant = 'b'",
                T0 + DAY
            ),
        );
        let bad = verify(&path, Some(&contracts())).unwrap();
        let found: Vec<_> = bad
            .differences
            .iter()
            .map(|d| {
                (
                    d.table,
                    d.period,
                    d.start,
                    d.tenant.as_str(),
                    d.node.as_deref(),
                    d.column,
                )
            })
            .collect();
        assert_eq!(
            found,
            vec![
                // The hour, and the day made of it.
                (
                    "usage_rollup",
                    Some(HOUR),
                    Some(T0 + DAY),
                    "b",
                    Some("n3"),
                    "energy_mj"
                ),
                // The GPU's hour against the minutes of its node.
                (
                    "gpu_hour",
                    Some(HOUR),
                    Some(T0 + DAY),
                    "b",
                    Some("n3"),
                    "energy_mj"
                ),
                (
                    "usage_rollup",
                    Some(DAY),
                    Some(T0 + DAY),
                    "b",
                    Some("n3"),
                    "energy_mj"
                ),
                (
                    "demand_rollup",
                    Some(DAY),
                    Some(T0),
                    "a",
                    None,
                    "over_contract_ns"
                ),
                ("tenant_total", None, None, "a", None, "node_energy_mj"),
            ],
            "{bad:?}"
        );
        let hour = &bad.differences[0];
        assert_eq!(
            hour.recorded.unwrap(),
            hour.recomputed.unwrap() + 1,
            "{hour:?}"
        );
    }

    #[test]
    fn a_missing_rollup_and_a_missing_total_are_differences() {
        let dir = tempfile::tempdir().unwrap();
        let path = ledger(dir.path());
        raw(
            &path,
            &format!(
                "DELETE FROM usage_rollup WHERE period = 3600 AND start = {}",
                T0 + DAY
            ),
        );
        raw(&path, "DELETE FROM tenant_total WHERE tenant = 'b'");
        let bad = verify(&path, Some(&contracts())).unwrap();
        let hour = bad
            .differences
            .iter()
            .find(|d| d.table == "usage_rollup" && d.period == Some(HOUR))
            .unwrap();
        assert_eq!((hour.recorded, hour.recomputed.is_some()), (None, true));
        let total = bad
            .differences
            .iter()
            .find(|d| d.table == "tenant_total" && d.column == "energy_mj")
            .unwrap();
        assert_eq!((total.tenant.as_str(), total.recorded), ("b", None));
        assert_eq!(total.recomputed, Some(60 * 7_000));
    }
}
