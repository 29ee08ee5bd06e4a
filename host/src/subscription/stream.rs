//! A stream subscription: a consumer of its own consumer group on the broker streams of its categories
//! (and the group's replay stream), sharing the work with every other replica.
//!
//! Invariants: an entry is acknowledged only after its unit of work committed, or after it was recorded
//! in the group's dead-letter stream; a redelivered entry whose message already has a processed marker
//! is only acknowledged; a failed entry is retried when its delivery count (kept by the broker, so it
//! survives restarts) allows, else dead-lettered; entries pending on a dead consumer are taken over; a
//! message dead-lettered because its calls never came back keeps its call record, so that another
//! entry of it (an outbox's copy) kills at most one replica before it is dead-lettered again.

use crate::{
    ops::status::Target,
    subscription::standing::{Row, Task},
};
use std::{collections::HashMap, sync::Arc, time::Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{decode, Broker, BrokerConfig, Consumer, Decoded, Entry},
    engine::{
        batch::{Attempts, Origin, Report, Subscription},
        progress::{Progress, State},
        run::{
            blocking, blocking_or_default, Back, Fetched, Place, Settled, Source, Trouble, Wake,
            Work,
        },
        Shared,
    },
    store::StoredMessage,
    subscription::standing,
};

/// A consumer of the subscription's group, run by [`crate::engine::run`].
pub(crate) struct Stream {
    shared: Arc<Shared>,
    broker: Arc<dyn Broker>,
    sub: Arc<Subscription>,
    consumer: Option<Box<dyn Consumer>>,
    config: BrokerConfig,
    last_reclaim: Option<Instant>,
    /// The last batch failed: read one entry at a time until a batch commits.
    retrying: bool,
    /// The next batch, read and decoded while earlier ones were handled. Entries read are pending on
    /// this consumer, so they are handled even when a stop comes after they were read.
    ahead: Vec<Decoded>,
    /// Decoded while the batch in flight runs; the next batch once it committed.
    next: Vec<Decoded>,
    /// The batch after that: read while the batch in flight runs, decoded while the next one does.
    /// Never holds entries when `next` is empty: `meanwhile` decodes it into `next` first.
    raw: Vec<Entry>,
    /// The entries of the batch in flight, by the identity of their message.
    origin: HashMap<String, Vec<Entry>>,
}

impl Stream {
    /// The source of stream subscription `sub`; it connects when the loop opens it.
    pub(crate) fn new(
        shared: Arc<Shared>,
        broker: Arc<dyn Broker>,
        sub: Arc<Subscription>,
    ) -> Result<Self, String> {
        let mut config = shared
            .config
            .broker
            .clone()
            .ok_or("a stream subscription needs a broker")?;
        config.block = read_block(&shared);
        Ok(Self {
            shared,
            broker,
            sub,
            consumer: None,
            config,
            last_reclaim: None,
            retrying: false,
            ahead: Vec::new(),
            next: Vec::new(),
            raw: Vec::new(),
            origin: HashMap::new(),
        })
    }

    fn name(&self) -> &str {
        &self.sub.plan.name
    }

    fn consumer(&mut self) -> Result<&mut Box<dyn Consumer>, Trouble> {
        self.consumer
            .as_mut()
            .ok_or_else(|| Trouble::Fatal("a stream subscription read before it was opened".into()))
    }

    fn count(&self) -> usize {
        if self.retrying {
            1
        } else {
            self.sub.settings.messages_per_tick as usize
        }
    }

