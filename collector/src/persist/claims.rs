//! Claiming a node when its agent says Hello: the handle the ingest path
//! claims through ([`NodeClaims`]), so that it knows no ledger
//! implementation, and [`HolderClaims`], the one over the writer the
//! committer, compactor and reloader share.
//!
//! The claim runs on a blocking thread (`spawn_blocking` at the Hello):
//! it takes the writer's lock, so it waits behind at most one commit or
//! compaction. Hellos are rare; the per-sample path does not change. A
//! request to the committer thread would wait for its next tick (up to a
//! commit interval) unless its loop were made to wake for requests too.

use std::sync::{Arc, Mutex};

use crate::ledger::{Claim, LedgerError, LedgerWriter};
use crate::sync::lock;

/// Claims nodes for this collector's holder.
pub trait NodeClaims: Send + Sync {
    /// Claims `node` and calls `adopt` with the claim before any commit
    /// can be written after it (so that what `adopt` drops from the
    /// pending commit is never written under the new claim). Returns the
    /// claim's generation. Blocks.
    fn claim_node(&self, node: &str, adopt: &mut dyn FnMut(&Claim)) -> Result<u64, LedgerError>;
}

/// [`NodeClaims`] through a shared [`LedgerWriter`], as `holder`: the
/// claim and `adopt` run under the writer's lock, which every commit
/// takes too.
pub struct HolderClaims<W> {
    pub writer: Arc<Mutex<W>>,
    pub holder: Arc<str>,
}

impl<W: LedgerWriter> NodeClaims for HolderClaims<W> {
    fn claim_node(&self, node: &str, adopt: &mut dyn FnMut(&Claim)) -> Result<u64, LedgerError> {
        let mut w = lock(&self.writer);
        let claim = w.claim(&self.holder, node)?;
        adopt(&claim);
        Ok(claim.generation)
    }
}

/// A fencing holder id for this process: `<collector_id>/<16 hex
/// digits>`, the digits read from the system's random source at each
/// start, so that no two processes (not even one restarted) share a
/// holder, and "same holder" means "same process, same claim".
pub fn new_holder(collector_id: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("{collector_id}/{:016x}", u64::from_le_bytes(bytes)))
}

#[cfg(test)]
mod tests;
