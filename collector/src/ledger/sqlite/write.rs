//! The commit: a batch of bookings and node cursors in one transaction.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;
use rusqlite::{ToSql, params, params_from_iter};

use super::schema::StoredGpus;
use super::{
    BUCKET_COLUMNS, LOCAL_HOLDER, Ledger, bucket_from_row, bucket_sums, i64_of, i64s_of,
    sqlite_err, u64_of, watermark,
};
use crate::accounting::{Contract, Metered, over_contract};
use crate::ledger::{
    BucketDelta, Commit, Committed, GPU_COLUMNS, GpuRows, HOUR, LedgerError, MINUTE,
};

impl Ledger {
    /// Writes `c` in one transaction, booked now, leaving the watermark
    /// where it is.
    pub fn commit(&mut self, c: &Commit) -> Result<Committed, LedgerError> {
        self.commit_at(c, crate::sync::now_unix(), i64::MIN)
    }

    /// Where the watermark stands: minute buckets ending at or before this
    /// (Unix seconds) never change.
    pub fn finalized_through(&self) -> Result<i64, LedgerError> {
        watermark(&self.conn, &self.path).map(|(_, w)| w)
    }

    /// Writes `c` in one transaction as the next revision, booked at
    /// `booked_at` (Unix seconds), then moves the watermark forward to
    /// `finalize_through` (never back). Returns the revision and what it
    /// added to the over-contract counters.
    ///
    /// *Invariant:* minute buckets ending at or before the watermark never
    /// change. A delta for such a minute (a late spool, a gap's energy
    /// spread back) is booked as an `adjustment` row of this revision, with
    /// its tenant, node and minute, instead of being added to the minute;
    /// nothing is dropped, and minutes plus adjustments hold every
    /// committed delta.
    ///
    /// *Invariant:* the same transaction adds to each tenant's
    /// over-contract counter what the energy it adds to a minute (row and
    /// adjustments together) changes in that minute's `over_contract`
    /// (against `c.contracts`), so the counter is the sum of its minutes'
    /// evaluations whatever order, batching or lateness the samples came
    /// in, and survives restarts. For a final minute, the change is booked
    /// with the adjustments too, tenant-wide (node `""`), so its row plus
    /// its adjustments say what the minute's whole energy does.
    ///
    /// Commits as `LOCAL_HOLDER` (see `commit_as`).
    pub fn commit_at(
        &mut self,
        c: &Commit,
        booked_at: i64,
        finalize_through: i64,
    ) -> Result<Committed, LedgerError> {
        self.commit_as(LOCAL_HOLDER, c, booked_at, finalize_through)
    }

