//! Which offsets may be committed.
//!
//! Per partition we remember the offsets handed to the pipeline that are not yet durably stored
//! (or acknowledged by the DLQ). The committable position is the lowest of those, or one past
//! the last received offset when none is pending: Kafka's commit means "everything below this
//! is done", so a gap left by a slow batch holds the commit back however far later batches got.
//!
//! Each assignment of a partition gets a fresh epoch. A completion that carries an old epoch
//! (its partition was revoked and maybe re-assigned meanwhile) is ignored, so a stale batch can
//! never move the new owner's offsets.

use std::collections::{BTreeSet, HashMap};

/// A topic partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// Identifies one received event for its completion: where it is and under which assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetTicket {
    pub epoch: u64,
    pub offset: i64,
}

#[derive(Debug)]
struct PartitionState {
    epoch: u64,
    pending: BTreeSet<i64>,
    /// One past the highest offset received.
    next: i64,
    /// The last position handed out for commit.
    committed: Option<i64>,
}

impl PartitionState {
    fn committable(&self) -> i64 {
        self.pending.first().copied().unwrap_or(self.next)
    }
}

/// Offsets in flight per partition. Not thread-safe by itself; the pipeline wraps it in a mutex
/// held only for these O(log n) updates.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<TopicPartition, PartitionState>,
    next_epoch: u64,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an offset handed to the pipeline and returns its ticket. Offsets of a partition
    /// arrive in order; the first one after an assignment opens a new epoch.
    pub fn received(&mut self, tp: &TopicPartition, offset: i64) -> OffsetTicket {
        let next_epoch = &mut self.next_epoch;
        let state = self.partitions.entry(tp.clone()).or_insert_with(|| {
            *next_epoch += 1;
            PartitionState {
                epoch: *next_epoch,
                pending: BTreeSet::new(),
                next: offset,
                // Where consumption resumed is already the group's position: nothing to commit.
                committed: Some(offset),
            }
        });
        state.pending.insert(offset);
        state.next = state.next.max(offset + 1);
        OffsetTicket {
            epoch: state.epoch,
            offset,
        }
    }

    /// Marks an offset durably handled. Returns false (and changes nothing) for a stale ticket.
    pub fn completed(&mut self, tp: &TopicPartition, ticket: OffsetTicket) -> bool {
        match self.partitions.get_mut(tp) {
            Some(state) if state.epoch == ticket.epoch => state.pending.remove(&ticket.offset),
            _ => false,
        }
    }

    /// Positions that moved since the last call: `(partition, offset to commit)`, where the
    /// offset is the next one to consume (Kafka's convention).
    pub fn take_commits(&mut self) -> Vec<(TopicPartition, i64)> {
        let mut commits = Vec::new();
        for (tp, state) in &mut self.partitions {
            let position = state.committable();
            if state.committed.is_none_or(|done| position > done) {
                state.committed = Some(position);
                commits.push((tp.clone(), position));
            }
        }
        commits.sort();
        commits
    }

    /// The commit position of one partition, if it is tracked.
    pub fn position(&self, tp: &TopicPartition) -> Option<i64> {
        self.partitions.get(tp).map(PartitionState::committable)
    }

    /// Events received but not yet handled, for one partition.
    pub fn pending_in(&self, tp: &TopicPartition) -> usize {
        self.partitions
            .get(tp)
            .map_or(0, |state| state.pending.len())
    }

    /// Events received but not yet handled, in total.
    pub fn pending_total(&self) -> usize {
        self.partitions
            .values()
            .map(|state| state.pending.len())
            .sum()
    }

    /// Forgets a revoked partition; later completions of its events are stale.
    pub fn revoke(&mut self, tp: &TopicPartition) {
        self.partitions.remove(tp);
    }

    /// Every tracked partition.
    pub fn partitions(&self) -> impl Iterator<Item = &TopicPartition> {
        self.partitions.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> TopicPartition {
        TopicPartition::new("audit.system.v1", 0)
    }

    #[test]
    fn commits_only_the_contiguous_prefix() {
        let mut tracker = OffsetTracker::new();
        let tickets: Vec<_> = (10..15).map(|o| tracker.received(&tp(), o)).collect();
        assert!(tracker.take_commits().is_empty(), "nothing done yet");
        // 11 and 12 finish before 10: no progress past 10.
        assert!(tracker.completed(&tp(), tickets[1]));
        assert!(tracker.completed(&tp(), tickets[2]));
        assert!(tracker.take_commits().is_empty());
        assert!(tracker.completed(&tp(), tickets[0]));
        assert_eq!(tracker.take_commits(), vec![(tp(), 13)]);
        assert!(tracker.completed(&tp(), tickets[4]));
        assert!(tracker.take_commits().is_empty(), "13 still pending");
        assert!(tracker.completed(&tp(), tickets[3]));
        assert_eq!(tracker.take_commits(), vec![(tp(), 15)]);
        assert_eq!(tracker.pending_total(), 0);
    }

    #[test]
    fn gaps_in_offsets_do_not_block() {
        // Compacted topics and transaction markers leave holes in the offset sequence.
        let mut tracker = OffsetTracker::new();
        let a = tracker.received(&tp(), 3);
        let b = tracker.received(&tp(), 7);
        tracker.completed(&tp(), a);
        tracker.completed(&tp(), b);
        assert_eq!(tracker.take_commits(), vec![(tp(), 8)]);
    }

    #[test]
    fn stale_tickets_after_revoke_are_ignored() {
        let mut tracker = OffsetTracker::new();
        let old = tracker.received(&tp(), 5);
        tracker.revoke(&tp());
        let new = tracker.received(&tp(), 5);
        assert_ne!(old.epoch, new.epoch);
        assert!(
            !tracker.completed(&tp(), old),
            "a batch of the revoked assignment must not count"
        );
        assert_eq!(tracker.position(&tp()), Some(5));
        assert!(tracker.completed(&tp(), new));
        assert_eq!(tracker.position(&tp()), Some(6));
    }

    #[test]
    fn partitions_are_independent() {
        let mut tracker = OffsetTracker::new();
        let other = TopicPartition::new("audit.financial.v1", 2);
        let slow = tracker.received(&tp(), 0);
        let fast = tracker.received(&other, 100);
        tracker.completed(&other, fast);
        assert_eq!(tracker.take_commits(), vec![(other.clone(), 101)]);
        tracker.completed(&tp(), slow);
        assert_eq!(tracker.take_commits(), vec![(tp(), 1)]);
    }
}
