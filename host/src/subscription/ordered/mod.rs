//! An ordered stream subscription: the messages of one key are handled strictly in order, different keys
//! in parallel across replicas, and a failing key holds back only itself.
//!
//! Keys fall into partitions (`[server.ordering] partitions`); each partition belongs to one live
//! replica at a time through a lease with a fencing token (see `broker::partitions`). Replicas share
//! the partitions evenly and rebalance as they come and go. A replica reads the streams from the
//! positions of the partitions it holds and handles the messages of its partitions one batch at a time.
//!
//! Invariants:
//! - a partition's position never passes a message that is neither settled (committed, dead-lettered)
//!   nor held behind its parked key; the messages after it are re-read by the next owner and those
//!   already handled are recognised by their processed markers;
//! - within a key, a message is handled only after every earlier one was settled: a failed message
//!   holds its key (not the batch) until its retry is due, and a parked key's later messages wait in its
//!   held list until its dead letter is replayed or discarded;
//! - every write for a partition carries the hold's fencing token: the store refuses the commit, and the
//!   broker the position, of a replica that lost the partition.

use crate::{
    ops::status::Target,
    subscription::standing::{Row, Task},
};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{
        decode,
        partitions::{Claim, DeadLetterInfo, Parked, Partitions},
        replay_stream, Broker, Decoded, Entry,
    },
    engine::{
        batch::{Attempts, Origin, Record, Report, Subscription},
        progress::{Progress, State},
        run::{Back, Fetched, Owning, Place, Settled, Source, Trouble, Wake, Work},
        Shared,
    },
    ordering::{partition_of, Ordering},
    ownership::{Fence, Owned},
    store::{self, StoredMessage},
    subscription::{
        standing::{idle_after, read_or_idle},
        stream::{consumer_name, read_block},
    },
};

mod intake;
mod owed;
mod ownership;
mod positions;

use intake::take_in_order;
use owed::Owed;
use positions::{Part, Positions};

/// An ordered subscription on this replica, as a source of the engine's loop: its partitions, what
/// it read and has not settled, its parked keys.
pub(crate) struct Ordered {
    shared: Arc<Shared>,
    broker: Arc<dyn Broker>,
    /// The subscription's partitions as the broker keeps them; connected when the loop opens it.
    group: Option<Box<dyn Partitions>>,
    /// This replica's name in leases.
    owner: String,
    sub: Arc<Subscription>,
    ordering: Ordering,
    streams: Vec<String>,
    /// How long a read may wait for new entries.
    block: Duration,
    /// When to renew and rebalance the partitions next.
    next_renew: Instant,
    parts: BTreeMap<u32, Part>,
    /// Read, in order, not settled yet (a key waiting for its retry; a batch refused).
    pending: Vec<Item>,
    parked: HashMap<String, Parked>,
    /// Released keys whose held entries are being handled (in `pending`).
    draining: HashSet<String>,
    attempts: Attempts,
    /// The next entries, read and decoded while the last batch was handled (not yet taken in).
    ahead: Vec<Decoded>,
    /// The batch in flight: its items (their messages are with the batch) and the positions of the
    /// batch before it, sent while it runs.
    in_flight: Option<(Vec<Item>, Positions)>,
    /// What the last batch committed still owes the broker: paid before the next is taken.
    owed: Owed,
}

impl Ordered {
    /// The source of ordered subscription `sub`; it connects when the loop opens it.
    pub(crate) fn new(
        shared: Arc<Shared>,
        broker: Arc<dyn Broker>,
        sub: Arc<Subscription>,
    ) -> Result<Self, String> {
        let ordering = sub
            .ordering
            .clone()
            .ok_or("an ordered subscription needs an ordering")?;
        let block = read_block(&shared);
        let owner = consumer_name(&sub.plan.name);
        let mut streams = sub.plan.categories.clone();
        streams.push(replay_stream(&sub.plan.name));
        Ok(Self {
            shared,
            broker,
            group: None,
            owner,
            sub,
            ordering,
            streams,
            block,
            next_renew: Instant::now(),
            parts: BTreeMap::new(),
            pending: Vec::new(),
            parked: HashMap::new(),
            draining: HashSet::new(),
            attempts: Attempts::default(),
            ahead: Vec::new(),
            in_flight: None,
            owed: Owed::default(),
        })
    }

