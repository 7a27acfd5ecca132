//! Persisting what billing gathered: node claims at a Hello (`claims`), the thread that writes the pending
//! commit to the ledger and acks the streams after it (`committer`), and
//! the rounds that roll the ledger up and apply retention under a lease
//! (`compactor`). Both drive the [`State`](crate::state::State) façade and
//! reach the ledger only through [`LedgerWriter`](crate::ledger::LedgerWriter).

pub mod claims;
pub mod committer;
pub mod compactor;
#[cfg(test)]
pub(crate) mod faulty;
