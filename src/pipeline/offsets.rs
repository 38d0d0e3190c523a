//! Which offsets may be committed.
//!
//! Per partition we remember the offsets handed to the pipeline that are not yet durably stored
//! (or acknowledged by the DLQ). The committable position is the lowest of those, or one past
//! the last received offset when none is pending: Kafka's commit means "everything below this
//! is done", so a gap left by a slow batch holds the commit back however far later batches got.
//!
//! Each assignment of a partition carries an epoch (given by the poll thread when it is
//! assigned). A completion that carries an old epoch (its partition was revoked and maybe
//! re-assigned meanwhile) is ignored, so a stale batch can never move the new owner's offsets;
//! commits carry the epoch too, and the poll thread drops those of an assignment that ended.
//!
//! The commit rule itself — which events let their offset go — is [`Settlement`].

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

/// How an event left the pipeline, as the commit rule sees it. Only an event durably stored in
/// both stores (or already there), or acknowledged by the DLQ, releases its offset; anything
/// else keeps it pending, which holds back every later offset of its partition until the
/// event is redelivered (after a restart or to the partition's next owner).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// In immudb and PostgreSQL (written now or found there).
    Stored,
    /// Acknowledged by the DLQ (`acks=all`).
    DeadLettered,
    /// Neither: abandoned at shutdown, held behind the tamper latch, or a DLQ write that was
    /// not confirmed.
    Unsettled,
}

impl Settlement {
    /// Whether the event's offset may be committed.
    pub fn releases_offset(self) -> bool {
        matches!(self, Settlement::Stored | Settlement::DeadLettered)
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
    /// One past the highest offset received (`None` until the first record of the assignment).
    next: Option<i64>,
    /// The last position handed out for commit.
    committed: Option<i64>,
}

impl PartitionState {
    fn committable(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next)
    }
}

/// A position to commit, under the assignment it was reached in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Commit {
    pub partition: TopicPartition,
    /// The next offset to consume (Kafka's convention).
    pub offset: i64,
    pub epoch: u64,
}