    /// The partitions, once connected. Taken out while used, so that the source's other fields stay
    /// free to change; [`Ordered::put_back`] returns it.
    fn group(&mut self) -> Result<Box<dyn Partitions>, Trouble> {
        self.group.take().ok_or_else(|| {
            Trouble::Fatal("an ordered subscription read before it was opened".into())
        })
    }

    fn put_back<T>(&mut self, group: Box<dyn Partitions>, result: T) -> T {
        self.group = Some(group);
        result
    }

    /// Read and take in what is new; the batch to handle now, if any, or why there is none.
    async fn next_batch(
        &mut self,
        group: &mut dyn Partitions,
        shutdown: &CancellationToken,
    ) -> Result<Fetched, Trouble> {
        if !self.owed.is_empty() {
            self.pay(group).await?;
        }
        let until_renew = self.next_renew.saturating_duration_since(Instant::now());
        let wait = self.wait(self.block.min(until_renew));
        let seen = self.shared.progress.published();
        let Some(read) = self.next(group, wait, seen, shutdown).await else {
            return Ok(Fetched::Stop);
        };
        let fresh = read.map_err(Trouble::broker)?;
        let count = self.sub.settings.messages_per_tick as usize;
        let fresh = self.accept(fresh);
        let fresh_work = !fresh.is_empty();
        self.pending.extend(fresh);
        // Its dead letters and held messages, before the held lists are read.
        if !self.owed.is_empty() {
            self.pay(group).await?;
        }
        let new_work = fresh_work | self.drain(group, count).await?;
        let nothing = |state| Fetched::Nothing {
            state,
            wake: Wake::Now,
        };
        if self.pending.is_empty() {
            return Ok(nothing(State::Idle { head: seen }));
        }
        let due = self
            .attempts
            .next_due()
            .is_none_or(|at| at <= self.shared.clock.now_ms());
        if !new_work && !due {
            return Ok(nothing(State::Retrying));
        }
        // Positions of the last batch (computed while this batch is still pending, so they stop before
        // it) go with the read-ahead while it runs: one round trip fewer per batch.
        let updates = self.position_updates();
        let (messages, items, fences) = self.take_batch();
        let keys = items.iter().map(|i| i.key.clone()).collect();
        self.in_flight = Some((items, updates));
        Ok(Fetched::Work(Work {
            read: messages.len(),
            messages,
            attempts: std::mem::take(&mut self.attempts),
            place: Place {
                // Positions live in the broker, per partition.
                position: None,
                origin: Origin::Broker,
                fences,
                // Worked out when the messages were read.
                keys: Some(keys),
                // Positions live in the broker, per partition: only a record says what a holder that
                // died was handling.
                record: Record::Every,
                ..Place::default()
            },
        }))
    }

    /// The batch's items, their messages back from the batch.
    fn items_back(&mut self, back: Back) -> Vec<Item> {
        self.attempts = back.attempts;
        let items = self
            .in_flight
            .take()
            .map(|(items, _)| items)
            .unwrap_or_default();
        items
            .into_iter()
            .zip(back.messages)
            .map(|(item, message)| Item { message, ..item })
            .collect()
    }
}

#[async_trait]
impl Source for Ordered {
    fn report(&self, progress: &Progress, state: State) {
        progress.set(&self.sub.plan.name, state);
    }

    /// This replica's handle on the subscription's partitions. A partition count other than the
    /// running one is an error for the operator, not worth a retry.
    async fn open(&mut self) -> Result<(), Trouble> {
        let settings = self.shared.config.ordering;
        let group = self
            .broker
            .partitions(
                &self.sub.plan.name,
                &self.streams,
                &self.owner,
                settings.partitions,
                settings.lease_ttl,
            )
            .await
            .map_err(|error| match error {
                crate::broker::Error::PartitionCount { .. } => Trouble::Fatal(error.to_string()),
                error => Trouble::broker(error),
            })?;
        self.group = Some(group);
        tracing::info!(subscription = %self.name(), owner = %self.owner, key = self.ordering.describe(), park = self.ordering.park, partitions = settings.partitions, "ordered subscription started");
        Ok(())
    }

