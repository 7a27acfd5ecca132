//! The ledger claims the fleet holds: per node, the fencing generation
//! this collector's claim has, and adopting the ledger's cursor when a
//! claim says another holder wrote the node in between.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::accounting::NodeStretch;
use crate::ledger::Claim;
use crate::sync::lock;

use super::power::PowerSource;
use super::{Fleet, Gpu, Node};

impl Fleet {
    /// Records the generations of claims (`(node, generation)`) for nodes
    /// that have none yet: those restored at start-up, and a node first
    /// heard of once its Hello is admitted.
    pub fn set_generations(&self, claims: &[(&str, u64)]) {
        for (id, generation) in claims {
            let Some(node) = lock(&self.nodes).get(*id).cloned() else {
                continue;
            };
            lock(&node).ledger_generation.get_or_insert(*generation);
        }
    }

    /// The generation of the claim the fleet holds on node `id`, if any.
    pub fn ledger_generation(&self, id: &str) -> Option<u64> {
        let node = lock(&self.nodes).get(id).cloned()?;
        lock(&node).ledger_generation
    }

    /// Takes `claim`, just made for node `id`, before its Hello is
    /// admitted. The same generation the fleet holds changes nothing (a
    /// reconnect to this collector). Otherwise (another holder had the
    /// node in between, or the fleet has no generation for it) the node's
    /// epoch, last seq and every GPU's counter state are replaced by the
    /// claim's cursor, as `restore` does for a snapshot, the streams
    /// admitted under the old claim are told it is lost, and `true` is
    /// returned: the caller drops the node's pending bookings.
    pub fn adopt(&self, id: &str, claim: &Claim) -> bool {
        // As at a restore, a GPU in two nodes' cursors resumes only where
        // it was heard last: one that another node keeps among its departed,
        // heard there later, is not taken from this cursor (its counter
        // state there is newer: resuming it here too would count the
        // energy between the two again); one heard here later leaves the
        // other node. Looked up before this node is locked: one node lock
        // at a time.
        let mut heard_later_elsewhere: Vec<&str> = Vec::new();
        let mut leaves: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        for (uuid, g) in claim.cursor.iter().flat_map(|c| &c.gpus) {
            let owner = lock(&self.departed_at).get(uuid).cloned();
            let Some(owner) = owner.filter(|o| **o != *id) else {
                continue;
            };
            let Some(other) = lock(&self.nodes).get(&owner).cloned() else {
                continue;
            };
            let theirs = lock(&other)
                .departed
                .iter()
                .find(|d| d.uuid == *uuid)
                .map(|d| d.last_timestamp());
            match theirs {
                Some(t) if t >= g.last_timestamp_ns => heard_later_elsewhere.push(uuid),
                Some(_) => leaves.push((owner, uuid.clone())),
                None => {}
            }
        }
        let node = {
            let mut nodes = lock(&self.nodes);
            match (nodes.get(id), &claim.cursor) {
                (Some(n), _) => n.clone(),
                // Nothing known on either side: the Hello adds the node
                // (or refuses it, leaving nothing behind), and its
                // generation is recorded once it is admitted.
                (None, None) => return false,
                (None, Some(_)) => {
                    let id: Arc<str> = Arc::from(id);
                    let n = Arc::new(Mutex::new(Node::new(
                        id.clone(),
                        0,
                        0,
                        Duration::from_secs(1),
                    )));
                    nodes.insert(id, n.clone());
                    n
                }
            }
        };
        let mut n = lock(&node);
        if n.ledger_generation == Some(claim.generation) {
            return false;
        }
        let (epoch, last_seq) = claim
            .cursor
            .as_ref()
            .map_or((0, 0), |c| (c.epoch, c.last_seq));
        n.epoch = epoch;
        n.last_seq = last_seq;
        let departed = std::mem::take(&mut n.departed);
        let old: Vec<Gpu> = n.gpus.drain(..).chain(departed).collect();
        // Resumed GPUs wait among the departed until the Hello, which
        // takes them over by UUID.
        n.departed = claim
            .cursor
            .iter()
            .flat_map(|c| {
                c.gpus
                    .iter()
                    .filter(|(uuid, _)| !heard_later_elsewhere.contains(&&**uuid))
                    .map(move |(uuid, g)| Gpu::resumed(uuid, g, c.last_seq))
            })
            .collect();
        // The claim's power source cursors replace what this collector
        // counted: the ledger's are the ones committed last.
        n.power.clear();
        n.power_departed = claim
            .cursor
            .iter()
            .flat_map(|c| &c.power)
            .map(|(key, c)| PowerSource::resumed(key, c))
            .collect();
        n.stretch = claim
            .cursor
            .as_ref()
            .map_or_else(NodeStretch::default, |c| {
                NodeStretch::from_parts(c.stretch.clone())
            });
        let mut at = lock(&self.departed_at);
        for g in &old {
            if at.get(&g.uuid).is_some_and(|o| **o == *id) {
                at.remove(&g.uuid);
            }
        }
        for g in &n.departed {
            at.insert(g.uuid.clone(), n.id.clone());
        }
        drop(at);
        n.ledger_generation = Some(claim.generation);
        n.claim_lost.store(true, Ordering::Release);
        n.claim_lost = Arc::default();
        self.supersede(&mut n);
        n.summarize();
        drop(n);
        for (owner, uuid) in leaves {
            let Some(other) = lock(&self.nodes).get(&owner).cloned() else {
                continue;
            };
            lock(&other).departed.retain(|g| g.uuid != uuid);
        }
        true
    }

