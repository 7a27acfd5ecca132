//! A writer for tests that wraps another and fails commits on demand (or
//! writes them and loses the answer), and records the size of every claim
//! transaction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::ledger::{
    Claim, Commit, Committed, Compacted, Compaction, CompactionLease, Identity, LedgerError,
    LedgerTotals, LedgerWriter, Snapshot, TenantVersion,
};
use crate::tenants::TenantHistory;

pub struct Faulty<W> {
    pub inner: W,
    /// While set, every commit fails (and writes nothing).
    pub fail_commits: Arc<AtomicBool>,
    /// While set, every commit is written and then reported failed: the
    /// answer to COMMIT lost with the connection.
    pub lose_answers: Arc<AtomicBool>,
    /// While set, every claim is made and then reported failed: its
    /// answer lost with the connection.
    pub lose_claim_answers: Arc<AtomicBool>,
    /// The number of nodes of each `claim_nodes` call, in order.
    pub claim_rounds: Arc<Mutex<Vec<usize>>>,
}

impl<W> Faulty<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            fail_commits: Arc::default(),
            lose_answers: Arc::default(),
            lose_claim_answers: Arc::default(),
            claim_rounds: Arc::default(),
        }
    }
}

impl<W: LedgerWriter> LedgerWriter for Faulty<W> {
    fn identity(&self) -> &Identity {
        self.inner.identity()
    }

    fn restore(&self) -> Result<Snapshot, LedgerError> {
        self.inner.restore()
    }

    fn tenant_totals(&self) -> Result<LedgerTotals, LedgerError> {
        self.inner.tenant_totals()
    }

    fn claim_nodes(&mut self, holder: &str, nodes: &[&str]) -> Result<Vec<Claim>, LedgerError> {
        crate::sync::lock(&self.claim_rounds).push(nodes.len());
        let claims = self.inner.claim_nodes(holder, nodes)?;
        if self.lose_claim_answers.load(Ordering::Relaxed) {
            return Err(LedgerError::Io {
                path: "ledger".into(),
                error: std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection lost before the answer to the claim (injected)",
                ),
            });
        }
        Ok(claims)
    }

    fn holders(&self, nodes: &[&str]) -> Result<Vec<Option<String>>, LedgerError> {
        self.inner.holders(nodes)
    }

    fn commit_as(
        &mut self,
        holder: &str,
        batch: &Commit,
        booked_at: i64,
        finalize_through: i64,
    ) -> Result<Committed, LedgerError> {
        if self.fail_commits.load(Ordering::Relaxed) {
            return Err(unreachable());
        }
        let done = self
            .inner
            .commit_as(holder, batch, booked_at, finalize_through)?;
        if self.lose_answers.load(Ordering::Relaxed) {
            return Err(LedgerError::Io {
                path: "ledger".into(),
                error: std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection lost before the answer to COMMIT (injected)",
                ),
            });
        }
        Ok(done)
    }

    fn commit_written(&mut self, holder: &str, id: u64) -> Result<bool, LedgerError> {
        if self.fail_commits.load(Ordering::Relaxed) {
            return Err(unreachable());
        }
        self.inner.commit_written(holder, id)
    }

    fn finalized_through(&self) -> Result<i64, LedgerError> {
        self.inner.finalized_through()
    }

    fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError> {
        self.inner.tenant_versions()
    }

    fn add_tenant_version(&mut self, v: &TenantVersion) -> Result<(), LedgerError> {
        self.inner.add_tenant_version(v)
    }

    fn acquire_compaction(
        &mut self,
        holder: &str,
        now: i64,
        ttl: std::time::Duration,
    ) -> Result<CompactionLease, LedgerError> {
        self.inner.acquire_compaction(holder, now, ttl)
    }

    fn compact_under(
        &mut self,
        lease: &CompactionLease,
        now: i64,
        policy: &Compaction,
        contracts: &TenantHistory,
    ) -> Result<Compacted, LedgerError> {
        self.inner.compact_under(lease, now, policy, contracts)
    }

    fn release_compaction(&mut self, lease: &CompactionLease) -> Result<(), LedgerError> {
        self.inner.release_compaction(lease)
    }
    fn meter_state(&self, m: &str) -> Result<Option<crate::ledger::MeterState>, LedgerError> {
        self.inner.meter_state(m)
    }
    fn node_minutes(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<crate::ledger::NodeMinute>, LedgerError> {
        self.inner.node_minutes(from, to)
    }
    fn allocate_meter_again(
        &mut self,
        m: &str,
        from: Option<&crate::ledger::MeterState>,
        to: &crate::ledger::MeterState,
        minutes: &[crate::ledger::MeterMinute],
        again: &[crate::ledger::MeterResplit],
    ) -> Result<bool, LedgerError> {
        self.inner.allocate_meter_again(m, from, to, minutes, again)
    }
}

fn unreachable() -> LedgerError {
    LedgerError::Io {
        path: "ledger".into(),
        error: std::io::Error::other("connection refused (injected)"),
    }
}