    /// Renew and rebalance the partitions when due; with none held there is nothing to do until the
    /// next renewal.
    async fn own(&mut self) -> Owning {
        if Instant::now() >= self.next_renew {
            self.next_renew = Instant::now() + self.shared.config.ordering.renew_interval();
            if let Some(mut group) = self.group.take() {
                let renewed = self.rebalance(group.as_mut()).await;
                self.group = Some(group);
                if let Err(error) = renewed {
                    tracing::warn!(subscription = %self.name(), %error, "cannot renew or rebalance partitions; will try again");
                }
            }
        }
        if !self.parts.is_empty() {
            return Owning::Yes;
        }
        Owning::No {
            state: State::Idle { head: u64::MAX },
            wait: self.next_renew.saturating_duration_since(Instant::now()),
        }
    }

    async fn fetch(
        &mut self,
        _head: u64,
        shutdown: &CancellationToken,
    ) -> Result<Fetched, Trouble> {
        let mut group = self.group()?;
        let fetched = self.next_batch(group.as_mut(), shutdown).await;
        self.put_back(group, fetched)
    }

    /// Send the last batch's positions and read the next entries (without waiting: nothing new may
    /// come). A failed read-ahead loses nothing: the entries are read again from the same cursors;
    /// failed positions are sent again with the next ones.
    async fn meanwhile(&mut self, _: &CancellationToken) {
        let Some(mut group) = self.group.take() else {
            return;
        };
        let updates = self
            .in_flight
            .as_mut()
            .map(|(_, updates)| std::mem::take(updates))
            .unwrap_or_default();
        let (cursors, count) = (self.cursors(), self.sub.settings.messages_per_tick as usize);
        let lost = group.commit_positions(&updates).await;
        let read = group
            .read(&cursors, count, Duration::ZERO)
            .await
            .unwrap_or_default();
        // Decoded here, while the batch runs, rather than by the next fetch once it is done.
        self.ahead = decode(read);
        if let Ok(lost) = lost {
            self.positions_stored(updates, &lost);
        }
        self.group = Some(group);
    }

    /// What the batch owes the broker is noted before it is paid: a broker that refuses it has it
    /// again before the next batch, and no position passes it meanwhile.
    async fn committed(&mut self, report: &Report, back: Back) -> Result<Settled, Trouble> {
        let items = self.items_back(back);
        self.owe(items, report);
        let mut group = self.group()?;
        let paid = self.pay(group.as_mut()).await;
        self.put_back(group, paid)?;
        Ok(Settled::default())
    }

    /// The messages stay pending either way.
    async fn failed(&mut self, back: Back, error: store::Error) -> Option<Trouble> {
        self.pending = self.items_back(back);
        self.refused(error)
    }

    /// Give every partition back at once (positions are stored after every batch), so the other
    /// replicas need not wait for the leases to expire.
    async fn close(&mut self) {
        if let Some(mut group) = self.group.take() {
            self.stop(group.as_mut()).await;
        }
        tracing::info!(subscription = %self.name(), "ordered subscription stopped");
    }
}

/// A message read and not settled yet.
struct Item {
    message: StoredMessage,
    entry: Entry,
    partition: u32,
    key: String,
    /// Taken from its parked key's held list (not from a stream).
    held: bool,
}

/// Something per key, with the partition the key falls in.
type PerKey<T> = BTreeMap<(u32, String), T>;

impl Ordered {
    fn name(&self) -> &str {
        &self.sub.plan.name
    }

    fn partitions(&self) -> u32 {
        self.shared.config.ordering.partitions
    }

    /// How long the next read may wait for new entries: not past a waiting key's retry.
    fn wait(&self, most: Duration) -> Duration {
        let due = self
            .attempts
            .next_due()
            .filter(|_| !self.pending.is_empty());
        let now = self.shared.clock.now_ms();
        due.map_or(most, |at| {
            most.min(Duration::from_millis(at.saturating_sub(now).max(0) as u64))
        })
    }

