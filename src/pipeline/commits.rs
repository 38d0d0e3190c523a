//! The poll thread's side of offset commits: which assignment a partition is in (commits of an
//! ended assignment are dropped, even when the partition came back meanwhile), and async
//! commits that failed, re-sent until a later commit supersedes them (otherwise an idle
//! partition would show its lag for ever).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::offsets::{Commit, TopicPartition};

/// How long a failed commit waits before it is sent again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The epoch of each partition's current assignment. Epochs never repeat in a process.
#[derive(Debug, Default)]
pub struct Assignments {
    epochs: HashMap<TopicPartition, u64>,
    last_epoch: u64,
}

impl Assignments {
    /// Partitions assigned now: each gets a new epoch.
    pub fn assign(&mut self, partitions: &[TopicPartition]) -> Vec<(TopicPartition, u64)> {
        partitions
            .iter()
            .map(|tp| {
                self.last_epoch += 1;
                self.epochs.insert(tp.clone(), self.last_epoch);
                (tp.clone(), self.last_epoch)
            })
            .collect()
    }

    /// Partitions given up: their assignment ends.
    pub fn revoke(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            self.epochs.remove(tp);
        }
    }

    /// The commits that belong to a current assignment, as `(partition, offset)`. A commit of
    /// an assignment that ended must not land after the revocation's final commit and move the
    /// partition back for its next owner (or for this consumer's next assignment of it).
    pub fn current(&self, commits: Vec<Commit>) -> Vec<(TopicPartition, i64)> {
        commits
            .into_iter()
            .filter(|c| self.epochs.get(&c.partition) == Some(&c.epoch))
            .map(|c| (c.partition, c.offset))
            .collect()
    }
}

/// Async commits that failed, waiting to be sent again.
#[derive(Debug, Default)]
pub struct CommitRetries {
    failed: HashMap<TopicPartition, i64>,
    due: Option<Instant>,
}

impl CommitRetries {
    /// Commits just sent supersede the failed ones they reach.
    pub fn sent(&mut self, offsets: &[(TopicPartition, i64)]) {
        for (tp, offset) in offsets {
            if self.failed.get(tp).is_some_and(|failed| failed <= offset) {
                self.failed.remove(tp);
            }
        }
    }

    /// Commits the broker refused or that timed out: sent again after [`RETRY_AFTER`].
    pub fn failed(&mut self, offsets: &[(TopicPartition, i64)], now: Instant) {
        for (tp, offset) in offsets {
            let entry = self.failed.entry(tp.clone()).or_insert(*offset);
            *entry = (*entry).max(*offset);
        }
        if !self.failed.is_empty() && self.due.is_none() {
            self.due = Some(now + RETRY_AFTER);
        }
    }

    /// A revoked partition's failed commit is not ours to retry (its final commit went with
    /// the revocation).
    pub fn revoke(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            self.failed.remove(tp);
        }
    }

    /// The failed commits to send again now, if their time has come.
    pub fn take_due(&mut self, now: Instant) -> Vec<(TopicPartition, i64)> {
        if self.due.is_none_or(|due| now < due) {
            return Vec::new();
        }
        self.due = None;
        let mut due: Vec<_> = self.failed.drain().collect();
        due.sort();
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition::new("audit.system.v1", p)
    }

    #[test]
    fn a_commit_of_an_ended_assignment_is_dropped_even_after_a_reassignment() {
        let mut assignments = Assignments::default();
        let first = assignments.assign(&[tp(0)]);
        let stale = Commit {
            partition: tp(0),
            offset: 10,
            epoch: first[0].1,
        };
        assignments.revoke(&[tp(0)]);
        assert!(assignments.current(vec![stale.clone()]).is_empty());
        // The partition comes back: the old commit is still stale.
        let second = assignments.assign(&[tp(0)]);
        assert_ne!(first[0].1, second[0].1);
        assert!(assignments.current(vec![stale]).is_empty());
        let fresh = Commit {
            partition: tp(0),
            offset: 12,
            epoch: second[0].1,
        };
        assert_eq!(assignments.current(vec![fresh]), vec![(tp(0), 12)]);
    }

    #[test]
    fn a_failed_commit_is_sent_again_unless_a_later_one_went_out() {
        let start = Instant::now();
        let mut retries = CommitRetries::default();
        retries.failed(&[(tp(0), 10), (tp(1), 5)], start);
        assert!(
            retries.take_due(start).is_empty(),
            "not before the retry delay"
        );
        retries.sent(&[(tp(1), 7)]);
        assert_eq!(
            retries.take_due(start + RETRY_AFTER),
            vec![(tp(0), 10)],
            "partition 1 moved past its failed commit"
        );
        assert!(
            retries.take_due(start + RETRY_AFTER * 2).is_empty(),
            "sent once"
        );
    }

    #[test]
    fn a_revoked_partition_is_not_retried() {
        let start = Instant::now();
        let mut retries = CommitRetries::default();
        retries.failed(&[(tp(0), 10)], start);
        retries.revoke(&[tp(0)]);
        assert!(retries.take_due(start + RETRY_AFTER).is_empty());
    }
}
