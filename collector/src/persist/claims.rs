//! Claiming a node when its agent says Hello: the handle the ingest path
//! claims through ([`NodeClaims`]), so that it knows no ledger
//! implementation; [`HolderClaims`], claims and their adoption under the
//! writer the committer, compactor and reloader share; and [`ClaimQueue`],
//! the thread that makes every claim queued meanwhile in one transaction.
//!
//! One thread, one transaction per round: 25,000 agents reconnecting at
//! once (a collector restarted, or another one gone) cost a few hundred
//! `claim_nodes` transactions rather than 25,000, and no blocking thread
//! per Hello. A round waits behind at most one commit or compaction (the
//! writer's lock); a Hello waits for its round at most `hello_timeout`
//! (`ingest`), and a claim whose Hello has given up is not made.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::error;

use crate::ledger::{Claim, LedgerError, LedgerWriter};
use crate::state::State;
use crate::sync::lock;

/// Most nodes claimed in one transaction: bounds how long a round holds
/// the writer from the committer.
pub const MAX_CLAIMS_PER_ROUND: usize = 2_000;

/// Why a claim failed: the ledger's error (one for every claim of its
/// round), or the claim thread's end.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ClaimFailed(pub String);

/// The answer to one claim: the claim's generation, once the fleet has
/// adopted it.
pub type ClaimAnswer = oneshot::Receiver<Result<u64, ClaimFailed>>;

/// Claims nodes for this collector's holder.
pub trait NodeClaims: Send + Sync {
    /// Queues a claim of `node`. Before the answer comes, the claim is
    /// made and adopted by the state (`State::adopt_claim`) before any
    /// commit can be written after it, so that what adopting drops from
    /// the pending commit is never written under the new claim.
    fn claim(&self, node: &str) -> ClaimAnswer;
}

/// Claims through a shared [`LedgerWriter`], as `holder`: the claims and
/// their adoption run under the writer's lock, which every commit takes
/// too.
pub struct HolderClaims<W> {
    pub writer: Arc<Mutex<W>>,
    pub holder: Arc<str>,
}

impl<W: LedgerWriter> HolderClaims<W> {
    /// Claims `nodes` in one transaction and calls `adopt` with each
    /// node's claim under the writer's lock. Returns the generations in
    /// the order asked. Blocks.
    pub fn claim_nodes(
        &self,
        nodes: &[&str],
        adopt: &mut dyn FnMut(&str, &Claim),
    ) -> Result<Vec<u64>, LedgerError> {
        self.claim_nodes_or(nodes, adopt, &mut |_| {})
    }

    /// `claim_nodes`, calling `abandon` with each node, under the writer's
    /// lock, where the claim failed: whether it was made is then unknown
    /// (its answer can be lost after the database wrote it), so what the
    /// node has pending here must not be written under it.
    pub fn claim_nodes_or(
        &self,
        nodes: &[&str],
        adopt: &mut dyn FnMut(&str, &Claim),
        abandon: &mut dyn FnMut(&str),
    ) -> Result<Vec<u64>, LedgerError> {
        let mut w = lock(&self.writer);
        let claims = match w.claim_nodes(&self.holder, nodes) {
            Ok(c) => c,
            Err(e) => {
                for node in nodes {
                    abandon(node);
                }
                return Err(e);
            }
        };
        for (node, claim) in nodes.iter().zip(&claims) {
            adopt(node, claim);
        }
        Ok(claims.iter().map(|c| c.generation).collect())
    }

    /// `claim_nodes` for one node.
    pub fn claim_node(
        &self,
        node: &str,
        adopt: &mut dyn FnMut(&Claim),
    ) -> Result<u64, LedgerError> {
        let generations = self.claim_nodes(&[node], &mut |_, c| adopt(c))?;
        Ok(generations[0])
    }
}

/// One claim waiting for its round.
type Request = (String, oneshot::Sender<Result<u64, ClaimFailed>>);

/// [`NodeClaims`] through a thread of its own that takes every claim
/// queued (up to [`MAX_CLAIMS_PER_ROUND`]) and makes them in one
/// transaction. Ends when the queue is dropped.
pub struct ClaimQueue {
    tx: mpsc::Sender<Request>,
}

impl ClaimQueue {
    /// Starts the claim thread, adopting each claim into `state`.
    pub fn start<W: LedgerWriter + 'static>(
        claims: HolderClaims<W>,
        state: Arc<State>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Request>();
        let span = tracing::info_span!("task", task = "claims");
        std::thread::Builder::new()
            .name("claims".into())
            .spawn(move || {
                let _task = span.entered();
                while let Ok(first) = rx.recv() {
                    let mut round = vec![first];
                    while round.len() < MAX_CLAIMS_PER_ROUND {
                        match rx.try_recv() {
                            Ok(r) => round.push(r),
                            Err(_) => break,
                        }
                    }
                    claim_round(&claims, &state, round);
                }
            })?;
        Ok(Self { tx })
    }
}

/// Makes one round's claims in one transaction and answers each.
fn claim_round<W: LedgerWriter>(claims: &HolderClaims<W>, state: &State, mut round: Vec<Request>) {
    // A Hello that gave up (its timeout passed) needs no claim.
    round.retain(|(_, answer)| !answer.is_closed());
    if round.is_empty() {
        return;
    }
    let mut names: Vec<String> = round.iter().map(|(n, _)| n.clone()).collect();
    names.sort_unstable();
    names.dedup();
    let nodes: Vec<&str> = names.iter().map(String::as_str).collect();
    let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        claims.claim_nodes_or(
            &nodes,
            &mut |node, claim| {
                state.adopt_claim(node, claim);
            },
            // A claim that failed may still have been made (holder this
            // collector, generation bumped): bookings this collector holds
            // from an earlier claim of the node would then pass the fence.
            &mut |node| state.abandon_claim(node),
        )
    }));
    let result = match made {
        Ok(Ok(generations)) => Ok(generations),
        Ok(Err(e)) => Err(ClaimFailed(e.to_string())),
        Err(_) => {
            error!(
                nodes = nodes.len(),
                "claiming nodes panicked; their Hellos are refused"
            );
            Err(ClaimFailed("claiming the node panicked".into()))
        }
    };
    for (node, answer) in round {
        let _ = answer.send(match &result {
            Ok(g) => names
                .binary_search(&node)
                .ok()
                .and_then(|i| g.get(i).copied())
                .ok_or_else(|| ClaimFailed(format!("the ledger answered no claim for {node:?}"))),
            Err(e) => Err(e.clone()),
        });
    }
}

impl NodeClaims for ClaimQueue {
    fn claim(&self, node: &str) -> ClaimAnswer {
        let (answer, rx) = oneshot::channel();
        // A claim thread that is gone drops the answer: the Hello is
        // refused as unclaimable.
        let _ = self.tx.send((node.to_string(), answer));
        rx
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
