//! Node claims (holder and fencing generation per node) and the
//! compaction lease.
//!
//! With SQLite one process holds the file, so every claim it makes holds
//! until it claims otherwise; the rows are kept all the same, so that the
//! rules the interface promises are the ones the tests check.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Ledger, cursor_from_row, i64_of, sqlite_err, u64_of};
use crate::ledger::{Claim, CompactionLease, LedgerError};

/// Each node's (holder, generation), by node.
pub(super) type Claims = HashMap<Arc<str>, (Arc<str>, u64)>;

/// Every node's (holder, generation), as `node_claim` holds them.
pub(super) fn load_claims(conn: &Connection, p: &Path) -> Result<Claims, LedgerError> {
    let err = sqlite_err(p);
    let mut q = conn
        .prepare("SELECT node, holder, generation FROM node_claim")
        .map_err(err)?;
    let rows = q
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(err)?;
    // Holders are few: one string each.
    let mut holders: HashMap<String, Arc<str>> = HashMap::new();
    let mut claims = HashMap::new();
    for row in rows {
        let (node, holder, generation) = row.map_err(err)?;
        let holder = holders
            .entry(holder)
            .or_insert_with_key(|h| Arc::from(h.as_str()))
            .clone();
        claims.insert(
            Arc::from(node),
            (holder, u64_of(generation, p, "generation")?),
        );
    }
    Ok(claims)
}

/// Whether `lease` is still its holder's at `now`: the lease row names
/// the holder and has not expired.
pub(super) fn lease_held(
    conn: &Connection,
    p: &Path,
    lease: &CompactionLease,
    now: i64,
) -> Result<bool, LedgerError> {
    let current: Option<(String, i64)> = conn
        .query_row(
            "SELECT holder, expires_at FROM compaction_lease WHERE only_row = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(sqlite_err(p))?;
    Ok(current.is_some_and(|(holder, until)| holder == lease.holder && now < until))
}

impl Ledger {
    /// Who holds each of `nodes` (`LedgerWriter::holders`), as
    /// `node_claim` says.
    pub fn holders(&self, nodes: &[&str]) -> Result<Vec<Option<String>>, LedgerError> {
        let err = sqlite_err(&self.path);
        let mut read = self
            .conn
            .prepare_cached("SELECT holder FROM node_claim WHERE node = ?1")
            .map_err(err)?;
        nodes
            .iter()
            .map(|node| {
                read.query_row([node], |r| r.get::<_, String>(0))
                    .optional()
                    .map_err(err)
            })
            .collect()
    }

    /// Claims `nodes` for `holder` in one transaction
    /// (`LedgerWriter::claim_nodes`): a node held by another holder, or
    /// by none, passes to `holder` with its generation bumped (1 for a
    /// node never claimed); one `holder` holds keeps its generation.
    pub fn claim_nodes(&mut self, holder: &str, nodes: &[&str]) -> Result<Vec<Claim>, LedgerError> {
        let p = self.path.clone();
        let err = sqlite_err(&p);
        let tx = self.conn.transaction().map_err(err)?;
        let mut claims = Vec::with_capacity(nodes.len());
        let mut changed: Vec<(&str, u64)> = Vec::new();
        {
            let mut read = tx
                .prepare_cached("SELECT holder, generation FROM node_claim WHERE node = ?1")
                .map_err(err)?;
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO node_claim (node, holder, generation) VALUES (?1, ?2, ?3)
                     ON CONFLICT (node) DO UPDATE SET holder = ?2, generation = ?3",
                )
                .map_err(err)?;
            let mut cursor = tx
                .prepare_cached("SELECT epoch, last_seq, gpus FROM node_cursor WHERE node = ?1")
                .map_err(err)?;
            for &node in nodes {
                let stored: Option<(String, i64)> = read
                    .query_row([node], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(err)?;
                let generation = match stored {
                    Some((h, g)) if h == holder => u64_of(g, &p, "generation")?,
                    stored => {
                        let g = match stored {
                            Some((_, g)) => u64_of(g, &p, "generation")?.saturating_add(1),
                            None => 1,
                        };
                        put.execute(params![node, holder, i64_of(g, &p, "generation")?])
                            .map_err(err)?;
                        changed.push((node, g));
                        g
                    }
                };
                let mut rows = cursor.query([node]).map_err(err)?;
                let cursor = match rows.next().map_err(err)? {
                    Some(r) => Some(cursor_from_row(r, 0, &p)?),
                    None => None,
                };
                claims.push(Claim { generation, cursor });
            }
        }
        tx.commit().map_err(err)?;
        let holder: Arc<str> = Arc::from(holder);
        for (node, g) in changed {
            self.claims.insert(Arc::from(node), (holder.clone(), g));
        }
        Ok(claims)
    }

    /// Takes or renews the compaction lease for `holder` at `now` (Unix
    /// seconds) until `now + ttl` (`LedgerWriter::acquire_compaction`).
    pub fn acquire_compaction(
        &mut self,
        holder: &str,
        now: i64,
        ttl: Duration,
    ) -> Result<CompactionLease, LedgerError> {
        let p = self.path.clone();
        let err = sqlite_err(&p);
        let tx = self.conn.transaction().map_err(err)?;
        let current: Option<(String, i64)> = tx
            .query_row(
                "SELECT holder, expires_at FROM compaction_lease WHERE only_row = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        if let Some((h, until)) = current
            && h != holder
            && now < until
        {
            return Err(LedgerError::LeaseHeld { holder: h, until });
        }
        let expires_at = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        tx.execute(
            "INSERT INTO compaction_lease (only_row, holder, expires_at) VALUES (1, ?1, ?2)
             ON CONFLICT (only_row) DO UPDATE SET holder = ?1, expires_at = ?2",
            params![holder, expires_at],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(CompactionLease {
            holder: holder.to_string(),
            expires_at,
        })
    }

    /// Gives the lease up if `lease.holder` still has it.
    pub fn release_compaction(&mut self, lease: &CompactionLease) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "DELETE FROM compaction_lease WHERE holder = ?1",
                [&lease.holder],
            )
            .map(drop)
            .map_err(sqlite_err(&self.path))
    }
}
