//! Samples not yet acknowledged by the collector.
//!
//! *Invariant:* a sample leaves the spool only when the collector has acked
//! its sequence number, or when the spool is full and it is the oldest. In
//! the second case it is counted; the energy it carried is not lost, since
//! the next sample's cumulative counter covers it.

use std::collections::VecDeque;

use capwatch_proto::v1::NodeSample;
use prost::Message;

#[derive(Debug)]
pub struct Spool {
    samples: VecDeque<NodeSample>,
    capacity: usize,
    dropped: u64,
}

impl Spool {
    pub fn new(capacity: usize) -> Self {
        Self {
            samples: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
            dropped: 0,
        }
    }

    /// Appends a sample; returns how many old samples were dropped to make
    /// room (0 or 1).
    pub fn push(&mut self, sample: NodeSample) -> u64 {
        let mut dropped = 0;
        while self.samples.len() >= self.capacity {
            self.samples.pop_front();
            dropped += 1;
        }
        self.dropped += dropped;
        self.samples.push_back(sample);
        dropped
    }

    /// Forgets every sample at or below `seq`; returns how many.
    pub fn ack(&mut self, seq: u64) -> usize {
        let before = self.samples.len();
        while self.samples.front().is_some_and(|s| s.seq <= seq) {
            self.samples.pop_front();
        }
        before - self.samples.len()
    }

    /// Up to `max` samples with a sequence number above `after`, oldest
    /// first, and no more than `max_bytes` encoded (but at least one).
    pub fn after(&self, after: u64, max: usize, max_bytes: usize) -> Vec<NodeSample> {
        let start = self.samples.partition_point(|s| s.seq <= after);
        let mut bytes = 0;
        self.samples
            .range(start..)
            .take(max)
            .take_while(|s| {
                bytes += s.encoded_len();
                bytes <= max_bytes || bytes == s.encoded_len()
            })
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Samples dropped for lack of room since start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(seq: u64) -> NodeSample {
        NodeSample {
            seq,
            ..Default::default()
        }
    }

    fn seqs(v: &[NodeSample]) -> Vec<u64> {
        v.iter().map(|s| s.seq).collect()
    }

    #[test]
    fn full_spool_drops_oldest_and_counts() {
        let mut sp = Spool::new(3);
        for q in 1..=5 {
            sp.push(s(q));
        }
        assert_eq!(sp.dropped(), 2);
        assert_eq!(seqs(&sp.after(0, 10, usize::MAX)), vec![3, 4, 5]);
    }

    #[test]
    fn ack_forgets_up_to_and_including() {
        let mut sp = Spool::new(10);
        for q in 1..=5 {
            sp.push(s(q));
        }
        assert_eq!(sp.ack(3), 3);
        assert_eq!(sp.ack(3), 0);
        assert_eq!(seqs(&sp.after(0, 10, usize::MAX)), vec![4, 5]);
        assert_eq!(seqs(&sp.after(4, 10, usize::MAX)), vec![5]);
        assert_eq!(seqs(&sp.after(0, 1, usize::MAX)), vec![4]);
        sp.ack(99);
        assert!(sp.is_empty());
    }

    #[test]
    fn batches_are_capped_by_encoded_size_but_never_empty() {
        let mut sp = Spool::new(10);
        for q in 1..=5 {
            sp.push(s(q));
        }
        let one = s(1).encoded_len();
        assert_eq!(seqs(&sp.after(0, 10, 2 * one)), vec![1, 2]);
        assert_eq!(seqs(&sp.after(0, 10, 1)), vec![1]);
    }
}
