//! Workers of an ordered event-store subscription: several loops in one process, each handling the keys
//! that fall in its partition, each with its own stored position.
//!
//! Invariants: every key belongs to exactly one worker for a given worker count, so a key's messages
//! are handled by one loop, in store order. A worker's position never passes a message of its keys that
//! was neither handled, dead-lettered nor held behind its parked key in the store (other workers'
//! messages are not its work and never hold it); a parked key's held messages are drained by the worker
//! the key falls to, whatever the worker count was when they were held.
//! A worker without a stored position (first start, or the worker count changed) starts from the
//! subscription's plain position (kept by a single reader; no worker moves it), or from the start: it
//! may re-read messages another worker count handled, and the processed markers (which ordered batches
//! always check, under the subscription's name whatever the worker count) keep them from being handled
//! twice. Nothing is lost: every message past the start is read again.

use super::SubscriptionPlan;
use crate::{
    config::Config,
    engine::{
        batch::Worker,
        progress::{Progress, State},
    },
    ordering::Ordering,
    store::{Result, Store},
    unit_of_work::PositionUpdate,
};

/// How many workers run an event-store subscription: the configured count when it is ordered, else
/// one.
pub(crate) fn count(config: &Config, plan: &SubscriptionPlan) -> u32 {
    match Ordering::of(plan) {
        Some(_) => config.ordering.workers.max(1),
        None => 1,
    }
}

/// The lowest position of the `of` readers of `subscription`: what is surely done, for status.
pub(crate) fn lowest_position(store: &dyn Store, subscription: &str, of: u32) -> Result<u64> {
    let mut lowest = u64::MAX;
    for reader in Reader::all(subscription, of) {
        lowest = lowest.min(reader.stored_position(store)?);
    }
    Ok(lowest)
}

/// Where a worker starts: the furthest of its own stored position and the subscription's plain one,
/// else the start. Each says that every message of the worker's keys up to it was settled (the plain one
/// by a single reader, which settles every key), so the furthest is safe and re-reads the least.
pub(crate) fn start(own: Option<u64>, plain: Option<u64>) -> u64 {
    own.max(plain).unwrap_or(0)
}

/// One reading loop of a subscription: the only one (the plain position, no partition), or a worker.
#[derive(Debug, Clone)]
pub(crate) struct Reader {
    /// The subscription's name.
    pub(crate) subscription: String,
    /// Where its position is stored.
    pub(crate) position: String,
    pub(crate) worker: Option<Worker>,
}

impl Reader {
    /// The readers of `subscription` when `of` workers run it: one with the plain position for one.
    pub(crate) fn all(subscription: &str, of: u32) -> Vec<Self> {
        if of <= 1 {
            return vec![Self {
                subscription: subscription.to_owned(),
                position: subscription.to_owned(),
                worker: None,
            }];
        }
        (0..of)
            .map(|index| Self {
                subscription: subscription.to_owned(),
                position: PositionUpdate::worker_name(subscription, index, of),
                worker: Some(Worker { index, of }),
            })
            .collect()
    }

    /// Where it starts reading (see [`start`] for a worker).
    pub(crate) fn stored_position(&self, store: &dyn Store) -> Result<u64> {
        let own = store.position(&self.position)?;
        match self.worker {
            Some(_) => Ok(start(own, store.position(&self.subscription)?)),
            None => Ok(own.unwrap_or(0)),
        }
    }

    /// Its position's name when it is a worker, for logs.
    pub(crate) fn label(&self) -> Option<&str> {
        self.worker.map(|_| self.position.as_str())
    }

    /// Report its state: a worker's state counts towards its subscription's.
    pub(crate) fn report(&self, progress: &Progress, state: State) {
        match self.worker {
            Some(Worker { index, of }) => progress.set_worker(&self.subscription, index, of, state),
            None => progress.set(&self.subscription, state),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_reader_keeps_the_plain_position_and_workers_have_their_own() {
        let single = Reader::all("s", 1);
        assert_eq!(single.len(), 1);
        assert_eq!((single[0].position.as_str(), single[0].worker), ("s", None));
        let names: Vec<_> = Reader::all("s", 3)
            .into_iter()
            .map(|r| r.position)
            .collect();
        assert_eq!(names, ["s#0/3", "s#1/3", "s#2/3"]);
        // Whose lease covers a worker's position is known, not parsed back from its name: every
        // worker belongs to the subscription (and carries its lease's fence, see `ownership`).
        assert!(Reader::all("a#b", 3)
            .iter()
            .all(|r| r.subscription == "a#b"));
    }

    #[test]
    fn a_worker_without_a_position_starts_from_the_plain_one_or_the_start() {
        assert_eq!(start(Some(7), Some(3)), 7, "the furthest wins");
        assert_eq!(
            start(Some(3), Some(7)),
            7,
            "a single reader settled every key up to 7 since"
        );
        assert_eq!(
            start(None, Some(3)),
            3,
            "a new worker count starts at the plain position"
        );
        assert_eq!(start(None, None), 0);
    }
}
