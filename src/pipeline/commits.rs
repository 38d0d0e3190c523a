//! The poll thread's side of offset commits: which assignment a partition is in, so a commit
//! of an assignment that ended is dropped, even when the partition came back meanwhile.

use std::collections::HashMap;

use super::offsets::{Commit, TopicPartition};

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
}
