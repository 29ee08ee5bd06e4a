//! Parking on the event store: after a dead letter, an ordered subscription that parks holds the
//! key's later messages until the dead letter is replayed or purged, while its other keys go on.
//!
//! The held messages stay in the event store. A batch records each one behind its key (the store
//! refuses that for a key that is not parked) in the same commit that moves the position past it, so
//! the position never passes a message for good. `dlq replay` (once handled) or `dlq purge` releases
//! the key in the store; the reader that owns the key sees that within its poll interval (see
//! [`View`]) and then handles the held messages in store order, a batch at a time between its
//! ordinary batches, each settled one leaving the list, and the store unparks the key once nothing is
//! held. A held message that fails for good parks the key again, behind its own dead letter, with the
//! rest still held.
//!
//! Invariants: a key belongs to one reader (one worker, under the subscription's lease), which alone
//! holds, handles and unparks its messages; a message of a parked key after its dead letter is never
//! handled before the key is released; every held message is handled (or skipped by its processed
//! marker) exactly once, in store order, before any later message of its key.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    engine::batch::{Attempts, Subscription},
    ordering::partition_of,
    store::{self, StoredMessage},
    subscription::workers::Reader,
    unit_of_work::UnitOfWork,
};

/// What a batch of a parking event-store subscription does with parked keys.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Parking<'a> {
    /// Reading the categories: the keys parked now (released ones too, until they are unparked),
    /// each with the global position of the dead letter it waits behind.
    Read(&'a HashMap<String, u64>),
    /// Handling the messages held behind this released key.
    Drain(&'a str),
}

impl Parking<'_> {
    /// For a message of `key` at `global_position` read from the categories: Some(true) when it
    /// waits behind its parked key, Some(false) when it came no later than the key's dead letter
    /// (read again: the dead letter itself, or a message settled before the key parked), None when
    /// its key is not parked.
    pub(crate) fn waits(&self, key: &str, global_position: u64) -> Option<bool> {
        match self {
            Parking::Read(parked) => parked.get(key).map(|&dead| global_position > dead),
            Parking::Drain(_) => None,
        }
    }

    /// Whether a key this batch parks holds its later messages of the batch in the store (else they
    /// stay unsettled: a drain keeps them held, a broker holds them itself).
    pub(crate) fn holds_in_store(&self) -> bool {
        matches!(self, Parking::Read(_))
    }
}

/// Record in `unit` that `key` parks behind the dead letter at `global_position`.
pub(crate) fn park(unit: &mut UnitOfWork, key: &str, global_position: u64) {
    unit.parking.park.push((key.to_owned(), global_position));
}

/// Record in `unit` that `message` waits behind its parked `key`.
pub(crate) fn hold(unit: &mut UnitOfWork, key: &str, message: &StoredMessage) {
    unit.parking
        .hold
        .push((key.to_owned(), message.global_position));
}

/// Finish the parking records of a batch of `subscription`: a drain settles the held messages the
/// batch settled and asks the store to unpark the key if nothing is held any more.
pub(crate) fn finish(
    parking: Parking<'_>,
    subscription: &str,
    unit: &mut UnitOfWork,
    messages: &[StoredMessage],
    settled: &[bool],
) {
    unit.parking.subscription = subscription.to_owned();
    let Parking::Drain(key) = parking else {
        return;
    };
    unit.parking.settle = messages
        .iter()
        .zip(settled)
        .filter(|(_, settled)| **settled)
        .map(|(m, _)| (key.to_owned(), m.global_position))
        .collect();
    unit.parking.unpark.push(key.to_owned());
}

/// A reader's view of its subscription's parked keys. It reads them again after its own commits
/// changed them (a key parked, a drain), after a lease takeover, and at the poll interval, when `dlq`
/// in another process may have released one: until it sees that, the key's messages stay held, which
/// is what a parked key's are anyway.
///
/// A reader whose ordering parks always minds parked keys; another one only if a build that parked left
/// keys parked (the policy changed, or the handler lost its ordering), so that their held messages are
/// still handled once released rather than left behind for good.
#[derive(Debug)]
pub(crate) struct View {
    /// Whether to mind parked keys: None until the first read says whether any were left.
    minding: Option<bool>,
    parked: Option<Parked>,
    /// When the keys were read; None when they must be read again.
    read_at: Option<Instant>,
}

impl View {
    pub(crate) fn of(sub: &Subscription) -> Self {
        Self {
            minding: sub
                .ordering
                .as_ref()
                .is_some_and(|o| o.park)
                .then_some(true),
            parked: None,
            read_at: None,
        }
    }

    /// Whether to read the parked keys now (given how often to look for changes by others).
    pub(crate) fn due(&self, every: Duration) -> bool {
        self.minding != Some(false) && self.read_at.is_none_or(|at| at.elapsed() >= every)
    }

