//! Node claims (holder and fencing generation per node) and the
//! compaction lease, whose expiry is the database's clock (`ledger_now()`)
//! so that collectors whose clocks disagree still exclude each other.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Fail, Shared, cursor_from_row, u64_of};
use crate::ledger::{Claim, CompactionLease, LedgerError};

/// `LedgerWriter::claim_nodes`: one statement takes every node not
/// `holder`'s (bumping its generation; 1 for a new one) and leaves those it
/// holds as they are; a second reads generations and cursors.
pub(super) fn claim_nodes(
    shared: &Arc<Shared>,
    holder: &str,
    nodes: &[&str],
) -> Result<Vec<Claim>, LedgerError> {
    let asked: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    let mut distinct = asked.clone();
    distinct.sort();
    distinct.dedup();
    let holder = holder.to_string();
    let s = shared.clone();
    shared.call(move |mut client| async move {
        let r = async {
            let tx = client.transaction().await?;
            tx.execute(
                "INSERT INTO node_claim (node, holder, generation)
                 SELECT n, $2, 1 FROM unnest($1::text[]) AS n
                 ON CONFLICT (node) DO UPDATE
                    SET holder = excluded.holder, generation = node_claim.generation + 1
                    WHERE node_claim.holder <> excluded.holder",
                &[&distinct, &holder],
            )
            .await?;
            let rows = tx
                .query(
                    "SELECT node, generation, epoch, last_seq, gpus
                     FROM node_claim WHERE node = ANY($1)",
                    &[&distinct],
                )
                .await?;
            tx.commit().await?;
            let mut by_node: HashMap<String, Claim> = HashMap::new();
            for row in rows {
                let generation = u64_of(&s, row.try_get(1)?, "generation")?;
                let cursor = match row.try_get::<_, Option<i64>>(2)? {
                    Some(_) => Some(cursor_from_row(&s, &row, 2)?),
                    None => None,
                };
                by_node.insert(row.try_get(0)?, Claim { generation, cursor });
            }
            asked
                .iter()
                .map(|n| {
                    by_node.get(n).cloned().ok_or_else(|| {
                        Fail::Ledger(LedgerError::Postgres {
                            database: s.database.clone(),
                            sqlstate: None,
                            message: format!("the claim of node {n} was not found after it"),
                        })
                    })
                })
                .collect()
        }
        .await;
        (client, r)
    })
}

/// Who holds each of `nodes` now (`LedgerWriter::holders`), in one
/// statement that locks nothing.
pub(super) fn holders(
    shared: &Arc<Shared>,
    nodes: &[&str],
) -> Result<Vec<Option<String>>, LedgerError> {
    let asked: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    shared.call(move |client| async move {
        let r = async {
            let rows = client
                .query(
                    "SELECT node, holder FROM node_claim WHERE node = ANY($1)",
                    &[&asked],
                )
                .await?;
            let mut by_node: HashMap<String, String> = HashMap::with_capacity(rows.len());
            for row in rows {
                by_node.insert(row.try_get(0)?, row.try_get(1)?);
            }
            Ok(asked.iter().map(|n| by_node.get(n).cloned()).collect())
        }
        .await;
        (client, r)
    })
}

/// Takes or renews the lease for `holder` until the database's clock plus
/// `ttl`, in one statement: refused while another holder's has not expired
/// by that clock.
pub(super) fn acquire_compaction(
    shared: &Arc<Shared>,
    holder: &str,
    ttl: Duration,
) -> Result<CompactionLease, LedgerError> {
    let holder = holder.to_string();
    let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
    shared.call(move |client| async move {
        let r = async {
            let taken = client
                .query_opt(
                    "INSERT INTO compaction_lease (only_row, holder, expires_at)
                     VALUES (1, $1, ledger_now() + $2)
                     ON CONFLICT (only_row) DO UPDATE
                        SET holder = excluded.holder, expires_at = excluded.expires_at
                        WHERE compaction_lease.holder = excluded.holder
                            OR compaction_lease.expires_at <= ledger_now()
                     RETURNING expires_at",
                    &[&holder, &ttl],
                )
                .await?;
            if let Some(row) = taken {
                return Ok(CompactionLease {
                    holder: holder.clone(),
                    expires_at: row.try_get(0)?,
                });
            }
            let row = client
                .query_one(
                    "SELECT holder, expires_at FROM compaction_lease WHERE only_row = 1",
                    &[],
                )
                .await?;
            Err(Fail::Ledger(LedgerError::LeaseHeld {
                holder: row.try_get(0)?,
                until: row.try_get(1)?,
            }))
        }
        .await;
        (client, r)
    })
}

/// Gives the lease up if `lease.holder` still has it.
pub(super) fn release_compaction(
    shared: &Arc<Shared>,
    lease: &CompactionLease,
) -> Result<(), LedgerError> {
    let holder = lease.holder.clone();
    shared.call(move |client| async move {
        let r = async {
            client
                .execute("DELETE FROM compaction_lease WHERE holder = $1", &[&holder])
                .await?;
            Ok(())
        }
        .await;
        (client, r)
    })
}

/// Whether `lease` is still its holder's by the database's clock, locking
/// the lease row for the rest of `tx` (a compaction holds it).
pub(super) async fn lease_held(
    tx: &deadpool_postgres::Transaction<'_>,
    lease: &CompactionLease,
) -> Result<bool, tokio_postgres::Error> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM compaction_lease
             WHERE only_row = 1 AND holder = $1 AND ledger_now() < expires_at FOR UPDATE",
            &[&lease.holder],
        )
        .await?
        .is_some())
}
