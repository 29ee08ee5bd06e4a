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

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{
        partitions::{id_before, id_key, Claim, DeadLetterInfo, Parked, Partitions},
        replay_stream, Broker, Entry,
    },
    engine::{
        batch::{Attempts, Origin, Record, Report, Subscription},
        progress::{Progress, State},
        run::{blocking, Back, Fetched, Owning, Place, Settled, Source, Trouble, Wake, Work},
        Shared,
    },
    ordering::{partition_of, Ordering},
    store::{self, Store, StoredMessage},
    subscription::stream::consumer_name,
    unit_of_work::{Fence, UnitOfWork},
};

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
    /// The next entries, read while the last batch was handled (not yet taken in).
    ahead: Vec<Entry>,
    /// The batch in flight: its items (their messages are with the batch) and the positions of the
    /// batch before it, sent while it runs.
    in_flight: Option<(Vec<Item>, Positions)>,
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
        let block = shared
            .config
            .broker
            .as_ref()
            .map_or(Duration::from_secs(1), |b| b.block);
        // Test mode waits exactly as long as the work: short blocking reads notice idleness quickly.
        let block = if shared.test_mode {
            block.min(Duration::from_millis(20))
        } else {
            block
        };
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
        let until_renew = self.next_renew.saturating_duration_since(Instant::now());
        let wait = self.wait(self.block.min(until_renew));
        let seen = self.shared.progress.published();
        let Some(read) = self.next(group, wait, shutdown).await else {
            return Ok(Fetched::Stop);
        };
        let fresh = read.map_err(Trouble::broker)?;
        let count = self.sub.settings.messages_per_tick as usize;
        let fresh = self.accept(group, fresh).await.map_err(Trouble::broker)?;
        let new_work =
            !fresh.is_empty() | self.drain(group, count).await.map_err(Trouble::broker)?;
        self.pending.extend(fresh);
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
            .is_none_or(|at| at <= Instant::now());
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
        self.ahead = group
            .read(&cursors, count, Duration::ZERO)
            .await
            .unwrap_or_default();
        if let Ok(lost) = lost {
            self.positions_stored(updates, &lost);
        }
        self.group = Some(group);
    }

    async fn committed(&mut self, report: &Report, back: Back) -> Result<Settled, Trouble> {
        let items = self.items_back(back);
        let mut group = self.group()?;
        let settled = self.settle(group.as_mut(), items, report).await;
        self.put_back(group, settled.map_err(Trouble::broker))?;
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

/// A partition this replica holds.
struct Part {
    claim: Claim,
    /// Per stream: the last entry id read for this partition (what the next read starts after).
    read: HashMap<String, String>,
    /// Per stream: the position stored for this partition.
    stored: HashMap<String, String>,
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

/// Positions to store: per partition (with its claim), the streams whose position changed and where to.
type Positions = Vec<(Claim, Vec<(String, String)>)>;

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
        due.map_or(most, |at| {
            most.min(at.saturating_duration_since(Instant::now()))
        })
    }

    /// Say this replica is alive, renew its partitions, and take or give back partitions until it holds
    /// its share: the partitions divided by the live replicas, rounded up.
    async fn rebalance(&mut self, group: &mut dyn Partitions) -> Result<(), String> {
        let alive = group.heartbeat().await.map_err(|e| e.to_string())?.max(1);
        let claims: Vec<Claim> = self.parts.values().map(|p| p.claim).collect();
        for lost in group.renew(&claims).await.map_err(|e| e.to_string())? {
            tracing::warn!(subscription = %self.name(), partition = lost, "partition lease lost (expired while this replica was away); another replica serves it");
            self.drop_part(lost);
        }
        let share = (self.partitions() as usize).div_ceil(alive);
        if self.parts.len() > share {
            let extra: Vec<Claim> = self
                .parts
                .values()
                .rev()
                .take(self.parts.len() - share)
                .map(|p| p.claim)
                .collect();
            // Their positions first: a read ahead may have been due to carry them.
            self.commit_positions(group).await?;
            group.release(&extra).await.map_err(|e| e.to_string())?;
            for claim in &extra {
                self.drop_part(claim.partition);
            }
            tracing::info!(subscription = %self.name(), released = extra.len(), alive, held = self.parts.len(), "partitions given back to rebalance");
        } else if self.parts.len() < share {
            self.acquire(group, share).await?;
        }
        self.parked = group.parked().await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Take free partitions up to `share`, starting at a place of this replica's own so that replicas
    /// starting together do not all race for the same ones.
    async fn acquire(&mut self, group: &mut dyn Partitions, share: usize) -> Result<(), String> {
        let mut free = group.free().await.map_err(|e| e.to_string())?;
        let start = partition_of(&self.owner, free.len().max(1) as u32) as usize;
        let len = free.len();
        free.rotate_left(start.min(len));
        let mut claims = Vec::new();
        for partition in free {
            if self.parts.len() + claims.len() >= share {
                break;
            }
            if let Some(claim) = group.acquire(partition).await.map_err(|e| e.to_string())? {
                claims.push(claim);
            }
        }
        if claims.is_empty() {
            return Ok(());
        }
        // Taken only once fenced and positioned; else given back at once rather than left to expire.
        let parts = match self.prepare(group, &claims).await {
            Ok(parts) => parts,
            Err(error) => {
                let _ = group.release(&claims).await;
                return Err(error);
            }
        };
        self.parts
            .extend(parts.into_iter().map(|p| (p.claim.partition, p)));
        self.recover_calls().await;
        // What was read ahead started past the new partitions' positions: read again from them.
        self.ahead.clear();
        let taken: Vec<u32> = claims.iter().map(|c| c.partition).collect();
        tracing::info!(subscription = %self.name(), partitions = ?taken, held = self.parts.len(), "partitions taken");
        Ok(())
    }

    /// Count the calls a previous holder of new partitions died in (see [`batch::Attempts::recover`]).
    /// Without them a message that kills the process would be called again forever; a store that
    /// cannot answer now only delays that count to the next take.
    async fn recover_calls(&mut self) {
        let (store, name) = (self.shared.store.clone(), self.name().to_owned());
        match tokio::task::spawn_blocking(move || store.recorded_calls(&name, None)).await {
            Ok(Ok(recorded)) => self.attempts.recover(recorded),
            Ok(Err(error)) => {
                tracing::warn!(subscription = %self.name(), %error, "cannot read the calls in flight of the partitions taken")
            }
            Err(error) => {
                tracing::warn!(subscription = %self.name(), %error, "reading the calls in flight failed")
            }
        }
    }

    /// Raise the store's fences of new `claims` (from here on it refuses the previous holders'
    /// commits, before anything is read), then load their positions.
    async fn prepare(
        &mut self,
        group: &mut dyn Partitions,
        claims: &[Claim],
    ) -> Result<Vec<Part>, String> {
        let fences = claims.iter().map(|c| self.fence(c)).collect();
        commit_fences(self.shared.store.clone(), fences).await?;
        let mut parts = Vec::new();
        for claim in claims {
            let stored = group
                .positions(claim.partition)
                .await
                .map_err(|e| e.to_string())?;
            let read = stored.clone();
            parts.push(Part {
                claim: *claim,
                read,
                stored,
            });
        }
        Ok(parts)
    }

    fn fence(&self, claim: &Claim) -> Fence {
        Fence {
            name: format!("{}#p{}", self.name(), claim.partition),
            token: claim.token,
        }
    }

    /// Forget a partition: its unsettled messages are re-read by its next holder.
    fn drop_part(&mut self, partition: u32) {
        self.parts.remove(&partition);
        self.pending.retain(|item| item.partition != partition);
        let partitions = self.partitions();
        self.draining
            .retain(|key| partition_of(key, partitions) != partition);
    }

    /// The entries read ahead, else the next read (waiting up to `wait`); None on shutdown.
    async fn next(
        &mut self,
        group: &mut dyn Partitions,
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> Option<Result<Vec<Entry>, crate::broker::Error>> {
        let ahead = std::mem::take(&mut self.ahead);
        if !ahead.is_empty() {
            return Some(Ok(ahead));
        }
        tokio::select! {
            read = self.read(group, wait) => Some(read),
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
            .map(|s| (s.clone(), self.cursor(s)))
            .collect()
    }

    /// Where a read of `stream` starts: after the lowest read mark among the held partitions.
    fn cursor(&self, stream: &str) -> String {
        self.parts
            .values()
            .map(|p| p.read.get(stream).map_or("0-0", String::as_str))
            .min_by_key(|id| id_key(id))
            .unwrap_or("0-0")
            .to_owned()
    }

    /// Decode what was read and keep the messages of this replica's partitions not seen before; the
    /// messages of parked keys go to their held lists, undecodable entries to the dead letters.
    async fn accept(
        &mut self,
        group: &mut dyn Partitions,
        entries: Vec<Entry>,
    ) -> Result<Vec<Item>, String> {
        let (taken, advance) = take_in_order(entries, self.sub.settings.messages_per_tick as usize);
        let mut fresh = Vec::new();
        let mut to_hold: PerKey<Vec<Entry>> = PerKey::new();
        for (entry, message) in taken {
            let key = match &message {
                Ok(m) => self.ordering.key_of(m),
                Err(_) => format!("{}/{}", entry.stream, entry.id),
            };
            let partition = partition_of(&key, self.partitions());
            if !self.first_read(partition, &entry) {
                continue;
            }
            match message {
                Err(reason) => self.poison(group, &entry, &key, &reason).await?,
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
        // Entries of other partitions up to here are theirs: every held partition has read this far.
        for part in self.parts.values_mut() {
            for (stream, id) in &advance {
                if part.read.get(stream).is_none_or(|r| id_key(r) < id_key(id)) {
                    part.read.insert(stream.clone(), id.clone());
                }
            }
        }
        for ((partition, key), entries) in to_hold {
            self.hold(group, partition, &key, &entries).await?;
        }
        if self.streams.len() > 1 {
            fresh.sort_by_key(|item| item.message.global_position);
        }
        Ok(fresh)
    }

    /// Whether `entry` belongs to a partition held here and was not read for it before (a read after
    /// taking a partition starts further back); marks it read.
    fn first_read(&mut self, partition: u32, entry: &Entry) -> bool {
        let Some(part) = self.parts.get_mut(&partition) else {
            return false;
        };
        let seen = part.read.get(&entry.stream);
        if seen.is_some_and(|r| id_key(&entry.id) <= id_key(r)) {
            return false;
        }
        part.read.insert(entry.stream.clone(), entry.id.clone());
        true
    }

    async fn poison(
        &mut self,
        group: &mut dyn Partitions,
        entry: &Entry,
        key: &str,
        reason: &str,
    ) -> Result<(), String> {
        tracing::warn!(subscription = %self.name(), stream = %entry.stream, entry = %entry.id, error = %reason, "dead-lettered");
        let build_id = self.shared.plugin().build_id().to_owned();
        let info = DeadLetterInfo {
            error: reason,
            attempts: 1,
            build_id: &build_id,
        };
        group
            .dead_letter(entry, key, None, &info)
            .await
            .map_err(|e| e.to_string())
    }

    /// Move `entries` of the parked `key` to its held list.
    async fn hold(
        &mut self,
        group: &mut dyn Partitions,
        partition: u32,
        key: &str,
        entries: &[Entry],
    ) -> Result<(), String> {
        let Some(part) = self.parts.get(&partition) else {
            return Ok(());
        };
        tracing::info!(subscription = %self.name(), key, held = entries.len(), "messages held behind a parked key");
        if !group
            .hold(&part.claim, key, entries)
            .await
            .map_err(|e| e.to_string())?
        {
            self.lost(partition);
        }
        Ok(())
    }

    fn lost(&mut self, partition: u32) {
        tracing::warn!(subscription = %self.name(), partition, "partition taken over by another replica; its writes from here are refused");
        self.drop_part(partition);
    }

    /// Take the held entries of released keys in this replica's partitions, to handle them first.
    /// Whether any were taken.
    async fn drain(&mut self, group: &mut dyn Partitions, count: usize) -> Result<bool, String> {
        let partitions = self.partitions();
        let released: Vec<(String, u32)> = self
            .parked
            .iter()
            .filter(|(key, state)| **state == Parked::Released && !self.draining.contains(*key))
            .map(|(key, _)| (key.clone(), partition_of(key, partitions)))
            .filter(|(_, p)| self.parts.contains_key(p))
            .collect();
        let mut taken = false;
        for (key, partition) in released {
            let entries = group.held(&key, count).await.map_err(|e| e.to_string())?;
            let claim = self.parts[&partition].claim;
            let mut items = Vec::new();
            for entry in entries {
                match entry.message() {
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
    ) -> Result<(), String> {
        let unparked = group
            .settle_held(claim, key, count)
            .await
            .map_err(|e| e.to_string())?;
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
        let store::Error::Fenced { name, .. } = &error else {
            return Some(Trouble::store(error));
        };
        tracing::warn!(subscription = %self.name(), %error, "batch refused by the store");
        if let Some(partition) = name.rsplit_once("#p").and_then(|(_, p)| p.parse().ok()) {
            self.lost(partition);
        }
        None
    }

    /// After a commit: dead letters (parking their keys), held lists trimmed, parked keys' later
    /// messages held, the rest kept for later, positions stored.
    async fn settle(
        &mut self,
        group: &mut dyn Partitions,
        items: Vec<Item>,
        report: &Report,
    ) -> Result<(), String> {
        self.dead_letters(group, &items, report).await?;
        let (held_done, to_hold) = self.sort_out(items, report);
        for ((partition, key), count) in held_done {
            let Some(claim) = self.parts.get(&partition).map(|p| p.claim) else {
                continue;
            };
            self.settle_held(group, &claim, &key, count).await?;
            if !self.pending.iter().any(|i| i.held && i.key == key) {
                self.draining.remove(&key);
            }
        }
        for ((partition, key), entries) in to_hold {
            self.hold(group, partition, &key, &entries).await?;
        }
        // With more to read the next batch sends the positions; idle, they go now.
        if self.ahead.is_empty() {
            self.commit_positions(group).await?;
        }
        Ok(())
    }

    /// Record the batch's dead letters in the broker, parking their keys where the ordering parks.
    async fn dead_letters(
        &mut self,
        group: &mut dyn Partitions,
        items: &[Item],
        report: &Report,
    ) -> Result<(), String> {
        let build_id = self.shared.plugin().build_id().to_owned();
        for (dead, identity) in report.dead_letters.iter().zip(&report.dead_lettered_ids) {
            let Some(item) = items.iter().find(|i| &i.message.identity() == identity) else {
                continue;
            };
            let park = report.parked.contains(&item.key);
            let claim = self.parts.get(&item.partition).map(|p| p.claim);
            let info = DeadLetterInfo {
                error: &dead.error,
                attempts: dead.attempts,
                build_id: &build_id,
            };
            group
                .dead_letter(
                    &item.entry,
                    &item.key,
                    claim.as_ref().filter(|_| park),
                    &info,
                )
                .await
                .map_err(|e| e.to_string())?;
            if park {
                tracing::warn!(subscription = %self.name(), key = %item.key, message_id = %dead.message_id, "key parked: its later messages wait until its dead letter is replayed or discarded");
                self.parked
                    .insert(item.key.clone(), Parked::Waiting(dead.message_id.clone()));
            }
        }
        Ok(())
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
    async fn commit_positions(&mut self, group: &mut dyn Partitions) -> Result<(), String> {
        let updates = self.position_updates();
        let lost = group
            .commit_positions(&updates)
            .await
            .map_err(|e| e.to_string())?;
        self.positions_stored(updates, &lost);
        Ok(())
    }

    /// The positions that changed: per held partition and stream, after the last entry read, or just
    /// before its first unsettled one.
    fn position_updates(&self) -> Positions {
        let mut first_unsettled: HashMap<(u32, &str), &str> = HashMap::new();
        for item in self.pending.iter().filter(|i| !i.held) {
            first_unsettled
                .entry((item.partition, item.entry.stream.as_str()))
                .and_modify(|id| {
                    if id_key(&item.entry.id) < id_key(id) {
                        *id = &item.entry.id
                    }
                })
                .or_insert(&item.entry.id);
        }
        let mut updates = Vec::new();
        for (partition, part) in &self.parts {
            let mut changed = Vec::new();
            for stream in &self.streams {
                let mark = match first_unsettled.get(&(*partition, stream.as_str())) {
                    Some(id) => id_before(id),
                    None => match part.read.get(stream) {
                        Some(id) => id.clone(),
                        None => continue,
                    },
                };
                if part.stored.get(stream) != Some(&mark) {
                    changed.push((stream.clone(), mark));
                }
            }
            if !changed.is_empty() {
                updates.push((part.claim, changed));
            }
        }
        updates
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

    /// On shutdown: give every partition back at once (positions are stored after every batch), so the
    /// other replicas need not wait for the leases to expire.
    async fn stop(&mut self, group: &mut dyn Partitions) {
        // The positions of the last batch, unless a read ahead was to carry them.
        if let Err(error) = self.commit_positions(group).await {
            tracing::warn!(subscription = %self.name(), %error, "cannot store the last positions; the next holder reads those entries again and skips what was handled");
        }
        let claims: Vec<Claim> = self.parts.values().map(|p| p.claim).collect();
        let released = group.release(&claims).await;
        let left = group.leave().await;
        if let Err(error) = released.and(left) {
            tracing::warn!(subscription = %self.name(), %error, "cannot give the partitions back; others take them when the leases expire");
        }
    }
}

/// Commit a unit of work holding only `fences`: from here on the store refuses the previous holders'
/// commits.
async fn commit_fences(store: Arc<dyn Store>, fences: Vec<Fence>) -> Result<(), String> {
    let unit = UnitOfWork {
        fences,
        ..UnitOfWork::default()
    };
    blocking(move || store.commit(&unit))
        .await?
        .map(drop)
        .map_err(|e| e.to_string())
}

/// An entry read, and the message it holds (or why it holds none).
type Decoded = (Entry, Result<StoredMessage, String>);

/// Decode what was read and keep what may be handled now (see [`merge_cap`]); also returns, per
/// stream, the last entry kept.
fn take_in_order(entries: Vec<Entry>, count: usize) -> (Vec<Decoded>, HashMap<String, String>) {
    let decoded: Vec<Decoded> = entries
        .into_iter()
        .map(|e| {
            let m = e.message();
            (e, m)
        })
        .collect();
    let cap = merge_cap(&decoded, count);
    let mut cut: HashSet<String> = HashSet::new();
    let mut advance: HashMap<String, String> = HashMap::new();
    let mut taken = Vec::with_capacity(decoded.len());
    for (entry, message) in decoded {
        let beyond = matches!(&message, Ok(m) if m.global_position > cap);
        // A stream's entries are in order: past the cap once, past it for the rest of the read.
        if cut.contains(&entry.stream) || beyond {
            cut.insert(entry.stream.clone());
            continue;
        }
        advance.insert(entry.stream.clone(), entry.id.clone());
        taken.push((entry, message));
    }
    (taken, advance)
}

/// When several streams are read at once and one returned a full page, entries of the others past
/// that page's last global position may have earlier messages still unread on the full stream: take
/// everything up to the lowest such position now and the rest on the next read, so a key spread over
/// several categories keeps store order.
fn merge_cap(decoded: &[Decoded], count: usize) -> u64 {
    let mut per_stream: HashMap<&str, (usize, u64)> = HashMap::new();
    for (entry, message) in decoded {
        let slot = per_stream.entry(entry.stream.as_str()).or_default();
        slot.0 += 1;
        if let Ok(m) = message {
            slot.1 = slot.1.max(m.global_position);
        }
    }
    if per_stream.len() < 2 {
        return u64::MAX;
    }
    per_stream
        .values()
        .filter(|(n, _)| *n >= count)
        .map(|(_, last)| *last)
        .min()
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(stream: &str, global_positions: &[u64]) -> Vec<Decoded> {
        global_positions
            .iter()
            .map(|&global_position| {
                let entry = Entry {
                    stream: stream.into(),
                    id: format!("{global_position}-0"),
                    data: None,
                    deliveries: 1,
                };
                let message = StoredMessage {
                    global_position,
                    ..StoredMessage::default()
                };
                (entry, Ok(message))
            })
            .collect()
    }

    #[test]
    fn one_stream_or_no_full_page_takes_everything() {
        assert_eq!(merge_cap(&read("a", &[1, 2, 3]), 3), u64::MAX);
        let mut both = read("a", &[1, 5]);
        both.extend(read("b", &[2, 9]));
        assert_eq!(merge_cap(&both, 3), u64::MAX);
    }

    #[test]
    fn a_full_page_caps_the_other_streams_at_its_last_position() {
        // `a` may hold more entries after 5 that come before b's 9: take b up to 5 only.
        let mut both = read("a", &[1, 3, 5]);
        both.extend(read("b", &[2, 9]));
        assert_eq!(merge_cap(&both, 3), 5);
        // Two full pages: the lower end wins.
        let mut full = read("a", &[1, 3, 5]);
        full.extend(read("b", &[2, 4, 6]));
        assert_eq!(merge_cap(&full, 3), 5);
    }
}