    /// `commit_at` for `holder` (`LedgerWriter::commit_as`): refused as a
    /// whole, before anything is written, when a node of `c` is held by
    /// another holder; the nodes nobody holds are claimed for `holder` in
    /// the commit's transaction.
    pub fn commit_as(
        &mut self,
        holder: &str,
        c: &Commit,
        booked_at: i64,
        finalize_through: i64,
    ) -> Result<Committed, LedgerError> {
        let mut unclaimed: Vec<&Arc<str>> = Vec::new();
        let mut fenced: Vec<(String, String, u64)> = Vec::new();
        for id in c.nodes.keys() {
            match self.claims.get(id) {
                Some((h, generation)) if **h != *holder => {
                    fenced.push((id.to_string(), h.to_string(), *generation));
                }
                Some(_) => {}
                None => unclaimed.push(id),
            }
        }
        if !fenced.is_empty() {
            fenced.sort();
            let (node, holder, generation) = fenced.remove(0);
            return Err(LedgerError::Fenced {
                node,
                holder,
                generation,
                others: fenced,
            });
        }
        let p = self.path.clone();
        let err = sqlite_err(&p);
        let tx = self.conn.transaction().map_err(err)?;
        if !unclaimed.is_empty() {
            let mut claim = tx
                .prepare_cached(
                    "INSERT INTO node_claim (node, holder, generation) VALUES (?1, ?2, 1)",
                )
                .map_err(err)?;
            for id in &unclaimed {
                claim.execute(params![&***id, holder]).map_err(err)?;
            }
        }
        if let Some(id) = c.id {
            let expected = match self.seen.get(holder) {
                Some(seen) => *seen,
                None => last_commit_id(&tx, holder, &p)?,
            };
            let written = match expected {
                Some(last) if id > last => tx
                    .prepare_cached(
                        "UPDATE holder_commit SET last_id = ?3 WHERE holder = ?1 AND last_id = ?2",
                    )
                    .map_err(err)?
                    .execute(params![
                        holder,
                        i64_of(last, &p, "commit id")?,
                        i64_of(id, &p, "commit id")?
                    ])
                    .map_err(err)?,
                Some(_) => 0,
                None => tx
                    .prepare_cached(
                        "INSERT INTO holder_commit (holder, last_id) VALUES (?1, ?2)
                         ON CONFLICT (holder) DO NOTHING",
                    )
                    .map_err(err)?
                    .execute(params![holder, i64_of(id, &p, "commit id")?])
                    .map_err(err)?,
            };
            if written == 0 {
                let found = last_commit_id(&tx, holder, &p)?;
                return Err(LedgerError::Superseded {
                    holder: holder.to_string(),
                    id,
                    expected,
                    found,
                });
            }
        }
        let (last_revision, finalized) = watermark(&tx, &p)?;
        let revision = last_revision + 1;
        let is_final = |minute: i64| minute.saturating_add(MINUTE) <= finalized;
        let committed = {
            let mut node = tx
                .prepare_cached(
                    "INSERT INTO node_cursor (node, epoch, last_seq, gpus, placing_from, placing_seen)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (node) DO UPDATE SET epoch = ?2, last_seq = ?3, gpus = ?4,
                        placing_from = ?5, placing_seen = ?6",
                )
                .map_err(err)?;
            let mut blob = Vec::new();
            for (id, n) in &c.nodes {
                let stored = StoredGpus::of(n);
                blob.clear();
                stored
                    .encode(&mut blob)
                    .expect("a Vec grows to fit any message");
                let placing = n.placing();
                node.execute(params![
                    &**id,
                    i64_of(n.epoch, &p, "epoch")?,
                    i64_of(n.last_seq, &p, "last_seq")?,
                    &blob,
                    placing.map(|p| p.0),
                    placing.map(|p| p.1)
                ])
                .map_err(err)?;
            }
            let cols = BUCKET_COLUMNS.join(", ");
            let params_list = (4..4 + BUCKET_COLUMNS.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let updates = BUCKET_COLUMNS
                .iter()
                .map(|c| format!("{c} = {c} + excluded.{c}"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut bucket = tx
                .prepare_cached(&format!(
                    "INSERT INTO usage_minute (tenant, node, minute_start, {cols}) VALUES (?1, ?2, ?3, {params_list})
                     ON CONFLICT (tenant, node, minute_start) DO UPDATE SET {updates}"
                ))
                .map_err(err)?;
            let mut pending = tx
                .prepare_cached("INSERT OR IGNORE INTO rollup_pending (hour_start) VALUES (?1)")
                .map_err(err)?;
            let mut adjust = tx
                .prepare_cached(&format!(
                    "INSERT INTO adjustment (revision, booked_at, tenant, node, minute_start, {cols})
                     VALUES (?1, ?2, ?3, ?4, ?5, {})
                     ON CONFLICT (revision, tenant, node, minute_start) DO UPDATE SET {updates}",
                    (6..6 + BUCKET_COLUMNS.len())
                        .map(|i| format!("?{i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .map_err(err)?;
            // Only minutes that change need their hour rolled up again.
            let mut hours: Vec<i64> = c
                .buckets
                .keys()
                .filter(|(_, _, m)| !is_final(*m))
                .map(|(_, _, m)| m.div_euclid(HOUR) * HOUR)
                .collect();
            hours.sort_unstable();
            hours.dedup();
            for h in hours {
                pending.execute([h]).map_err(err)?;
            }
            for ((tenant, node, minute), d) in &c.buckets {
                let v = i64s_of(d.values(), BUCKET_COLUMNS, &p)?;
                let key: [&dyn ToSql; 3] = [tenant as &dyn ToSql, node, minute];
                let values = v.iter().map(|x| x as &dyn ToSql);
                if is_final(*minute) {
                    let rev = i64_of(revision, &p, "revision")?;
                    let head: [&dyn ToSql; 2] = [&rev, &booked_at];
                    adjust
                        .execute(params_from_iter(head.into_iter().chain(key).chain(values)))
                        .map_err(err)?;
                    continue;
                }
                bucket
                    .execute(params_from_iter(key.into_iter().chain(values)))
                    .map_err(err)?;
            }
            // The same deltas per GPU and hour, always added to the row;
            // one booked late (to a minute already final) marks the row
            // with this revision.
            if !c.gpu_hours.is_empty() {
                let gcols = GPU_COLUMNS.join(", ");
                let gupdates = GPU_COLUMNS
                    .iter()
                    .map(|c| format!("{c} = {c} + excluded.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let gparams = (1..=GPU_COLUMNS.len() + 5)
                    .map(|i| format!("?{i}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut gpu = tx
                    .prepare_cached(&format!(
                        "INSERT INTO gpu_hour (tenant, node, gpu, hour_start, {gcols}, revision)
                         VALUES ({gparams})
                         ON CONFLICT (tenant, node, gpu, hour_start) DO UPDATE SET {gupdates},
                            revision = MAX(revision, excluded.revision)"
                    ))
                    .map_err(err)?;
                let rev = i64_of(revision, &p, "revision")?;
                for ((tenant, node, id, hour), g) in &c.gpu_hours {
                    let v = i64s_of(g.values(), GPU_COLUMNS, &p)?;
                    let late = if is_final(g.first_minute) { rev } else { 0 };
                    let key: [&dyn ToSql; 4] = [tenant as &dyn ToSql, node, id, hour];
                    let values = v.iter().map(|x| x as &dyn ToSql);
                    let tail: [&dyn ToSql; 1] = [&late];
                    gpu.execute(params_from_iter(key.into_iter().chain(values).chain(tail)))
                        .map_err(err)?;
                }
            }
            // Whether the per-GPU rows stay complete: a writer that keeps
            // none ends them, through the last minute it booked; one that
            // keeps them, where they ended, has them complete again from
            // the next whole hour after both its commit and that minute.
            match c.gpu_rows {
                GpuRows::Unsaid => {}
                GpuRows::Kept => {
                    tx.prepare_cached(
                        "UPDATE gpu_rows
                         SET since = (MAX(?1, COALESCE(incomplete_through + 60, ?1)) / 3600 + 1) * 3600
                         WHERE since IS NULL",
                    )
                    .map_err(err)?
                    .execute([booked_at])
                    .map_err(err)?;
                }
                GpuRows::NotKept => {
                    // Written only when it changes: once per minute.
                    tx.prepare_cached(
                        "UPDATE gpu_rows SET since = NULL,
                            incomplete_through = MAX(COALESCE(incomplete_through, ?1), ?1)
                         WHERE since IS NOT NULL OR incomplete_through IS NULL
                            OR incomplete_through < ?1",
                    )
                    .map_err(err)?
                    .execute([c.last_minute_booked(booked_at)])
                    .map_err(err)?;
                }
            }
            let mut total = tx
                .prepare_cached(
                    "INSERT INTO tenant_total (tenant, energy_mj) VALUES (?1, ?2)
                     ON CONFLICT (tenant) DO UPDATE SET energy_mj = energy_mj + ?2",
                )
                .map_err(err)?;
            for (tenant, e) in &c.tenant_energy {
                total
                    .execute(params![&**tenant, i64_of(*e, &p, "energy")?])
                    .map_err(err)?;
            }
            // Node energy totals are the sums of the commit's buckets.
            let mut node_total = tx
                .prepare_cached(
                    "INSERT INTO tenant_total (tenant, energy_mj, node_energy_mj) VALUES (?1, 0, ?2)
                     ON CONFLICT (tenant) DO UPDATE SET node_energy_mj = node_energy_mj + ?2",
                )
                .map_err(err)?;
            for (tenant, e) in c.node_energy_by_tenant() {
                node_total
                    .execute(params![&*tenant, i64_of(e, &p, "node energy")?])
                    .map_err(err)?;
            }
            let mut over = tx
                .prepare_cached(
                    "INSERT INTO tenant_total (tenant, energy_mj, over_contract_ns) VALUES (?1, 0, ?2)
                     ON CONFLICT (tenant) DO UPDATE SET over_contract_ns = over_contract_ns + ?2",
                )
                .map_err(err)?;
            // Energy added per (tenant, minute), over all nodes, for the
            // tenants with a contract: (GPU energy added, node energy
            // added, contract), the contract looked up once per (tenant,
            // minute), in the version in force at the minute.
            let mut added: HashMap<(&Arc<str>, i64), (u64, u64, Contract)> = HashMap::new();
            if let Some(contracts) = &c.contracts {
                for ((tenant, _, minute), d) in &c.buckets {
                    if d.energy_mj > 0 || d.node_energy_mj > 0 {
                        let e = added
                            .entry((tenant, *minute))
                            .or_insert_with(|| (0, 0, contracts.contract_at(tenant, *minute)));
                        e.0 = e.0.saturating_add(d.energy_mj);
                        e.1 = e.1.saturating_add(d.node_energy_mj);
                    }
                }
                added.retain(|_, (_, _, contract)| contract.milliwatts > 0);
            }
            // A final minute's energy is its row and its adjustments.
            let mut minute_energy = tx
                .prepare_cached(
                    "SELECT (SELECT COALESCE(SUM(energy_mj), 0) FROM usage_minute
                             WHERE minute_start = ?2 AND tenant = ?1)
                          + (SELECT COALESCE(SUM(energy_mj), 0) FROM adjustment
                             WHERE minute_start = ?2 AND tenant = ?1 AND ?3),
                        (SELECT COALESCE(SUM(node_energy_mj), 0) FROM usage_minute
                             WHERE minute_start = ?2 AND tenant = ?1)
                          + (SELECT COALESCE(SUM(node_energy_mj), 0) FROM adjustment
                             WHERE minute_start = ?2 AND tenant = ?1 AND ?3)",
                )
                .map_err(err)?;
            let mut by_tenant: HashMap<&Arc<str>, u64> = HashMap::new();
            for ((tenant, minute), (gpu_added, node_added, contract)) in added {
                let (gpu_now, node_now): (i64, i64) = minute_energy
                    .query_row(params![&**tenant, minute, is_final(minute)], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .map_err(err)?;
                let gpu_now = u64_of(gpu_now, &p, "minute energy")?;
                let node_now = u64_of(node_now, &p, "minute node energy")?;
                // On the contract's basis, now and before this commit.
                let now = contract.basis_energy(gpu_now, node_now, Metered::NONE);
                let before = contract.basis_energy(
                    gpu_now.saturating_sub(gpu_added),
                    node_now.saturating_sub(node_added),
                    Metered::NONE,
                );
                let (ns_after, mj_after) = over_contract(now, contract.milliwatts);
                let (ns_before, mj_before) = over_contract(before, contract.milliwatts);
                let grew = ns_after.saturating_sub(ns_before);
                if grew > 0 {
                    *by_tenant.entry(tenant).or_default() += grew;
                }
                let overage = mj_after.saturating_sub(mj_before);
                if is_final(minute) && (grew > 0 || overage > 0) {
                    // Tenant-wide: the evaluation's change, no energy.
                    let change = BucketDelta {
                        over_contract_ns: grew,
                        overage_mj: overage,
                        ..BucketDelta::default()
                    };
                    let v = i64s_of(change.values(), BUCKET_COLUMNS, &p)?;
                    let rev = i64_of(revision, &p, "revision")?;
                    let key: [&dyn ToSql; 5] =
                        [&rev, &booked_at, tenant as &dyn ToSql, &"", &minute];
                    adjust
                        .execute(params_from_iter(
                            key.into_iter().chain(v.iter().map(|x| x as &dyn ToSql)),
                        ))
                        .map_err(err)?;
                }
            }
            for (tenant, ns) in &by_tenant {
                over.execute(params![&**tenant, i64_of(*ns, &p, "over-contract time")?])
                    .map_err(err)?;
            }
            tx.prepare_cached(
                "UPDATE watermark SET revision = ?1,
                    finalized_through = MAX(finalized_through, ?2) WHERE id = 1",
            )
            .map_err(err)?
            .execute(params![i64_of(revision, &p, "revision")?, finalize_through])
            .map_err(err)?;
            let mut over_contract_ns: Vec<(Arc<str>, u64)> = by_tenant
                .into_iter()
                .map(|(t, ns)| (t.clone(), ns))
                .collect();
            over_contract_ns.sort();
            Committed {
                revision,
                over_contract_ns,
            }
        };
        tx.commit().map_err(err)?;
        if let Some(id) = c.id {
            self.seen.insert(holder.to_string(), Some(id));
        }
        let holder: Arc<str> = Arc::from(holder);
        for id in unclaimed {
            self.claims.insert(id.clone(), (holder.clone(), 1));
        }
        self.revision = committed.revision;
        self.mark();
        Ok(committed)
    }

    /// `LedgerWriter::commit_written`: reads `holder`'s last commit id.
    pub fn commit_written(&mut self, holder: &str, id: u64) -> Result<bool, LedgerError> {
        let last = last_commit_id(&self.conn, holder, &self.path)?;
        if last == Some(id) {
            self.seen.insert(holder.to_string(), last);
            return Ok(true);
        }
        Ok(false)
    }

    /// Sums of the minute buckets and adjustments of `tenant` over all
    /// nodes and all time: a cross-check of `tenant_total` and of
    /// exactly-once sample counts.
    pub fn bucket_totals(&self, tenant: &str) -> Result<BucketDelta, LedgerError> {
        let p = &self.path;
        let mut sum = BucketDelta::default();
        for table in ["usage_minute", "adjustment"] {
            sum.add(
                &self
                    .conn
                    .query_row(
                        &format!("SELECT {} FROM {table} WHERE tenant = ?1", bucket_sums()),
                        [tenant],
                        |r| bucket_from_row(r, 0, p),
                    )
                    .map_err(sqlite_err(p))??,
            );
        }
        Ok(sum)
    }
}

/// `holder`'s last commit id written, if it wrote one with an id.
fn last_commit_id(
    conn: &rusqlite::Connection,
    holder: &str,
    p: &std::path::Path,
) -> Result<Option<u64>, LedgerError> {
    use rusqlite::OptionalExtension;
    conn.prepare_cached("SELECT last_id FROM holder_commit WHERE holder = ?1")
        .map_err(sqlite_err(p))?
        .query_row([holder], |r| r.get::<_, i64>(0))
        .optional()
        .map_err(sqlite_err(p))?
        .map(|v| u64_of(v, p, "commit id"))
        .transpose()
}
