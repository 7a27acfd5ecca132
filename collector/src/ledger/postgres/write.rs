//! The commit: one transaction, a handful of array statements whatever
//! the number of nodes.
//!
//! *Invariant (fencing):* each node of the commit is checked by a
//! conditional write in the commit's own transaction: its cursor lives in
//! its `node_claim` row, written by `UPDATE node_claim ... WHERE node = n
//! AND holder = $holder`, whose row lock makes a claim by another holder
//! that comes while the commit runs wait for it. A node whose row was not
//! written fails the whole commit (rolled back, nothing of it kept) where
//! another holder holds it; a node nobody holds is claimed by the commit
//! (`INSERT ... ON CONFLICT DO NOTHING`, then checked again). The
//! watermark row is locked first, which serialises commits (their revision
//! numbers are consecutive) and keeps their row locks from deadlocking.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{BUCKET_COLUMNS, Fail, Shared, encode_gpus, i64_of, i64s_of, u64_of};
use crate::accounting::{Contract, Metered, over_contract};
use crate::ledger::{
    BUCKET_FIELDS, Commit, Committed, GPU_COLUMNS, GPU_FIELDS, GpuRows, HOUR, LedgerError, MINUTE,
};
use tokio_postgres::types::ToSql;

/// One bucket: (tenant, node, minute, the bucket values).
type Bucket = (Arc<str>, Arc<str>, i64, [i64; BUCKET_FIELDS]);

/// One per-GPU hour: (tenant, node, GPU, hour, the values in
/// `GPU_COLUMNS` order, the earliest minute booked).
type GpuHourRow = (Arc<str>, Arc<str>, Arc<str>, i64, [i64; GPU_FIELDS], i64);

/// Bucket rows as column arrays: tenants, nodes, minutes, the bucket values.
type BucketColumns<'a> = (
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<i64>,
    [Vec<i64>; BUCKET_FIELDS],
);

/// The parameters `head`, then the three key arrays and the value arrays
/// of `b`.
fn bucket_params<'a>(
    head: &[&'a (dyn ToSql + Sync)],
    b: &'a BucketColumns<'a>,
) -> Vec<&'a (dyn ToSql + Sync)> {
    let mut v: Vec<&'a (dyn ToSql + Sync)> = head.to_vec();
    v.push(&b.0);
    v.push(&b.1);
    v.push(&b.2);
    v.extend(b.3.iter().map(|c| c as &(dyn ToSql + Sync)));
    v
}

/// What the commit writes, as owned column arrays, built before the call.
struct Columns {
    holder: String,
    nodes: Vec<String>,
    epochs: Vec<i64>,
    seqs: Vec<i64>,
    gpus: Vec<Vec<u8>>,
    /// `NodeCursor::placing`, by node: the earliest minute and when the
    /// newest reading was taken (NULL without power readings).
    placing_from: Vec<Option<i64>>,
    placing_seen: Vec<Option<i64>>,
    buckets: Vec<Bucket>,
    tenants: Vec<String>,
    energies: Vec<i64>,
    /// Each tenant's node energy in the commit's buckets, as column arrays.
    node_tenants: Vec<String>,
    node_energies: Vec<i64>,
    /// (tenant, minute, GPU energy added, node energy added, contract),
    /// contracts of more than 0 mW only.
    added: Vec<(String, i64, u64, u64, Contract)>,
    /// Per-GPU hours, sorted by key: (tenant, node, GPU, hour, the
    /// values in `GPU_COLUMNS` order, the earliest minute booked).
    gpu_hours: Vec<GpuHourRow>,
    gpu_rows: GpuRows,
    /// The latest minute the commit books into (`Commit::last_minute_booked`).
    last_minute: i64,
    booked_at: i64,
    finalize_through: i64,
    /// The commit's id, and the holder's last commit id this writer saw
    /// written (`None`: none): the commit moves `holder_commit` from the
    /// one to the other, or is refused.
    id: Option<(i64, Option<i64>)>,
}

/// A commit attempt's fault injection.
#[derive(Default)]
pub(super) struct Attempt {
    /// Tests only: fail as if the answer to COMMIT had been lost.
    pub(super) lose_reply: AtomicBool,
}

