//! A subscription kind that serves a scripted list of messages from memory, for unit tests of the
//! engine's loop ([`crate::engine::run`]).
//!
//! It is the smallest [`Source`]: it reads no store and no broker, owns its work always, keeps its
//! own cursor (the store keeps no position for it) and records what the loop settled and what the
//! store refused. Everything else (the batch on the blocking pool, the handlers, the unit of work and
//! its commit, retries, dead letters, backoff, progress and shutdown) is the loop's, the same as for
//! every other kind: a new kind is one file like this one.
//!
//! Invariant: the cursor only passes messages the loop settled, so a message is served until its
//! batch commits it (handled, skipped or dead-lettered).

#![cfg(test)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::{
    engine::{
        batch::{Attempts, Report, Subscription},
        progress::{Progress, State},
        run::{Back, Fetched, Place, Settled, Source, Trouble, Wake, Work},
    },
    message::Kind,
    store::{self, StoredMessage},
    sync::lock,
    unit_of_work::NewMessage,
};

/// What the loop did with a scripted source, for a test to assert on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Log {
    /// The identities of each batch served, in order.
    pub(crate) served: Vec<Vec<String>>,
    /// The identities the loop settled, in order.
    pub(crate) settled: Vec<String>,
    /// The store's refusals of whole batches.
    pub(crate) refused: Vec<String>,
    pub(crate) closed: bool,
}

/// Serves `messages` in batches of the subscription's `messages_per_tick`, until they are all
/// settled or the engine stops.
pub(crate) struct Scripted {
    sub: Arc<Subscription>,
    messages: Vec<StoredMessage>,
    /// The first message not settled yet.
    cursor: usize,
    /// Lent to the batch in flight.
    attempts: Attempts,
    log: Arc<Mutex<Log>>,
}

impl Scripted {
    /// A source of `sub` serving `messages`, and the log of what the loop did with it.
    pub(crate) fn new(
        sub: &Arc<Subscription>,
        messages: Vec<StoredMessage>,
    ) -> (Self, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let source = Self {
            sub: sub.clone(),
            messages,
            cursor: 0,
            attempts: Attempts::default(),
            log: log.clone(),
        };
        (source, log)
    }
}

/// Event `n` of a script (1-based): `message_type` in stream `thing-1` at global position `n`, with
/// data `{"id": id}` and the metadata (checksum included) the host writes.
pub(crate) fn message(n: u64, message_type: &str, id: &str) -> StoredMessage {
    let data = serde_json::json!({ "id": id });
    let new = NewMessage::new(
        Kind::Event,
        "thing-1",
        message_type,
        &data,
        None,
        None,
        None,
    );
    StoredMessage {
        global_position: n,
        position: n - 1,
        stream: new.stream,
        message_type: new.message_type,
        id: new.id,
        time: new.time,
        data: new.data,
        metadata: new.metadata,
        decoded: Default::default(),
    }
}

#[async_trait]
impl Source for Scripted {
    fn report(&self, progress: &Progress, state: State) {
        progress.set(&self.sub.plan.name, state);
    }

    async fn open(&mut self) -> Result<(), Trouble> {
        Ok(())
    }

    /// Until shutdown, or until every message is settled.
    fn reading(&self, shutdown: &CancellationToken) -> bool {
        !shutdown.is_cancelled() && self.cursor < self.messages.len()
    }

    async fn fetch(&mut self, head: u64, _: &CancellationToken) -> Result<Fetched, Trouble> {
        let per_batch = self.sub.settings.messages_per_tick as usize;
        let batch: Vec<StoredMessage> = self.messages[self.cursor..]
            .iter()
            .take(per_batch)
            .cloned()
            .collect();
        // Not reached while `reading` ends the loop once every message is settled.
        if batch.is_empty() {
            return Ok(Fetched::Nothing {
                state: State::Idle { head },
                wake: Wake::Now,
            });
        }
        let identities = batch.iter().map(StoredMessage::identity).collect();
        lock(&self.log).served.push(identities);
        Ok(Fetched::Work(Work {
            read: batch.len(),
            messages: batch,
            attempts: std::mem::take(&mut self.attempts),
            // No position in the store: the cursor is this source's own.
            place: Place::default(),
        }))
    }

    /// Move the cursor past the settled front of the batch; a retried message is served again first.
    async fn committed(&mut self, report: &Report, back: Back) -> Result<Settled, Trouble> {
        self.attempts = back.attempts;
        let settled = back
            .messages
            .iter()
            .take_while(|m| report.settled.contains(&m.identity()))
            .count();
        self.cursor += settled;
        lock(&self.log)
            .settled
            .extend(report.settled.iter().cloned());
        Ok(Settled {
            retry: report.retry,
            // For the log: the global position of the last message settled.
            position: self
                .cursor
                .checked_sub(1)
                .map(|i| self.messages[i].global_position),
            acked: None,
        })
    }

    /// Nothing of the batch committed: it is served again after the loop's backoff.
    async fn failed(&mut self, back: Back, error: store::Error) -> Option<Trouble> {
        self.attempts = back.attempts;
        lock(&self.log).refused.push(error.to_string());
        Some(Trouble::store(error))
    }

    async fn close(&mut self) {
        lock(&self.log).closed = true;
    }
}

#[path = "scripted_tests.rs"]
mod tests;