    /// Marks the claim on node `id` lost (a commit of it was fenced): its
    /// streams ack nothing more and end, and the node leaves this
    /// collector's series (it streams to the collector that claimed it);
    /// the next Hello here claims it again.
    pub fn lose_claim(&self, id: &str) {
        self.drop_claim(id, true);
    }

    /// As `lose_claim`, for a claim whose outcome is not known (its round
    /// failed): the streams end and the next Hello claims the node again,
    /// but the node keeps its series here, since no other collector is
    /// known to hold it (an agent that is down must still show down).
    pub fn forget_claim(&self, id: &str) {
        self.drop_claim(id, false);
    }

    fn drop_claim(&self, id: &str, moved_away: bool) {
        let Some(node) = lock(&self.nodes).get(id).cloned() else {
            return;
        };
        let mut n = lock(&node);
        n.ledger_generation = None;
        n.moved_away |= moved_away;
        n.claim_lost.store(true, Ordering::Release);
        self.supersede(&mut n);
    }

    /// Nodes that streamed to this collector and have no stream now, with
    /// their stream generation: those another collector may have claimed
    /// since (see `left_for`). Nodes restored from the ledger that never
    /// said Hello here, and those known to have left, are not listed.
    pub fn ended_streams(&self) -> Vec<(Arc<str>, u64)> {
        let mut ended = Vec::new();
        for node in self.nodes() {
            let n = lock(&node);
            if !n.connected && !n.moved_away && !n.gpus.is_empty() {
                ended.push((n.id.clone(), n.generation));
            }
        }
        ended
    }

    /// Another collector holds node `id`, whose stream here ended at
    /// `generation`: unless a stream took it since, the node leaves this
    /// collector's series (as after a fenced commit) and its next Hello
    /// here claims it again. Returns whether it did.
    pub fn left_for_another(&self, id: &str, generation: u64) -> bool {
        let Some(node) = lock(&self.nodes).get(id).cloned() else {
            return false;
        };
        let mut n = lock(&node);
        if n.connected || n.moved_away || n.generation != generation {
            return false;
        }
        n.ledger_generation = None;
        n.moved_away = true;
        n.claim_lost.store(true, Ordering::Release);
        true
    }

    /// Forgets node `id` as an operator asked (`POST
    /// /v1/nodes/{id}/retire`): it leaves this collector's series, the
    /// status page and its tenant's live figures, as a node that moved to
    /// another collector does, until it says Hello again. Its history
    /// stays in the ledger. Refused for a node this collector does not
    /// know, and for one that is streaming now.
    pub fn retire(&self, id: &str) -> Result<(), RetireError> {
        let Some(node) = lock(&self.nodes).get(id).cloned() else {
            return Err(RetireError::Unknown);
        };
        let mut n = lock(&node);
        if n.connected {
            return Err(RetireError::Streaming);
        }
        n.moved_away = true;
        Ok(())
    }

    /// Takes the node from the streams admitted under the lost claim,
    /// under its lock: a batch of theirs that passed the `claim_lost`
    /// check before the claim was lost is refused as superseded here,
    /// so it books nothing and moves no sequence number.
    fn supersede(&self, n: &mut Node) {
        n.generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        // Its streams' `disconnect` no longer matches the generation: the
        // node leaves the connected count here.
        if n.connected {
            n.connected = false;
            self.connected.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why a node could not be retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetireError {
    #[error("no such node: this collector has never heard of it")]
    Unknown,
    #[error("the node is streaming to this collector now: stop its agent first")]
    Streaming,
}