    /// The entries read ahead, else the next read (waiting up to `wait`); None on shutdown. With
    /// nothing of its own left to handle, a read still out after `wait` (in test mode, sooner:
    /// [`idle_after`]) has found nothing new: the subscription is idle at `seen` (see
    /// [`read_or_idle`]).
    async fn next(
        &mut self,
        group: &mut dyn Partitions,
        wait: Duration,
        seen: u64,
        shutdown: &CancellationToken,
    ) -> Option<Result<Vec<Decoded>, crate::broker::Error>> {
        let ahead = std::mem::take(&mut self.ahead);
        if !ahead.is_empty() {
            return Some(Ok(ahead));
        }
        let done = self.pending.is_empty() && self.released().next().is_none();
        let (shared, name) = (self.shared.clone(), self.name().to_owned());
        let idle_after = idle_after(&shared, wait);
        let idle = || {
            if done {
                shared.progress.set(&name, State::Idle { head: seen });
            }
        };
        tokio::select! {
            answer = read_or_idle(self.read(group, wait), idle_after, idle) => {
                Some(answer.map(decode))
            }
            _ = shutdown.cancelled() => None,
        }
    }

    /// Read the next entries of the held partitions' streams.
    async fn read(
        &mut self,
        group: &mut dyn Partitions,
        wait: Duration,
    ) -> store::Result<Vec<Entry>, crate::broker::Error> {
        let count = self.sub.settings.messages_per_tick as usize;
        group.read(&self.cursors(), count, wait).await
    }

    fn cursors(&self) -> Vec<(String, String)> {
        self.streams
            .iter()
            .map(|s| (s.clone(), positions::cursor(&self.parts, s)))
            .collect()
    }

    /// Keep the messages read (decoded) of this replica's partitions not seen before; the
    /// messages of parked keys are owed to their held lists, undecodable entries to the dead letters
    /// (see [`Owed`]).
    fn accept(&mut self, decoded: Vec<Decoded>) -> Vec<Item> {
        let (taken, advance) = take_in_order(decoded, self.sub.settings.messages_per_tick as usize);
        let mut fresh = Vec::new();
        let mut to_hold: PerKey<Vec<Entry>> = PerKey::new();
        for (entry, message) in taken {
            let key = match &message {
                Ok(m) => self.ordering.key_of(m),
                Err(_) => format!("{}/{}", entry.stream, entry.id),
            };
            let partition = partition_of(&key, self.partitions());
            if !positions::first_read(&mut self.parts, partition, &entry) {
                continue;
            }
            match message {
                Err(reason) => {
                    tracing::warn!(subscription = %self.name(), stream = %entry.stream, entry = %entry.id, error = %reason, "dead-lettered");
                    self.owed.poison(entry, key, partition, reason);
                }
                Ok(_) if self.parked.contains_key(&key) => {
                    to_hold.entry((partition, key)).or_default().push(entry)
                }
                Ok(message) => fresh.push(Item {
                    message,
                    entry,
                    partition,
                    key,
                    held: false,
                }),
            }
        }
        positions::advance(&mut self.parts, &advance);
        self.owed.hold(to_hold);
        if self.streams.len() > 1 {
            fresh.sort_by_key(|item| item.message.global_position);
        }
        fresh
    }

    /// Dead-letter the undecodable `entry` of a held list, at once: until its list is trimmed, the
    /// broker keeps it there.
    async fn poison(
        &mut self,
        group: &mut dyn Partitions,
        entry: &Entry,
        key: &str,
        reason: &str,
    ) -> Result<(), Trouble> {
        tracing::warn!(subscription = %self.name(), stream = %entry.stream, entry = %entry.id, error = %reason, "dead-lettered");
        let build_id = self.shared.plugin().build_id().to_owned();
        let info = DeadLetterInfo {
            error: reason,
            attempts: 1,
            build_id: &build_id,
        };
        group
            .dead_letter(entry, key, false, &info)
            .await
            .map(drop)
            .map_err(Trouble::broker)
    }

    /// Move `entries` of the parked `key` to its held list.
    async fn hold(
        &mut self,
        group: &mut dyn Partitions,
        partition: u32,
        key: &str,
        entries: &[Entry],
    ) -> Result<(), Trouble> {
        let Some(part) = self.parts.get(&partition) else {
            return Ok(());
        };
        tracing::info!(subscription = %self.name(), key, held = entries.len(), "messages held behind a parked key");
        if !group
            .hold(&part.claim, key, entries)
            .await
            .map_err(Trouble::broker)?
        {
            self.lost(partition);
        }
        Ok(())
    }

