//! The outbox: messages committed with a unit of work, waiting to be published to the broker.
//!
//! Invariants: a message is published at least once, after its commit; rows of one target stream are
//! published in the order they were committed, even by several processors (a processor holds a lease
//! on each target it publishes to, and a row waiting for its retry holds back the rows after it).

use std::{collections::HashMap, time::Duration};

use super::{Result, StoredMessage};

/// One row to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// The row's sequence number.
    pub seq: u64,
    /// The broker stream it goes to (the message's category).
    pub target: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The message itself.
    pub message: StoredMessage,
}

/// Counts of outbox rows by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxCounts {
    pub pending: u64,
    pub published: u64,
    pub abandoned: u64,
}

/// The outbox capability of a store.
pub trait Outbox: Send + Sync {
    /// Claim up to `limit` rows for `worker`, in commit order per target stream, leasing their targets
    /// for `lease`.
    fn claim(&self, worker: &str, limit: usize, lease: Duration) -> Result<Vec<OutboxItem>>;

    /// These rows were published.
    fn published(&self, worker: &str, seqs: &[u64]) -> Result<()>;

    /// Publishing `seq` failed: try again at `retry_at` (unix ms), or give up (`None`: abandoned).
    fn failed(&self, worker: &str, seq: u64, error: &str, retry_at: Option<u64>) -> Result<()>;

    /// Give back the leases of `worker` (rows it claimed but did not publish are claimable again).
    fn release(&self, worker: &str) -> Result<()>;

    /// How many rows are in each state.
    fn counts(&self) -> Result<OutboxCounts>;
}

/// A pending row as the claim sees it.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    pub(super) seq: u64,
    pub(super) target: String,
    pub(super) next_attempt_at: u64,
}

/// A target's lease.
#[derive(Debug, Clone)]
pub(super) struct Lease {
    pub(super) worker: String,
    pub(super) until: u64,
}

/// Which candidates `worker` may take at `now` (unix ms): in order, skipping targets leased to another
/// live worker, and stopping a target at its first row that is waiting for a retry.
pub(super) fn choose(
    candidates: &[Candidate],
    leases: &HashMap<String, Lease>,
    worker: &str,
    now: u64,
    limit: usize,
) -> Vec<u64> {
    let mut blocked: Vec<&str> = Vec::new();
    let mut taken = Vec::new();
    for c in candidates {
        if taken.len() == limit {
            break;
        }
        if blocked.contains(&c.target.as_str()) {
            continue;
        }
        let leased_elsewhere = leases
            .get(&c.target)
            .is_some_and(|l| l.worker != worker && l.until > now);
        if leased_elsewhere || c.next_attempt_at > now {
            blocked.push(&c.target);
            continue;
        }
        taken.push(c.seq);
    }
    taken
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(seq: u64, target: &str, next: u64) -> Candidate {
        Candidate {
            seq,
            target: target.into(),
            next_attempt_at: next,
        }
    }

    #[test]
    fn a_waiting_row_holds_back_its_stream_only() {
        let rows = [
            c(1, "a", 0),
            c(2, "b", 50),
            c(3, "a", 0),
            c(4, "b", 0),
            c(5, "c", 0),
        ];
        assert_eq!(choose(&rows, &HashMap::new(), "w", 10, 10), [1, 3, 5]);
        assert_eq!(choose(&rows, &HashMap::new(), "w", 60, 10), [1, 2, 3, 4, 5]);
        assert_eq!(choose(&rows, &HashMap::new(), "w", 60, 2), [1, 2]);
    }

    #[test]
    fn a_stream_leased_to_another_live_worker_is_skipped() {
        let rows = [c(1, "a", 0), c(2, "b", 0)];
        let mut leases = HashMap::new();
        leases.insert(
            "a".to_owned(),
            Lease {
                worker: "other".into(),
                until: 100,
            },
        );
        assert_eq!(choose(&rows, &leases, "w", 50, 10), [2]);
        assert_eq!(
            choose(&rows, &leases, "w", 150, 10),
            [1, 2],
            "an expired lease is free"
        );
        assert_eq!(
            choose(&rows, &leases, "other", 50, 10),
            [1, 2],
            "its own lease"
        );
    }
}