/// `unnest` of the bucket columns' `int8[]` parameters starting at `$first`.
fn arrays(first: usize) -> String {
    (first..first + BUCKET_COLUMNS.len())
        .map(|i| format!("${i}::int8[]"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn adds(table: &str) -> String {
    BUCKET_COLUMNS
        .iter()
        .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn commit(
    shared: &Arc<Shared>,
    holder: &str,
    c: &Commit,
    booked_at: i64,
    finalize_through: i64,
    expected: Option<u64>,
    attempt: Arc<Attempt>,
) -> Result<Committed, LedgerError> {
    let mut cols = Columns {
        holder: holder.to_string(),
        nodes: Vec::with_capacity(c.nodes.len()),
        epochs: Vec::with_capacity(c.nodes.len()),
        seqs: Vec::with_capacity(c.nodes.len()),
        gpus: Vec::with_capacity(c.nodes.len()),
        placing_from: Vec::with_capacity(c.nodes.len()),
        placing_seen: Vec::with_capacity(c.nodes.len()),
        buckets: Vec::with_capacity(c.buckets.len()),
        tenants: Vec::new(),
        energies: Vec::new(),
        node_tenants: Vec::new(),
        node_energies: Vec::new(),
        added: Vec::new(),
        gpu_hours: Vec::with_capacity(c.gpu_hours.len()),
        gpu_rows: c.gpu_rows,
        // Only a commit without per-GPU hours needs it.
        last_minute: if c.gpu_rows == GpuRows::NotKept {
            c.last_minute_booked(booked_at)
        } else {
            0
        },
        booked_at,
        finalize_through,
        id: match c.id {
            Some(id) => Some((
                i64_of(shared, id, "commit id")?,
                expected
                    .map(|e| i64_of(shared, e, "commit id"))
                    .transpose()?,
            )),
            None => None,
        },
    };
    let mut nodes: Vec<(&Arc<str>, _)> = c.nodes.iter().collect();
    nodes.sort_by(|a, b| a.0.cmp(b.0));
    for (id, n) in nodes {
        cols.nodes.push(id.to_string());
        cols.epochs.push(i64_of(shared, n.epoch, "epoch")?);
        cols.seqs.push(i64_of(shared, n.last_seq, "last_seq")?);
        cols.gpus.push(encode_gpus(n));
        let placing = n.placing();
        cols.placing_from.push(placing.map(|p| p.0));
        cols.placing_seen.push(placing.map(|p| p.1));
    }
    for ((tenant, node, minute), d) in &c.buckets {
        let v = i64s_of(shared, d.values(), BUCKET_COLUMNS)?;
        cols.buckets
            .push((tenant.clone(), node.clone(), *minute, v));
    }
    for ((tenant, node, gpu, hour), g) in &c.gpu_hours {
        let v = i64s_of(shared, g.values(), GPU_COLUMNS)?;
        cols.gpu_hours.push((
            tenant.clone(),
            node.clone(),
            gpu.clone(),
            *hour,
            v,
            g.first_minute,
        ));
    }
    // In key order: two commits that share a row lock it in one order.
    cols.gpu_hours
        .sort_unstable_by(|a, b| (&a.0, &a.1, &a.2, a.3).cmp(&(&b.0, &b.1, &b.2, b.3)));
    for (t, e) in &c.tenant_energy {
        cols.tenants.push(t.to_string());
        cols.energies.push(i64_of(shared, *e, "energy")?);
    }
    for (t, e) in c.node_energy_by_tenant() {
        cols.node_tenants.push(t.to_string());
        cols.node_energies.push(i64_of(shared, e, "node energy")?);
    }
    if let Some(contracts) = &c.contracts {
        let mut added: HashMap<(&Arc<str>, i64), (u64, u64, Contract)> = HashMap::new();
        for ((tenant, _, minute), d) in &c.buckets {
            if d.energy_mj > 0 || d.node_energy_mj > 0 {
                let e = added
                    .entry((tenant, *minute))
                    .or_insert_with(|| (0, 0, contracts.contract_at(tenant, *minute)));
                e.0 = e.0.saturating_add(d.energy_mj);
                e.1 = e.1.saturating_add(d.node_energy_mj);
            }
        }
        cols.added = added
            .into_iter()
            .filter(|(_, (_, _, contract))| contract.milliwatts > 0)
            .map(|((t, m), (g, n, contract))| (t.to_string(), m, g, n, contract))
            .collect();
    }
    let s = shared.clone();
    shared.call(move |mut client| async move {
        let r = write(&s, &mut client, cols, &attempt).await;
        (client, r)
    })
}

async fn write(
    s: &Shared,
    client: &mut deadpool_postgres::Object,
    c: Columns,
    attempt: &Attempt,
) -> Result<Committed, Fail> {
    let tx = client.transaction().await?;
    // For this transaction only: the parameter arrays (a site's cursors
    // are megabytes) stay in memory instead of spilling to temporary
    // files, and each array is joined to its table row by row through the
    // primary key, in the array's order: the rows are locked in node
    // order, as claims lock them, so a commit and a claim never deadlock.
    tx.batch_execute(
        "SET LOCAL work_mem = '64MB'; SET LOCAL enable_hashjoin = off;
         SET LOCAL enable_mergejoin = off",
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT revision, finalized_through FROM watermark WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?;
    let revision = u64_of(s, row.try_get(0)?, "revision")? + 1;
    let finalized: i64 = row.try_get(1)?;
    let rev = i64_of(s, revision, "revision")?;
    // Under the watermark's lock, which every commit takes first: a stale
    // copy of this holder's last commit, still open on the server, ends
    // before this one reads, and at most one of the two moves the id.
    if let Some((id, expected)) = c.id {
        let moved = match expected {
            Some(last) if id > last => {
                tx.execute(
                    "UPDATE holder_commit SET last_id = $3 WHERE holder = $1 AND last_id = $2",
                    &[&c.holder, &last, &id],
                )
                .await?
            }
            Some(_) => 0,
            None => {
                tx.execute(
                    "INSERT INTO holder_commit (holder, last_id) VALUES ($1, $2)
                     ON CONFLICT (holder) DO NOTHING",
                    &[&c.holder, &id],
                )
                .await?
            }
        };
        if moved == 0 {
            let found = last_commit_id(s, &tx, &c.holder).await?;
            return Err(Fail::Ledger(LedgerError::Superseded {
                holder: c.holder.clone(),
                id: u64_of(s, id, "commit id")?,
                expected: expected.map(|e| u64_of(s, e, "commit id")).transpose()?,
                found,
            }));
        }
    }
    if !c.nodes.is_empty() {
        // The fencing check and the cursors in one statement: each node's
        // row is written only where this holder holds it, under the row
        // lock the UPDATE takes (a claim by another holder that commits
        // first is seen here and leaves its row unwritten; one that comes
        // later waits for this commit).
        let written = tx
            .execute(
                &tx.prepare_cached(
                    "UPDATE node_claim c SET epoch = u.e, last_seq = u.s, gpus = u.g,
                        placing_from = u.pf, placing_seen = u.ps
                     FROM unnest($1::text[], $2::int8[], $3::int8[], $4::bytea[], $6::int8[], $7::int8[])
                        AS u(n, e, s, g, pf, ps)
                     WHERE c.node = u.n AND c.holder = $5",
                )
                .await?,
                &[
                    &c.nodes,
                    &c.epochs,
                    &c.seqs,
                    &c.gpus,
                    &c.holder,
                    &c.placing_from,
                    &c.placing_seen,
                ],
            )
            .await?;
        if written != c.nodes.len() as u64 {
            claim_or_fence(s, &tx, &c).await?;
        }
    }
    let is_final = |minute: i64| minute.saturating_add(MINUTE) <= finalized;
    // Minutes and adjustments, column by column.
    let mut live: BucketColumns = Default::default();
    let mut late: BucketColumns = Default::default();
    let mut hours: Vec<i64> = Vec::new();
    for (tenant, node, minute, v) in &c.buckets {
        let to = if is_final(*minute) {
            &mut late
        } else {
            hours.push(minute.div_euclid(HOUR) * HOUR);
            &mut live
        };
        to.0.push(tenant);
        to.1.push(node);
        to.2.push(*minute);
        for (col, x) in to.3.iter_mut().zip(v) {
            col.push(*x);
        }
    }
    hours.sort_unstable();
    hours.dedup();
    let names = BUCKET_COLUMNS.join(", ");
    if !live.0.is_empty() {
        // Most of a second's minutes are there already (a minute is
        // written every second of it): an UPDATE adds to those, and only
        // the rest, new minutes, go through the upsert.
        let update = tx
            .prepare_cached(&format!(
                "UPDATE usage_minute m SET {}
                 FROM unnest($1::text[], $2::text[], $3::int8[], {})
                    WITH ORDINALITY AS u(tenant, node, minute_start, {names}, i)
                 WHERE m.tenant = u.tenant AND m.node = u.node
                    AND m.minute_start = u.minute_start
                 RETURNING u.i",
                BUCKET_COLUMNS
                    .iter()
                    .map(|c| format!("{c} = m.{c} + u.{c}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                arrays(4),
            ))
            .await?;
        let updated = tx.query(&update, &bucket_params(&[], &live)).await?;
        let mut done = vec![false; live.0.len()];
        for row in &updated {
            let i = usize::try_from(row.try_get::<_, i64>(0)? - 1).map_err(|_| s.range("row"))?;
            *done.get_mut(i).ok_or_else(|| s.range("row"))? = true;
        }
        if updated.len() < live.0.len() {
            let mut new: BucketColumns = Default::default();
            for (i, _) in done.iter().enumerate().filter(|(_, d)| !**d) {
                new.0.push(live.0[i]);
                new.1.push(live.1[i]);
                new.2.push(live.2[i]);
                for (col, from) in new.3.iter_mut().zip(&live.3) {
                    col.push(from[i]);
                }
            }
            let upsert = tx
                .prepare_cached(&format!(
                    "INSERT INTO usage_minute (tenant, node, minute_start, {names})
                     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], {})
                     ON CONFLICT (tenant, node, minute_start) DO UPDATE SET {}",
                    arrays(4),
                    adds("usage_minute")
                ))
                .await?;
            tx.execute(&upsert, &bucket_params(&[], &new)).await?;
        }
        tx.execute(
            "INSERT INTO rollup_pending (hour_start) SELECT unnest($1::int8[])
             ON CONFLICT DO NOTHING",
            &[&hours],
        )
        .await?;
    }
    let adjust = format!(
        "INSERT INTO adjustment (revision, booked_at, tenant, node, minute_start, {names})
         SELECT $1, $2, * FROM unnest($3::text[], $4::text[], $5::int8[], {})
         ON CONFLICT (revision, tenant, node, minute_start) DO UPDATE SET {}",
        arrays(6),
        adds("adjustment")
    );
    if !late.0.is_empty() {
        tx.execute(&adjust, &bucket_params(&[&rev, &c.booked_at], &late))
            .await?;
    }
    if !c.gpu_hours.is_empty() {
        // The same deltas per GPU and hour, added to the row in one
        // statement; one booked late (to a minute already final) marks
        // the row with this revision.
        let n = c.gpu_hours.len();
        let (mut tenants, mut nodes, mut gpus, mut hours, mut lates) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut values: [Vec<i64>; GPU_FIELDS] = Default::default();
        for (tenant, node, gpu, hour, v, first_minute) in &c.gpu_hours {
            tenants.push(&**tenant);
            nodes.push(&**node);
            gpus.push(&**gpu);
            hours.push(*hour);
            lates.push(if is_final(*first_minute) { rev } else { 0 });
            for (col, x) in values.iter_mut().zip(v) {
                col.push(*x);
            }
        }
        let names = GPU_COLUMNS.join(", ");
        let upsert = tx
            .prepare_cached(&format!(
                "INSERT INTO gpu_hour (tenant, node, gpu, hour_start, {names}, revision)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], {},
                    ${}::int8[])
                 ON CONFLICT (tenant, node, gpu, hour_start) DO UPDATE SET {},
                    revision = GREATEST(gpu_hour.revision, excluded.revision)",
                (5..5 + GPU_FIELDS)
                    .map(|i| format!("${i}::int8[]"))
                    .collect::<Vec<_>>()
                    .join(", "),
                5 + GPU_FIELDS,
                GPU_COLUMNS
                    .iter()
                    .map(|c| format!("{c} = gpu_hour.{c} + excluded.{c}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ))
            .await?;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&tenants, &nodes, &gpus, &hours];
        params.extend(values.iter().map(|c| c as &(dyn ToSql + Sync)));
        params.push(&lates);
        tx.execute(&upsert, &params).await?;
    }
    // Whether the per-GPU rows stay complete (as the SQLite ledger).
    match c.gpu_rows {
        GpuRows::Unsaid => {}
        GpuRows::Kept => {
            tx.execute(
                "UPDATE gpu_rows
                 SET since = (GREATEST($1::int8, COALESCE(incomplete_through + 60, $1::int8))
                    / 3600 + 1) * 3600
                 WHERE since IS NULL",
                &[&c.booked_at],
            )
            .await?;
        }
        GpuRows::NotKept => {
            // Written only when it changes (once per minute), so commits
            // of several collectors seldom wait on the row's lock.
            tx.execute(
                "UPDATE gpu_rows SET since = NULL,
                    incomplete_through = GREATEST(COALESCE(incomplete_through, $1::int8), $1::int8)
                 WHERE since IS NOT NULL OR incomplete_through IS NULL
                    OR incomplete_through < $1::int8",
                &[&c.last_minute],
            )
            .await?;
        }
    }
    if !c.tenants.is_empty() {
        tx.execute(
            "INSERT INTO tenant_total (tenant, energy_mj, over_contract_ns)
             SELECT t, e, 0 FROM unnest($1::text[], $2::int8[]) AS x(t, e)
             ON CONFLICT (tenant) DO UPDATE
                SET energy_mj = tenant_total.energy_mj + excluded.energy_mj",
            &[&c.tenants, &c.energies],
        )
        .await?;
    }
    if !c.node_tenants.is_empty() {
        tx.execute(
            "INSERT INTO tenant_total (tenant, energy_mj, over_contract_ns, node_energy_mj)
             SELECT t, 0, 0, e FROM unnest($1::text[], $2::int8[]) AS x(t, e)
             ON CONFLICT (tenant) DO UPDATE
                SET node_energy_mj = tenant_total.node_energy_mj + excluded.node_energy_mj",
            &[&c.node_tenants, &c.node_energies],
        )
        .await?;
    }
    // Each (tenant, minute) the commit added energy to, against its
    // contract: what the minute's whole energy (row, and for a final
    // minute its adjustments) now does, less what it did before.
    let mut by_tenant: HashMap<String, u64> = HashMap::new();
    if !c.added.is_empty() {
        let ts: Vec<&str> = c.added.iter().map(|a| a.0.as_str()).collect();
        let ms: Vec<i64> = c.added.iter().map(|a| a.1).collect();
        let fs: Vec<bool> = ms.iter().map(|m| is_final(*m)).collect();
        let rows = tx
            .query(
                "SELECT k.i::int8,
                    (SELECT COALESCE(SUM(energy_mj), 0) FROM usage_minute
                        WHERE minute_start = k.m AND tenant = k.t)::int8
                  + (CASE WHEN k.f THEN (SELECT COALESCE(SUM(energy_mj), 0) FROM adjustment
                        WHERE minute_start = k.m AND tenant = k.t) ELSE 0 END)::int8,
                    (SELECT COALESCE(SUM(node_energy_mj), 0) FROM usage_minute
                        WHERE minute_start = k.m AND tenant = k.t)::int8
                  + (CASE WHEN k.f THEN (SELECT COALESCE(SUM(node_energy_mj), 0) FROM adjustment
                        WHERE minute_start = k.m AND tenant = k.t) ELSE 0 END)::int8
                 FROM unnest($1::text[], $2::int8[], $3::bool[]) WITH ORDINALITY AS k(t, m, f, i)",
                &[&ts, &ms, &fs],
            )
            .await?;
        let mut tenant_wide: BucketColumns = Default::default();
        for row in rows {
            let i = usize::try_from(row.try_get::<_, i64>(0)? - 1).map_err(|_| s.range("row"))?;
            let (tenant, minute, gpu_added, node_added, contract) = &c.added[i];
            let gpu_now = u64_of(s, row.try_get(1)?, "minute energy")?;
            let node_now = u64_of(s, row.try_get(2)?, "minute node energy")?;
            // On the contract's basis, now and before this commit.
            let now = contract.basis_energy(gpu_now, node_now, Metered::NONE);
            let before = contract.basis_energy(
                gpu_now.saturating_sub(*gpu_added),
                node_now.saturating_sub(*node_added),
                Metered::NONE,
            );
            let (ns_after, mj_after) = over_contract(now, contract.milliwatts);
            let (ns_before, mj_before) = over_contract(before, contract.milliwatts);
            let grew = ns_after.saturating_sub(ns_before);
            if grew > 0 {
                *by_tenant.entry(tenant.clone()).or_default() += grew;
            }
            let overage = mj_after.saturating_sub(mj_before);
            if is_final(*minute) && (grew > 0 || overage > 0) {
                tenant_wide.0.push(tenant);
                tenant_wide.1.push("");
                tenant_wide.2.push(*minute);
                // Tenant-wide: the evaluation's change, no energy.
                let change = crate::ledger::BucketDelta {
                    over_contract_ns: grew,
                    overage_mj: overage,
                    ..crate::ledger::BucketDelta::default()
                };
                let v = i64s_of(s, change.values(), BUCKET_COLUMNS)?;
                for (col, x) in tenant_wide.3.iter_mut().zip(v) {
                    col.push(x);
                }
            }
        }
        if !tenant_wide.0.is_empty() {
            tx.execute(&adjust, &bucket_params(&[&rev, &c.booked_at], &tenant_wide))
                .await?;
        }
    }
    let mut over_contract_ns: Vec<(Arc<str>, u64)> = by_tenant
        .into_iter()
        .map(|(t, ns)| (Arc::from(t), ns))
        .collect();
    over_contract_ns.sort();
    if !over_contract_ns.is_empty() {
        let ts: Vec<&str> = over_contract_ns.iter().map(|(t, _)| &**t).collect();
        let ns: Vec<i64> = over_contract_ns
            .iter()
            .map(|(_, n)| i64_of(s, *n, "over-contract time"))
            .collect::<Result<_, _>>()?;
        tx.execute(
            "INSERT INTO tenant_total (tenant, energy_mj, over_contract_ns)
             SELECT t, 0, n FROM unnest($1::text[], $2::int8[]) AS x(t, n)
             ON CONFLICT (tenant) DO UPDATE
                SET over_contract_ns = tenant_total.over_contract_ns + excluded.over_contract_ns",
            &[&ts, &ns],
        )
        .await?;
    }
    tx.execute(
        "UPDATE watermark SET revision = $1,
            finalized_through = GREATEST(finalized_through, $2) WHERE id = 1",
        &[&rev, &c.finalize_through],
    )
    .await?;
    // A COMMIT waiting for a synchronous standby must not be cancelled by
    // the statement timeout: PostgreSQL would then report it committed
    // (with a warning) although the standby may not have it, and its acks
    // would not survive a failover. The call's deadline still bounds the
    // wait; an answer lost that way is settled by `settled_commit_id`.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    tx.commit().await?;
    if attempt.lose_reply.load(Ordering::SeqCst) {
        return Err(Fail::Ledger(LedgerError::Postgres {
            database: s.database.clone(),
            sqlstate: None,
            message: "the answer to COMMIT was lost (a test's fault)".into(),
        }));
    }
    Ok(Committed {
        revision,
        over_contract_ns,
    })
}

/// The commit's nodes whose row the cursor UPDATE did not write: those
/// nobody holds yet are claimed by the commit (generation 1, with their
/// cursor); one held by another holder fences the whole commit.
async fn claim_or_fence(
    s: &Shared,
    tx: &tokio_postgres::Transaction<'_>,
    c: &Columns,
) -> Result<(), Fail> {
    let rest: HashSet<String> = tx
        .query(
            "SELECT n FROM unnest($1::text[]) AS n
             WHERE NOT EXISTS (SELECT 1 FROM node_claim WHERE node = n AND holder = $2)",
            &[&c.nodes, &c.holder],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let new: Vec<usize> = (0..c.nodes.len())
        .filter(|i| rest.contains(&c.nodes[*i]))
        .collect();
    let nodes: Vec<&String> = new.iter().map(|i| &c.nodes[*i]).collect();
    let epochs: Vec<i64> = new.iter().map(|i| c.epochs[*i]).collect();
    let seqs: Vec<i64> = new.iter().map(|i| c.seqs[*i]).collect();
    let gpus: Vec<&[u8]> = new.iter().map(|i| c.gpus[*i].as_slice()).collect();
    let placing_from: Vec<Option<i64>> = new.iter().map(|i| c.placing_from[*i]).collect();
    let placing_seen: Vec<Option<i64>> = new.iter().map(|i| c.placing_seen[*i]).collect();
    let taken: HashSet<String> = tx
        .query(
            "INSERT INTO node_claim
                (node, holder, generation, epoch, last_seq, gpus, placing_from, placing_seen)
             SELECT n, $5, 1, e, s, g, pf, ps
             FROM unnest($1::text[], $2::int8[], $3::int8[], $4::bytea[], $6::int8[], $7::int8[])
                AS u(n, e, s, g, pf, ps)
             ON CONFLICT (node) DO NOTHING RETURNING node",
            &[
                &nodes,
                &epochs,
                &seqs,
                &gpus,
                &c.holder,
                &placing_from,
                &placing_seen,
            ],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let held: Vec<&String> = nodes.into_iter().filter(|n| !taken.contains(*n)).collect();
    if held.is_empty() {
        return Ok(());
    }
    // Every node another holder took, in one refusal, so that the
    // committer drops them all at once.
    let mut fenced: Vec<(String, String, u64)> = Vec::with_capacity(held.len());
    for row in tx
        .query(
            "SELECT node, holder, generation FROM node_claim WHERE node = ANY($1)",
            &[&held],
        )
        .await?
    {
        fenced.push((
            row.try_get(0)?,
            row.try_get(1)?,
            u64_of(s, row.try_get(2)?, "generation")?,
        ));
    }
    fenced.sort();
    if fenced.is_empty() {
        return Err(Fail::Ledger(LedgerError::Postgres {
            database: s.database.clone(),
            sqlstate: None,
            message: "a node of the commit was neither written nor claimed, and no holder of it was found".into(),
        }));
    }
    let (node, holder, generation) = fenced.remove(0);
    Err(Fail::Ledger(LedgerError::Fenced {
        node,
        holder,
        generation,
        others: fenced,
    }))
}

/// `holder`'s last commit id written, if it wrote one with an id.
async fn last_commit_id(
    s: &Shared,
    client: &tokio_postgres::Transaction<'_>,
    holder: &str,
) -> Result<Option<u64>, Fail> {
    let row = client
        .query_opt(
            "SELECT last_id FROM holder_commit WHERE holder = $1",
            &[&holder],
        )
        .await?;
    Ok(match row {
        Some(r) => Some(u64_of(s, r.try_get(0)?, "commit id")?),
        None => None,
    })
}

/// `holder`'s last commit id, read under the watermark's lock, so that no
/// commit is in flight while it is read: a commit whose answer was lost
/// has either been written or never will be.
pub(super) fn settled_commit_id(
    shared: &Arc<Shared>,
    holder: &str,
) -> Result<Option<u64>, LedgerError> {
    let holder = holder.to_string();
    let s = shared.clone();
    shared.call(move |mut client| async move {
        let r = async {
            let tx = client.transaction().await?;
            tx.execute("SELECT 1 FROM watermark WHERE id = 1 FOR UPDATE", &[])
                .await?;
            let last = last_commit_id(&s, &tx, &holder).await?;
            tx.commit().await?;
            Ok(last)
        }
        .await;
        (client, r)
    })
}