    /// The released keys of this replica's partitions whose held entries are not being handled yet,
    /// with their partitions.
    fn released(&self) -> impl Iterator<Item = (&String, u32)> {
        let partitions = self.partitions();
        self.parked
            .iter()
            .filter(|(key, state)| **state == Parked::Released && !self.draining.contains(*key))
            .map(move |(key, _)| (key, partition_of(key, partitions)))
            .filter(|(_, p)| self.parts.contains_key(p))
    }

    /// Take the held entries of released keys in this replica's partitions, to handle them first.
    /// Whether any were taken.
    async fn drain(&mut self, group: &mut dyn Partitions, count: usize) -> Result<bool, Trouble> {
        let mut taken = false;
        let released: Vec<(String, u32)> = self.released().map(|(k, p)| (k.clone(), p)).collect();
        for (key, partition) in released {
            let entries = group.held(&key, count).await.map_err(Trouble::broker)?;
            let claim = self.parts[&partition].claim;
            let mut items = Vec::new();
            for entry in entries {
                match entry.message().map_err(|e| e.to_string()) {
                    Ok(message) => items.push(Item {
                        message,
                        entry,
                        partition,
                        key: key.clone(),
                        held: true,
                    }),
                    // Only the first can be settled at once; later ones wait their turn.
                    Err(reason) if items.is_empty() => {
                        self.poison(group, &entry, &key, &reason).await?;
                        self.settle_held(group, &claim, &key, 1).await?;
                        break;
                    }
                    Err(_) => break,
                }
            }
            if items.is_empty() {
                // Nothing held (a discard of the only message): the key is free again.
                self.settle_held(group, &claim, &key, 0).await?;
                continue;
            }
            tracing::info!(subscription = %self.name(), %key, messages = items.len(), "handling the messages held behind a released key");
            self.draining.insert(key);
            self.pending.extend(items);
            taken = true;
        }
        Ok(taken)
    }

    async fn settle_held(
        &mut self,
        group: &mut dyn Partitions,
        claim: &Claim,
        key: &str,
        count: usize,
    ) -> Result<(), Trouble> {
        let unparked = group
            .settle_held(claim, key, count)
            .await
            .map_err(Trouble::broker)?;
        if unparked {
            tracing::info!(subscription = %self.name(), key, "key unparked: its held messages are handled");
            self.parked.remove(key);
            self.draining.remove(key);
        }
        Ok(())
    }