    /// Take over the entries pending on idle consumers, when due.
    async fn reclaim(&mut self) -> Result<(), Trouble> {
        if self
            .last_reclaim
            .is_some_and(|at| at.elapsed() < self.config.reclaim_interval)
        {
            return Ok(());
        }
        self.last_reclaim = Some(Instant::now());
        let idle = self.config.claim_idle;
        match self.consumer()?.reclaim(idle).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(subscription = %self.name(), entries = n, "took over entries pending on idle consumers")
            }
            Err(error) => {
                tracing::warn!(subscription = %self.name(), %error, "reclaim failed; will try again")
            }
        }
        Ok(())
    }

    /// Dead-letter the entries that are no message; the messages of the others, in store order.
    async fn sort(&mut self, entries: Vec<Decoded>) -> Result<Vec<StoredMessage>, Trouble> {
        let mut messages = Vec::new();
        self.origin.clear();
        for (entry, message) in entries {
            match message {
                Ok(message) => {
                    self.origin
                        .entry(message.identity())
                        .or_default()
                        .push(entry);
                    messages.push(message);
                }
                Err(reason) => {
                    tracing::warn!(subscription = %self.name(), stream = %entry.stream, entry = %entry.id, error = %reason, "dead-lettered");
                    let build = self.shared.plugin().build_id().to_owned();
                    let consumer = self.consumer()?;
                    let written = consumer.dead_letter(&entry, &reason, entry.deliveries, &build);
                    if let Err(error) = written.await {
                        // Nothing is acknowledged: every entry read comes back.
                        self.given_up().await;
                        return Err(Trouble::broker(error));
                    }
                }
            }
        }
        // Entries of several streams: handle them in store order.
        messages.sort_by_key(|m| m.global_position);
        Ok(messages)
    }

    /// The failed attempts of the batch's messages. Only a redelivered entry can have failed before:
    /// it was in a batch whose consumer died or failed (one failed attempt), or, called alone since,
    /// its calls are recorded (a delivery count would also count the redeliveries of entries behind a
    /// culprit that were never called).
    async fn attempts(&mut self) -> Result<Attempts, Trouble> {
        let redelivered: Vec<String> = self
            .origin
            .iter()
            .filter(|(_, entries)| entries.iter().any(|e| e.deliveries > 1))
            .map(|(identity, _)| identity.clone())
            .collect();
        let mut attempts = Attempts::default();
        if redelivered.is_empty() {
            return Ok(attempts);
        }
        attempts.suspect(redelivered.iter().map(String::as_str));
        let (store, name) = (self.shared.store.clone(), self.name().to_owned());
        let recorded = blocking(move || {
            let ids: Vec<&str> = redelivered.iter().map(String::as_str).collect();
            store.recorded_calls(&name, Some(&ids))
        })
        .await?;
        match recorded {
            Ok(recorded) => {
                attempts.recover(recorded);
                Ok(attempts)
            }
            Err(error) => {
                self.given_up().await;
                Err(Trouble::store(error))
            }
        }
    }

    /// With dead letters written, acknowledge now rather than with the next read: a replica that died
    /// first would leave them to be read, and dead-lettered, again.
    ///
    /// The call records of the messages dead-lettered because their calls never came back are kept,
    /// as their tombstones: an outbox publishes a message again when its replica died before marking
    /// it, and the culprit's call is what kills that replica. That copy is a new entry, called
    /// unchecked at its first delivery; when it kills its replica too, its redelivery finds the
    /// record, at the count that dead-letters it, and is dead-lettered again without a call. So a copy
    /// costs one death, not `max_retries + 1`. Records of messages dead-lettered otherwise end with
    /// their commit, and a later entry of a message handled after all ends its record.
    async fn dead_letters_settled(&mut self, report: &Report) -> Result<(), Trouble> {
        if report.dead_lettered_ids.is_empty() {
            return Ok(());
        }
        if let Err(error) = self.consumer()?.flush().await {
            self.given_up().await;
            return Err(Trouble::broker(format!(
                "{error} (after the dead letters were written; they may be written again)"
            )));
        }
        Ok(())
    }

    /// The batch is given up: its entries stay pending and are read again first, one at a time.
    async fn given_up(&mut self) {
        self.retrying = true;
        self.next.clear();
        self.raw.clear();
        self.origin.clear();
        self.flush().await;
    }

    /// Send acknowledgements still held back. Those that cannot be sent are redelivered later and
    /// recognised by their processed markers.
    async fn flush(&mut self) {
        let name = self.name().to_owned();
        if let Some(consumer) = self.consumer.as_mut() {
            if let Err(error) = consumer.flush().await {
                tracing::warn!(subscription = %name, %error, "cannot send acknowledgements; the entries will be redelivered");
            }
        }
    }
}

#[async_trait]
impl Source for Stream {
    fn report(&self, progress: &Progress, state: State) {
        progress.set(self.name(), state);
    }