    /// What a read of `subscription`'s parked keys found.
    pub(crate) fn update(&mut self, subscription: &str, parked: Parked) {
        if self.minding.is_none() {
            let left = !parked.keys.is_empty();
            if left {
                tracing::warn!(subscription, keys = parked.keys.len(), "this subscription no longer parks, but keys an earlier build parked are still parked: their later messages stay held until their dead letters are replayed or purged, then they are handled");
            }
            self.minding = Some(left);
        }
        self.parked = Some(parked).filter(|_| self.minding == Some(true));
        self.read_at = Some(Instant::now());
    }

    /// The reader's own commit changed the parked keys (or another replica may have): read them again.
    pub(crate) fn changed(&mut self) {
        self.read_at = None;
    }

    /// The parked keys, for a reader that minds them.
    pub(crate) fn parked(&self) -> Option<&Parked> {
        self.parked.as_ref()
    }
}

/// The parked keys of a subscription.
#[derive(Debug, Default)]
pub(crate) struct Parked {
    /// Key -> the global position of the dead letter it waits behind (shared with the batches).
    pub(crate) keys: Arc<HashMap<String, u64>>,
    /// The keys released (their dead letter replayed or purged): their held messages are handled next.
    released: Vec<String>,
}

impl Parked {
    /// Read the parked keys of `subscription`.
    pub(crate) fn load(store: &dyn store::Store, subscription: &str) -> store::Result<Self> {
        let mut keys = HashMap::new();
        let mut released = Vec::new();
        for key in store.parked_keys(subscription)? {
            if key.released {
                released.push(key.key.clone());
            }
            keys.insert(key.key, key.dead_letter);
        }
        Ok(Self {
            keys: Arc::new(keys),
            released,
        })
    }

    /// A released key of `reader`'s whose held messages may be handled now (none waits for a retry).
    /// `now` is the engine's clock, in milliseconds.
    pub(crate) fn drainable(
        &self,
        reader: &Reader,
        attempts: &mut Attempts,
        now: i64,
    ) -> Option<&str> {
        self.released
            .iter()
            .filter(|key| {
                reader
                    .worker
                    .is_none_or(|w| partition_of(key, w.of) == w.index)
            })
            .find(|key| !attempts.waits(key, now))
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::batch::Worker;

    #[test]
    fn a_parked_keys_messages_after_its_dead_letter_wait_and_earlier_ones_were_settled() {
        let parked = HashMap::from([("k".to_owned(), 10)]);
        let read = Parking::Read(&parked);
        assert_eq!(read.waits("k", 11), Some(true));
        assert_eq!(
            read.waits("k", 10),
            Some(false),
            "the dead letter, read again"
        );
        assert_eq!(read.waits("other", 11), None);
        assert_eq!(
            Parking::Drain("k").waits("k", 11),
            None,
            "a drain handles them"
        );
        assert!(read.holds_in_store() && !Parking::Drain("k").holds_in_store());
    }

    #[test]
    fn a_worker_drains_its_own_released_keys_unless_they_wait_for_a_retry() {
        let parked = Parked {
            keys: Arc::new(HashMap::from([("a".to_owned(), 1), ("b".to_owned(), 2)])),
            released: vec!["a".to_owned(), "b".to_owned()],
        };
        let reader = |worker| Reader {
            subscription: "s".into(),
            position: "s".into(),
            worker,
        };
        let mut attempts = Attempts::default();
        let of = 2;
        let owner = |key: &str| {
            Some(Worker {
                index: partition_of(key, of),
                of,
            })
        };
        assert_eq!(
            parked.drainable(&reader(owner("a")), &mut attempts, 0),
            Some("a")
        );
        assert_eq!(
            parked.drainable(&reader(owner("b")), &mut attempts, 0),
            Some("b")
        );
        attempts.wait("a", Duration::from_secs(60), 0);
        let single = parked.drainable(&reader(None), &mut attempts, 1);
        assert_eq!(single, Some("b"), "a waits for its retry");
    }

    #[test]
    fn a_reader_that_does_not_park_minds_keys_only_if_some_were_left_parked() {
        let left = || Parked {
            keys: Arc::new(HashMap::from([("k".to_owned(), 1)])),
            released: Vec::new(),
        };
        let never = Duration::from_secs(3600);
        let mut view = View {
            minding: None,
            parked: None,
            read_at: None,
        };
        assert!(view.due(never));
        view.update("s", left());
        assert!(
            view.parked().is_some() && !view.due(never),
            "read, and minded"
        );
        view.changed();
        assert!(view.due(never), "read again after a change");
        let mut view = View {
            minding: None,
            parked: None,
            read_at: None,
        };
        view.update("s", Parked::default());
        view.changed();
        assert!(
            view.parked().is_none() && !view.due(Duration::ZERO),
            "nothing left: never read again"
        );
    }
}
