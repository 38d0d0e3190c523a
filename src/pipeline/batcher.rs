//! Per-topic batching: a batch is flushed when it is full or when its oldest event has waited
//! for the batch timeout, whichever comes first. Pure bookkeeping; the pipeline owns the clock.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// A closed batch: events of one topic in arrival order (so per-partition offset order).
#[derive(Debug)]
pub struct Batch<T> {
    pub topic: String,
    pub items: Vec<T>,
    /// When it was closed: the time until its first write is queueing.
    pub closed_at: Instant,
}

#[derive(Debug)]
struct OpenBatch<T> {
    items: Vec<T>,
    deadline: Instant,
}

/// Open batches, at most one per topic.
#[derive(Debug)]
pub struct Batcher<T> {
    max_size: usize,
    timeout: Duration,
    open: HashMap<String, OpenBatch<T>>,
}

impl<T> Batcher<T> {
    pub fn new(max_size: usize, timeout: Duration) -> Self {
        assert!(max_size > 0, "batch size is validated at start-up");
        Self {
            max_size,
            timeout,
            open: HashMap::new(),
        }
    }

    /// Adds an item; returns the topic's batch when this item filled it.
    pub fn push(&mut self, topic: &str, item: T, now: Instant) -> Option<Batch<T>> {
        let open = match self.open.get_mut(topic) {
            Some(open) => open,
            None => self
                .open
                .entry(topic.to_owned())
                .or_insert_with(|| OpenBatch {
                    items: Vec::with_capacity(self.max_size),
                    deadline: now + self.timeout,
                }),
        };
        open.items.push(item);
        if open.items.len() >= self.max_size {
            return self.take(topic);
        }
        None
    }

    /// The earliest moment a batch times out, if any batch is open.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open.values().map(|open| open.deadline).min()
    }

    /// Batches whose deadline has passed.
    pub fn take_due(&mut self, now: Instant) -> Vec<Batch<T>> {
        let due: Vec<String> = self
            .open
            .iter()
            .filter(|(_, open)| open.deadline <= now)
            .map(|(topic, _)| topic.clone())
            .collect();
        due.iter().filter_map(|topic| self.take(topic)).collect()
    }

    /// Closes one topic's batch now (revocation, shutdown).
    pub fn take(&mut self, topic: &str) -> Option<Batch<T>> {
        self.open.remove(topic).map(|open| Batch {
            topic: topic.to_owned(),
            items: open.items,
            closed_at: Instant::now(),
        })
    }

    /// Closes every open batch.
    pub fn take_all(&mut self) -> Vec<Batch<T>> {
        let topics: Vec<String> = self.open.keys().cloned().collect();
        topics.iter().filter_map(|topic| self.take(topic)).collect()
    }

    /// Items waiting in open batches.
    pub fn len(&self) -> usize {
        self.open.values().map(|open| open.items.len()).sum()
    }

    /// Whether no batch is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_when_full_and_keeps_order() {
        let now = Instant::now();
        let mut batcher = Batcher::new(3, Duration::from_secs(5));
        assert!(batcher.push("a", 1, now).is_none());
        assert!(batcher.push("b", 10, now).is_none());
        assert!(batcher.push("a", 2, now).is_none());
        let full = batcher
            .push("a", 3, now)
            .expect("third item fills the batch");
        assert_eq!(full.topic, "a");
        assert_eq!(full.items, vec![1, 2, 3]);
        assert_eq!(batcher.len(), 1, "topic b is independent");
    }

    #[test]
    fn flushes_on_age_of_the_oldest_item() {
        let start = Instant::now();
        let mut batcher = Batcher::new(100, Duration::from_secs(5));
        batcher.push("a", 1, start);
        batcher.push("a", 2, start + Duration::from_secs(4));
        batcher.push("b", 3, start + Duration::from_secs(2));
        assert_eq!(
            batcher.next_deadline(),
            Some(start + Duration::from_secs(5))
        );
        assert!(
            batcher
                .take_due(start + Duration::from_millis(4999))
                .is_empty()
        );
        let due = batcher.take_due(start + Duration::from_secs(5));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].items, vec![1, 2]);
        assert_eq!(
            batcher.next_deadline(),
            Some(start + Duration::from_secs(7))
        );
    }

    #[test]
    fn take_all_empties_everything() {
        let now = Instant::now();
        let mut batcher = Batcher::new(10, Duration::from_secs(1));
        batcher.push("a", 1, now);
        batcher.push("b", 2, now);
        assert_eq!(batcher.take_all().len(), 2);
        assert!(batcher.is_empty());
        assert_eq!(batcher.next_deadline(), None);
    }
}