    async fn open(&mut self) -> Result<(), Trouble> {
        let name = self.name().to_owned();
        let streams = standing::streams(&name, &self.sub.plan.categories);
        let consumer_name = consumer_name(&name);
        let consumer = self
            .broker
            .consumer(streams.clone(), &name, &consumer_name)
            .await
            .map_err(Trouble::broker)?;
        self.consumer = Some(consumer);
        tracing::info!(subscription = %name, consumer = %consumer_name, ?streams, "stream subscription started");
        Ok(())
    }

    /// What was read ahead is handled even after a stop.
    fn reading(&self, shutdown: &CancellationToken) -> bool {
        !shutdown.is_cancelled() || !self.ahead.is_empty()
    }

    async fn fetch(
        &mut self,
        _head: u64,
        shutdown: &CancellationToken,
    ) -> Result<Fetched, Trouble> {
        self.reclaim().await?;
        let seen = self.shared.progress.published();
        // Entries read ahead are new ones (`>`); a read says whether its entries were.
        let (entries, new) = if self.ahead.is_empty() {
            let (count, block) = (self.count(), self.config.block);
            let (shared, name) = (self.shared.clone(), self.name().to_owned());
            let idle_after = standing::idle_after(&shared, block);
            let idle = || shared.progress.set(&name, State::Idle { head: seen });
            let consumer = self.consumer()?;
            // A stop ends the read, and what Redis gave it is handled here before the loop ends.
            let read = consumer.read(count, block, shutdown);
            let read = standing::read_or_idle(read, idle_after, idle).await;
            (decode(read.map_err(Trouble::broker)?), consumer.read_new())
        } else {
            (std::mem::take(&mut self.ahead), true)
        };
        if entries.is_empty() {
            return Ok(Fetched::Nothing {
                state: State::Idle { head: seen },
                wake: Wake::Now,
            });
        }
        let read = entries.len();
        let messages = self.sort(entries).await?;
        let attempts = self.attempts().await?;
        Ok(Fetched::Work(Work {
            messages,
            attempts,
            // A broker's group keeps where the subscription is; the store keeps no position for it.
            place: Place {
                origin: Origin::Broker,
                first_delivery: new,
                ..Place::default()
            },
            read,
        }))
    }

    /// While this batch runs, decode the next one and, behind a full one, read the one after it, so
    /// that reading, decoding and handling overlap instead of the decoding waiting for the read. A
    /// failed read-ahead is not an error here: its entries, if any, are pending and read again. After
    /// a stop nothing more is read, but what was read is decoded and handled.
    async fn meanwhile(&mut self, shutdown: &CancellationToken) {
        if self.retrying {
            return;
        }
        let (count, stopped) = (self.count(), shutdown.is_cancelled());
        let mut raw = std::mem::take(&mut self.raw);
        let Some(consumer) = self.consumer.as_mut() else {
            return;
        };
        if raw.is_empty() && !stopped {
            // Nothing read ahead yet (the first batch, or the one after a retry): fill the pipeline.
            raw = consumer.read_ahead(count).await.unwrap_or_default();
        }
        // A second batch only behind a full one: with fewer entries waiting, two reads would split
        // them into smaller batches, each a commit of its own.
        let more = !stopped && raw.len() >= count;
        let read = async {
            match more {
                true => consumer.read_ahead(count).await.unwrap_or_default(),
                false => Vec::new(),
            }
        };
        // The decode runs on a blocking thread: on the runtime's thread (one, on two cores) it held
        // up the connection's task, which then wrote the read to Redis and parsed its reply only
        // once the decode was done. Six alternating pairs of `--only redis`: consume 185,000-220,000
        // against 168,000-182,000 messages/s, the loop waiting for its reader 26-38% of its time
        // against 37-45%.
        let decoded = async {
            match raw.is_empty() {
                true => Vec::new(),
                false => blocking_or_default(move || decode(raw)).await,
            }
        };
        let (read, decoded) = tokio::join!(read, decoded);
        (self.next, self.raw) = (decoded, read);
    }