    /// Every pending message of a partition still held, split into the messages for the batch and
    /// the rest of their items, with the fences of the partitions they belong to.
    fn take_batch(&mut self) -> (Vec<StoredMessage>, Vec<Item>, Vec<Fence>) {
        let parts = &self.parts;
        self.pending
            .retain(|item| parts.contains_key(&item.partition));
        let (messages, items): (Vec<StoredMessage>, Vec<Item>) = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|mut item| (std::mem::take(&mut item.message), item))
            .unzip();
        let fences: BTreeMap<u32, Fence> = items
            .iter()
            .filter_map(|i| Some((i.partition, self.fence(&parts.get(&i.partition)?.claim))))
            .collect();
        (messages, items, fences.into_values().collect())
    }

    /// The store refused the batch: a fence (another replica holds one of its partitions now: drop it)
    /// or trouble (the caller backs off). The messages stay pending either way.
    fn refused(&mut self, error: store::Error) -> Option<Trouble> {
        let store::Error::Fenced { owned, .. } = &error else {
            return Some(Trouble::store(error));
        };
        tracing::warn!(subscription = %self.name(), %error, "batch refused by the store");
        if let Owned::Partition { partition, .. } = *owned {
            self.lost(partition);
        }
        None
    }

    /// Sort the batch's items out: settled held ones are counted per key (to trim their lists), the
    /// unsettled ones of a key parked now go to its held list, the rest stay pending.
    fn sort_out(
        &mut self,
        items: Vec<Item>,
        report: &Report,
    ) -> (PerKey<usize>, PerKey<Vec<Entry>>) {
        let settled: HashSet<&str> = report.settled.iter().map(String::as_str).collect();
        let (mut held_done, mut to_hold): (PerKey<usize>, PerKey<Vec<Entry>>) = Default::default();
        for item in items {
            let parked = matches!(self.parked.get(&item.key), Some(Parked::Waiting(_)));
            if settled.contains(item.message.identity().as_str()) {
                if item.held {
                    *held_done.entry((item.partition, item.key)).or_default() += 1;
                }
            } else if parked && !item.held {
                to_hold
                    .entry((item.partition, item.key))
                    .or_default()
                    .push(item.entry);
            } else if parked {
                // Still first in its held list, behind the new dead letter.
                self.draining.remove(&item.key);
            } else if self.parts.contains_key(&item.partition) {
                self.pending.push(item);
            }
        }
        (held_done, to_hold)
    }

    /// Store each held partition's position now.
    async fn commit_positions(&mut self, group: &mut dyn Partitions) -> Result<(), Trouble> {
        let updates = self.position_updates();
        let lost = group
            .commit_positions(&updates)
            .await
            .map_err(Trouble::broker)?;
        self.positions_stored(updates, &lost);
        Ok(())
    }

    /// The positions that changed (see [`positions::updates`]); held messages are not read from a
    /// stream.
    fn position_updates(&self) -> Positions {
        let unsettled = self.pending.iter().filter(|i| !i.held);
        let unsettled = unsettled.map(|i| (i.partition, &i.entry));
        positions::updates(
            &self.parts,
            &self.streams,
            unsettled.chain(self.owed.entries()),
        )
    }

    /// Note what the broker stored; drop the partitions it refused (their lease was lost).
    fn positions_stored(&mut self, updates: Positions, lost: &[u32]) {
        for (claim, changed) in updates {
            if lost.contains(&claim.partition) {
                self.lost(claim.partition);
            } else if let Some(part) = self.parts.get_mut(&claim.partition) {
                part.stored.extend(changed);
            }
        }
    }
}

/// The ordered kind: partitions of a broker group, each leased to one replica, with parked keys.
#[derive(Debug)]
pub(crate) struct OrderedKind;

#[async_trait]
impl crate::subscription::standing::Standing for OrderedKind {
    fn label(&self) -> &'static str {
        "stream"
    }

    async fn run(&self, task: Task) -> Result<(), String> {
        task.on_broker(Ordered::new).await
    }

    fn partitions(&self, config: &crate::config::Config) -> Option<u32> {
        Some(config.ordering.partitions)
    }

    fn on_broker(&self) -> bool {
        true
    }

    /// Lag past its slowest partition, nothing pending (it keeps no group), dead letters from its
    /// group's dead-letter stream, and its partitions.
    async fn measure_broker(&self, broker: &dyn Broker, target: &Target, row: &mut Row) {
        let streams = crate::subscription::standing::streams(&target.name, &target.categories);
        // A target made from this kind has them (see `partitions`).
        let partitions = target
            .partitions
            .unwrap_or_else(|| crate::config::OrderingSettings::default().partitions);
        match broker
            .partition_status(&target.name, &streams, partitions)
            .await
        {
            Ok(status) => {
                row.lag = Some(status.lag);
                row.pending = Some(0);
                row.consumers = Some(status.owners.len() as u64);
                row.parked_keys = Some(status.parked);
                row.held_messages = Some(status.held);
                row.partitions = Some(status);
            }
            Err(e) => row.error = Some(e.to_string()),
        }
        match broker.group_status(&streams, &target.name).await {
            Ok(group) => row.dead_letters = Some(group.dead_letters),
            Err(e) => row.error = Some(e.to_string()),
        }
    }

    fn unattended(&self, row: &Row, _broker_configured: bool) -> Option<&'static str> {
        crate::subscription::standing::without_consumers(row)
    }

    /// The entries past its slowest partition's position.
    async fn broker_backlog(
        &self,
        broker: &dyn Broker,
        plan: &crate::subscription::SubscriptionPlan,
        config: &crate::config::Config,
    ) -> Option<crate::broker::Result<u64>> {
        let streams = crate::subscription::standing::streams(&plan.name, &plan.categories);
        let status = broker
            .partition_status(&plan.name, &streams, config.ordering.partitions)
            .await;
        Some(status.map(|s| s.lag))
    }
}