/// Offsets in flight per partition. Not thread-safe by itself; the pipeline wraps it in a mutex
/// held only for these O(log n) updates.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<TopicPartition, PartitionState>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A partition was assigned under `epoch`: its records are tracked from now on.
    pub fn assign(&mut self, tp: &TopicPartition, epoch: u64) {
        self.partitions.insert(
            tp.clone(),
            PartitionState {
                epoch,
                pending: BTreeSet::new(),
                next: None,
                committed: None,
            },
        );
    }

    /// Records an offset handed to the pipeline and returns its ticket. Offsets of a partition
    /// arrive in order, after its assignment.
    pub fn received(&mut self, tp: &TopicPartition, offset: i64) -> OffsetTicket {
        let state = self
            .partitions
            .entry(tp.clone())
            .or_insert_with(|| PartitionState {
                // A record without an assignment event (not expected): an epoch no commit of
                // a real assignment carries.
                epoch: 0,
                pending: BTreeSet::new(),
                next: None,
                committed: None,
            });
        if state.next.is_none() {
            // Where consumption resumed is already the group's position: nothing to commit.
            state.committed = Some(offset);
        }
        state.pending.insert(offset);
        state.next = Some(state.next.map_or(offset + 1, |next| next.max(offset + 1)));
        OffsetTicket {
            epoch: state.epoch,
            offset,
        }
    }

    /// Applies the commit rule to the events of a finished batch: those that are settled
    /// ([`Settlement::releases_offset`]) are done; the others stay pending. Returns how many
    /// were released.
    pub fn finish(
        &mut self,
        events: impl IntoIterator<Item = (TopicPartition, OffsetTicket, Settlement)>,
    ) -> usize {
        events
            .into_iter()
            .filter(|(_, _, settlement)| settlement.releases_offset())
            .filter(|(tp, ticket, _)| self.completed(tp, *ticket))
            .count()
    }

    /// Marks an offset durably handled. Returns false (and changes nothing) for a stale ticket.
    pub fn completed(&mut self, tp: &TopicPartition, ticket: OffsetTicket) -> bool {
        match self.partitions.get_mut(tp) {
            Some(state) if state.epoch == ticket.epoch => state.pending.remove(&ticket.offset),
            _ => false,
        }
    }

    /// Positions that moved since the last call, each under its assignment's epoch.
    pub fn take_commits(&mut self) -> Vec<Commit> {
        let mut commits = Vec::new();
        for (tp, state) in &mut self.partitions {
            let Some(position) = state.committable() else {
                continue;
            };
            if state.committed.is_none_or(|done| position > done) {
                state.committed = Some(position);
                commits.push(Commit {
                    partition: tp.clone(),
                    offset: position,
                    epoch: state.epoch,
                });
            }
        }
        commits.sort();
        commits
    }

    /// Every tracked partition's committed-so-far position, moved or not (to commit again).
    pub fn current_commits(&self) -> Vec<Commit> {
        let mut commits: Vec<Commit> = self
            .partitions
            .iter()
            .filter_map(|(tp, state)| {
                Some(Commit {
                    partition: tp.clone(),
                    offset: state.committed?,
                    epoch: state.epoch,
                })
            })
            .collect();
        commits.sort();
        commits
    }

    /// The commit position of one partition, if it is tracked and received anything.
    pub fn position(&self, tp: &TopicPartition) -> Option<i64> {
        self.partitions
            .get(tp)
            .and_then(PartitionState::committable)
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

    fn positions(commits: Vec<Commit>) -> Vec<(TopicPartition, i64)> {
        commits
            .into_iter()
            .map(|c| (c.partition, c.offset))
            .collect()
    }

    #[test]
    fn commits_only_the_contiguous_prefix() {
        let mut tracker = OffsetTracker::new();
        tracker.assign(&tp(), 1);
        let tickets: Vec<_> = (10..15).map(|o| tracker.received(&tp(), o)).collect();
        assert!(tracker.take_commits().is_empty(), "nothing done yet");
        // 11 and 12 finish before 10: no progress past 10.
        assert!(tracker.completed(&tp(), tickets[1]));
        assert!(tracker.completed(&tp(), tickets[2]));
        assert!(tracker.take_commits().is_empty());
        assert!(tracker.completed(&tp(), tickets[0]));
        assert_eq!(positions(tracker.take_commits()), vec![(tp(), 13)]);
        assert!(tracker.completed(&tp(), tickets[4]));
        assert!(tracker.take_commits().is_empty(), "13 still pending");
        assert!(tracker.completed(&tp(), tickets[3]));
        assert_eq!(positions(tracker.take_commits()), vec![(tp(), 15)]);
        assert_eq!(tracker.pending_total(), 0);
    }

    #[test]
    fn gaps_in_offsets_do_not_block() {
        // Compacted topics and transaction markers leave holes in the offset sequence.
        let mut tracker = OffsetTracker::new();
        tracker.assign(&tp(), 1);
        let a = tracker.received(&tp(), 3);
        let b = tracker.received(&tp(), 7);
        tracker.completed(&tp(), a);
        tracker.completed(&tp(), b);
        assert_eq!(positions(tracker.take_commits()), vec![(tp(), 8)]);
    }

    #[test]
    fn stale_tickets_after_revoke_are_ignored() {
        let mut tracker = OffsetTracker::new();
        tracker.assign(&tp(), 1);
        let old = tracker.received(&tp(), 5);
        tracker.revoke(&tp());
        tracker.assign(&tp(), 2);
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
        tracker.assign(&tp(), 1);
        tracker.assign(&other, 2);
        let slow = tracker.received(&tp(), 0);
        let fast = tracker.received(&other, 100);
        tracker.completed(&other, fast);
        assert_eq!(
            positions(tracker.take_commits()),
            vec![(other.clone(), 101)]
        );
        tracker.completed(&tp(), slow);
        assert_eq!(positions(tracker.take_commits()), vec![(tp(), 1)]);
    }

    #[test]
    fn only_settled_events_release_their_offsets() {
        let mut tracker = OffsetTracker::new();
        tracker.assign(&tp(), 1);
        let tickets: Vec<_> = (0..4).map(|o| tracker.received(&tp(), o)).collect();
        let released = tracker.finish([
            (tp(), tickets[0], Settlement::Stored),
            (tp(), tickets[1], Settlement::DeadLettered),
            (tp(), tickets[2], Settlement::Unsettled),
            (tp(), tickets[3], Settlement::Stored),
        ]);
        assert_eq!(released, 3);
        assert_eq!(
            positions(tracker.take_commits()),
            vec![(tp(), 2)],
            "the unsettled event holds the partition's commit back"
        );
    }

    #[test]
    fn current_commits_repeat_every_handed_out_position() {
        let mut tracker = OffsetTracker::new();
        tracker.assign(&tp(), 3);
        let ticket = tracker.received(&tp(), 41);
        tracker.completed(&tp(), ticket);
        assert_eq!(positions(tracker.take_commits()), vec![(tp(), 42)]);
        assert!(tracker.take_commits().is_empty());
        assert_eq!(
            positions(tracker.current_commits()),
            vec![(tp(), 42)],
            "an idle partition's position is committed again"
        );
    }

    #[test]
    fn commits_carry_the_epoch_of_their_assignment() {
        let mut tracker = OffsetTracker::new();
        tracker.assign(&tp(), 7);
        let ticket = tracker.received(&tp(), 0);
        tracker.completed(&tp(), ticket);
        let commits = tracker.take_commits();
        assert_eq!(commits[0].epoch, 7);
        assert!(
            tracker.take_commits().is_empty(),
            "a position is handed out once"
        );
    }
}