    /// Dead-letter in the group's dead-letter stream, then acknowledge what the batch settled.
    async fn committed(&mut self, report: &Report, _: Back) -> Result<Settled, Trouble> {
        for (dead, identity) in report.dead_letters.iter().zip(&report.dead_lettered_ids) {
            for entry in self.origin.remove(identity).unwrap_or_default() {
                let written = self
                    .consumer()?
                    .dead_letter(&entry, &dead.error, dead.attempts, &dead.build_id)
                    .await;
                if let Err(error) = written {
                    // Committed, and nothing acknowledged: every entry of the batch comes back, the
                    // settled ones acknowledged by their markers, the dead one read again (and
                    // dead-lettered again, without a call if its calls never came back).
                    self.given_up().await;
                    return Err(Trouble::broker(format!(
                        "{error} (after the commit; the entries will be redelivered)"
                    )));
                }
            }
        }
        let acks: Vec<(String, String)> = report
            .settled
            .iter()
            .flat_map(|id| self.origin.remove(id).unwrap_or_default())
            .map(|e| (e.stream, e.id))
            .collect();
        // After a retry stop the unacknowledged entries are read again first; `ack` also says so.
        if let Err(error) = self.consumer()?.ack(&acks).await {
            // Committed: the entries come back, and their processed markers make the redelivery an
            // acknowledgement only.
            self.given_up().await;
            return Err(Trouble::broker(format!(
                "{error} (after the commit; the entries will be redelivered)"
            )));
        }
        self.dead_letters_settled(report).await?;
        match report.retry {
            // What was read ahead stays pending here and is read again after the retried message.
            Some(_) => self.given_up().await,
            None => {
                self.retrying = false;
                self.ahead = std::mem::take(&mut self.next);
            }
        }
        Ok(Settled {
            retry: report.retry,
            position: None,
            acked: Some(acks.len()),
        })
    }

    /// Nothing was committed or acknowledged; the entries are read again after the backoff.
    async fn failed(&mut self, _: Back, error: crate::store::Error) -> Option<Trouble> {
        self.given_up().await;
        Some(Trouble::store(error))
    }

    async fn close(&mut self) {
        self.flush().await;
        tracing::info!(subscription = %self.name(), "stream subscription stopped");
    }
}

/// How long a read of the broker may wait for new entries. Test mode waits exactly as long as the
/// work: short blocking reads notice idleness quickly.
pub(crate) fn read_block(shared: &Shared) -> std::time::Duration {
    let block = shared
        .config
        .broker
        .as_ref()
        .map_or(std::time::Duration::from_secs(1), |b| b.block);
    if shared.test_mode {
        block.min(std::time::Duration::from_millis(20))
    } else {
        block
    }
}

/// `{subscription}-{host}-{pid}-{random}`: unique per process, readable in `XINFO CONSUMERS`.
pub(crate) fn consumer_name(subscription: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let random = &uuid::Uuid::new_v4().simple().to_string()[..6];
    format!("{subscription}-{host}-{}-{random}", std::process::id())
}

/// The stream kind: a consumer group on the broker, which keeps its lag, pending entries and dead
/// letters.
#[derive(Debug)]
pub(crate) struct StreamKind;

#[async_trait]
impl super::standing::Standing for StreamKind {
    fn label(&self) -> &'static str {
        "stream"
    }

    async fn run(&self, task: Task) -> Result<(), String> {
        task.on_broker(Stream::new).await
    }

    fn on_broker(&self) -> bool {
        true
    }

    async fn measure_broker(&self, broker: &dyn Broker, target: &Target, row: &mut Row) {
        row.group = Some(target.name.clone());
        match broker
            .group_status(
                &standing::streams(&target.name, &target.categories),
                &target.name,
            )
            .await
        {
            Ok(group) => {
                row.lag = Some(group.lag);
                row.pending = Some(group.pending);
                row.consumers = Some(group.consumers);
                row.dead_letters = Some(group.dead_letters);
                if !group.exists {
                    row.error = Some("its consumer group does not exist yet".into());
                }
            }
            Err(e) => row.error = Some(e.to_string()),
        }
    }

    fn unattended(&self, row: &Row, _broker_configured: bool) -> Option<&'static str> {
        standing::without_consumers(row)
    }

    async fn broker_backlog(
        &self,
        broker: &dyn Broker,
        plan: &super::SubscriptionPlan,
        _config: &crate::config::Config,
    ) -> Option<crate::broker::Result<u64>> {
        // The replay stream too: a replayed dead letter read by a blocking read that outlasted its
        // block is pending there while the subscription already says it is idle.
        let streams = standing::streams(&plan.name, &plan.categories);
        Some(broker.backlog(&streams, &plan.name).await)
    }
}
