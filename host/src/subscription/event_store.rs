//! An event-store subscription: reads its categories from its stored position, in batches.
//!
//! Invariants: it reads only after the position it committed, so a restart resumes exactly where the
//! last commit left off; when idle it waits for the engine's head to move (or, for writers in other
//! processes, for the poll interval), so an idle subscription costs one indexed query per interval.
//! The one exception: a worker of an ordered subscription reads on past a key that waits for a retry
//! (without moving its position, which stays before that key's message) and reads again from its
//! position once the retry is due, so a failing key holds back only itself. An ordered subscription
//! that parks moves its position past a parked key's messages by holding them in the store (see
//! [`parking`]), and handles them, between its ordinary batches, once the key is released.

use crate::{
    ops::status::Target,
    subscription::standing::{Row, Task},
};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{
    busy::BusyMark,
    parking::{Parked, View},
    workers::{self, Reader},
};

use crate::{
    broker::Broker,
    engine::{
        batch::{Attempts, Report, Subscription},
        progress::{Progress, State},
        run::{
            self, blocking, Back, Fetched, NextRead, Owning, Parks, Place, ReadAhead, Settled,
            Source, Trouble, Wake, Work,
        },
        Shared,
    },
    ownership::{self, Fence, Keeper, Owned},
    store::{self, StoredMessage},
};

/// Run one subscription until `shutdown`. The batch in flight when it fires is finished and committed.
/// It runs on one replica at a time when the store keeps leases (preferred: the store fences a stale
/// owner's commits) or else when replicas share a broker; `owner` names this replica in either. An
/// ordered subscription runs as several workers under that one lease (see [`workers`]), each a
/// [`Categories`] source on the engine's loop.
pub(crate) async fn run(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    keeper: Option<Arc<Keeper>>,
    owner: String,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let name = sub.plan.name.clone();
    let lease = Arc::new(tokio::sync::Mutex::new(keeper.map(|keeper| Lease {
        keeper,
        owned: Owned::Subscription(name.clone()),
        owner,
        held: None,
        renewed: None,
        taken: 0,
    })));
    // A worker that fails stops its siblings, so the subscription ends and the engine sees the error.
    let stop = shutdown.child_token();
    let mut loops = JoinSet::new();
    for reader in Reader::all(&name, workers::count(&shared.config, &sub.plan)) {
        let source = Categories::new(&shared, &sub, reader, lease.clone());
        loops.spawn(run::run(shared.clone(), sub.clone(), source, stop.clone()));
    }
    let mut result = Ok(());
    while let Some(ended) = loops.join_next().await {
        if let Err(error) = ended
            .map_err(|e| format!("a worker of {name} failed: {e}"))
            .and_then(|r| r)
        {
            stop.cancel();
            result = result.and(Err(error));
        }
    }
    if let Some(lease) = lease.lock().await.take() {
        lease.release().await;
    }
    shared.progress.set(&name, State::Stopped);
    result
}

/// One reader of an event-store subscription (the only one, or one of its workers): reads its
/// categories from its position.
pub(crate) struct Categories {
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    reader: Reader,
    lease: Arc<tokio::sync::Mutex<Option<Lease>>>,
    mark: BusyMark,
    cursor: Cursor,
    /// Lent to the batch in flight.
    attempts: Attempts,
    /// The last owner died busy: the first batch's messages each count a failed attempt.
    died_busy: bool,
    /// The takes of the lease this reader has seen.
    taken: u64,
    /// What its commits carry: the lease's fence, while it holds one.
    fences: Vec<Fence>,
    view: View,
    /// Held messages of a released key are handled every other round, so the other keys go on too.
    drained: bool,
    in_flight: Option<InFlight>,
    /// Read beside the last batch, while it ran and committed ([`Place::then_read`]).
    ahead: Option<ReadAhead>,
    started: bool,
}

/// The batch a reader handed to the loop.
enum InFlight {
    /// Read from the categories, up to this global position.
    Read { last: u64 },
    /// Held behind this released key.
    Drain(String),
}

impl Categories {
    fn new(
        shared: &Arc<Shared>,
        sub: &Arc<Subscription>,
        reader: Reader,
        lease: Arc<tokio::sync::Mutex<Option<Lease>>>,
    ) -> Self {
        Self {
            shared: shared.clone(),
            sub: sub.clone(),
            mark: BusyMark::new(&sub.plan.name, &reader.position),
            reader,
            lease,
            cursor: Cursor::new(0),
            attempts: Attempts::default(),
            died_busy: false,
            taken: 0,
            fences: Vec::new(),
            view: View::of(sub),
            drained: false,
            in_flight: None,
            ahead: None,
            started: false,
        }
    }

    fn name(&self) -> &str {
        &self.sub.plan.name
    }

    /// The next messages after the cursor: those read ahead after the last commit when they start
    /// there, else a read. A read-ahead that found nothing counts only while no news for the
    /// categories arrived since it, so that waiting for the head starts from a read that nothing
    /// arrived after, as a fresh read's would.
    async fn read(&mut self) -> Result<Vec<StoredMessage>, Trouble> {
        let at = self.cursor.at;
        let ahead = self.ahead.take();
        let (progress, categories) = (&self.shared.progress, &self.sub.plan.categories);
        let current =
            |a: &ReadAhead| !a.messages.is_empty() || !progress.news_for(categories, a.seen);
        if let Some(ahead) = ahead.filter(|a| a.after == at && current(a)) {
            return Ok(ahead.messages);
        }
        let read = self.next_read(self.cursor.at);
        let store = self.shared.store.clone();
        blocking(move || store.read_categories(&read.categories, read.after, read.limit))
            .await?
            .map_err(Trouble::store)
    }

    fn next_read(&self, after: u64) -> NextRead {
        NextRead {
            categories: self.sub.plan.categories.clone(),
            after,
            limit: self.sub.settings.messages_per_tick as usize,
        }
    }

    /// A batch of the messages held behind the released `key`, with the position where it is: they
    /// are behind it.
    async fn drain(&mut self, key: String) -> Result<Fetched, Trouble> {
        self.drained = true;
        // Its commit changes the parked keys, and a failure may mean another replica changed them.
        self.view.changed();
        let limit = self.sub.settings.messages_per_tick as usize;
        let (store, name, held) = (
            self.shared.store.clone(),
            self.name().to_owned(),
            key.clone(),
        );
        let messages = blocking(move || store.held_messages(&name, &held, limit))
            .await?
            .map_err(Trouble::store)?;
        tracing::info!(subscription = %self.name(), worker = self.reader.label(), key, messages = messages.len(), "handling the messages held behind a released key");
        self.in_flight = Some(InFlight::Drain(key.clone()));
        Ok(Fetched::Work(Work {
            messages,
            attempts: std::mem::take(&mut self.attempts),
            place: Place {
                position: None,
                worker: self.reader.worker,
                parking: Some(Parks::Drain(key)),
                fences: self.fences.clone(),
                ..Place::default()
            },
            read: 0,
        }))
    }

    /// Read to the head (past a waiting key, if any): wait for new messages or for its retry, no
    /// sooner. Ahead with no key waiting, only the position is behind: read again at once to move
    /// it. A released key whose held messages wait for a retry wakes it then too.
    async fn at_head(&mut self, head: u64) -> Fetched {
        self.mark.idle(&self.shared.store).await;
        let due = self
            .cursor
            .ahead()
            .then(|| {
                let now = self.shared.clock.now_ms();
                self.attempts.next_due().unwrap_or(now)
            })
            .or_else(|| {
                self.attempts
                    .next_due()
                    .filter(|_| self.view.parked().is_some())
            });
        let state = match due {
            Some(_) => State::Retrying,
            None => State::Idle { head },
        };
        Fetched::Nothing {
            state,
            wake: Wake::Head {
                poll: self.shared.config.poll_interval,
                due,
                categories: Some(self.sub.plan.categories.clone()),
            },
        }
    }
}

#[async_trait]
impl Source for Categories {
    fn label(&self) -> Option<&str> {
        self.reader.label()
    }

    fn report(&self, progress: &Progress, state: State) {
        self.reader.report(progress, state);
    }

    /// Load the reader's stored position (see [`workers::start`]), the failed attempts of the calls
    /// recorded and never settled, and whether its last owner died busy (see [`BusyMark`]).
    async fn open(&mut self) -> Result<(), Trouble> {
        let (store, reader) = (self.shared.store.clone(), self.reader.clone());
        let (position, mut recorded) = blocking(move || {
            let position = reader.stored_position(store.as_ref())?;
            let recorded = store.recorded_calls(&reader.subscription, None)?;
            Ok::<_, store::Error>((position, recorded))
        })
        .await?
        .map_err(Trouble::store)?;
        self.died_busy = self.mark.left_in(&mut recorded);
        self.attempts = Attempts::default();
        self.attempts.recover(recorded);
        self.cursor = Cursor::new(position);
        self.ahead = None;
        self.view.changed();
        if !std::mem::replace(&mut self.started, true) {
            tracing::info!(subscription = %self.name(), worker = self.reader.label(), categories = ?self.sub.plan.categories, position, "subscription started");
        }
        Ok(())
    }

    async fn own(&mut self) -> Owning {
        let (holding, fence) = hold(&self.shared, &self.lease, &mut self.taken).await;
        self.fences = fence.into_iter().collect();
        match holding {
            Holding::Yes => Owning::Yes,
            Holding::Taken => Owning::Taken,
            // Another replica runs this subscription: say whether it has left anything (test mode
            // must not end on a dead owner).
            Holding::No => Owning::No {
                state: standing_by(&self.shared, &self.sub, &self.reader).await,
                wait: self.shared.config.lease_ttl / 3,
            },
        }
    }

    async fn fetch(&mut self, head: u64, _: &CancellationToken) -> Result<Fetched, Trouble> {
        self.cursor
            .rewind_when_due(&mut self.attempts, self.shared.clock.now_ms());
        if self.view.due(self.shared.config.poll_interval) {
            let (store, name) = (self.shared.store.clone(), self.name().to_owned());
            let parked = blocking(move || Parked::load(store.as_ref(), &name))
                .await?
                .map_err(Trouble::store)?;
            self.view.update(&self.sub.plan.name, parked);
        }
        let released = self
            .view
            .parked()
            .and_then(|p| {
                let now = self.shared.clock.now_ms();
                p.drainable(&self.reader, &mut self.attempts, now)
            })
            .map(str::to_owned);
        if let Some(key) = released.clone().filter(|_| !self.drained) {
            return self.drain(key).await;
        }
        self.drained = false;
        let messages = self.read().await?;
        self.cursor.at_head = messages.is_empty();
        if self.cursor.at_head && released.is_some() {
            // A released key still holds messages: handle them without waiting.
            return Ok(Fetched::Again);
        }
        if self.cursor.at_head {
            return Ok(self.at_head(head).await);
        }
        self.mark.busy(&self.shared.store).await?;
        if std::mem::take(&mut self.died_busy) {
            // The last owner died handling these (or some of them): each is one failed attempt.
            let identities: Vec<String> = messages.iter().map(StoredMessage::identity).collect();
            self.attempts.suspect(identities.iter().map(String::as_str));
        }
        let last = messages
            .last()
            .map_or(self.cursor.at, |m| m.global_position);
        self.in_flight = Some(InFlight::Read { last });
        Ok(Fetched::Work(Work {
            read: messages.len(),
            messages,
            attempts: std::mem::take(&mut self.attempts),
            place: Place {
                position: (!self.cursor.ahead()).then(|| self.reader.position.clone()),
                worker: self.reader.worker,
                parking: self.view.parked().map(|p| Parks::Read(p.keys.clone())),
                fences: self.fences.clone(),
                then_read: Some(Box::new(self.next_read(last))),
                ..Place::default()
            },
        }))
    }

    async fn committed(&mut self, report: &Report, back: Back) -> Result<Settled, Trouble> {
        self.attempts = back.attempts;
        self.ahead = back.next;
        let retry = match self.in_flight.take() {
            Some(InFlight::Drain(key)) => {
                // A batch that failed as a whole (its commit kept conflicting, or an unordered handler
                // failed) waits out its delay like a key that failed, instead of being run again at once.
                if let (Some(delay), true) = (report.retry, report.waiting.is_empty()) {
                    self.attempts.wait(&key, delay, self.shared.clock.now_ms());
                }
                None
            }
            Some(InFlight::Read { last }) => {
                if !report.parked.is_empty() {
                    self.view.changed();
                }
                let worker = self.reader.worker.is_some();
                let whole = self.cursor.after(report, last, worker);
                // A single reader waits out a retry; a worker goes on with its other keys unless the
                // whole batch must be retried.
                report.retry.filter(|_| !worker || whole)
            }
            None => None,
        };
        Ok(Settled {
            retry,
            position: Some(self.cursor.position),
            acked: None,
        })
    }

    /// A hold refused as not parked any more, among others: read the parked keys again. A fence
    /// refused (another replica took the lease over) stands this reader by.
    async fn failed(&mut self, back: Back, error: store::Error) -> Option<Trouble> {
        self.attempts = back.attempts;
        self.in_flight = None;
        self.ahead = None;
        self.view.changed();
        if !matches!(
            &error,
            store::Error::Fenced {
                owned: Owned::Subscription(_),
                ..
            }
        ) {
            return Some(Trouble::store(error));
        }
        tracing::warn!(subscription = %self.name(), %error, "lease lost during a batch; standing by");
        if let Some(lease) = self.lease.lock().await.as_mut() {
            lease.held = None;
        }
        None
    }

    async fn close(&mut self) {
        self.mark.idle(&self.shared.store).await;
        tracing::info!(subscription = %self.name(), worker = self.reader.label(), position = self.cursor.position, "subscription stopped");
    }
}

/// Where a reader stands. A worker reads on past a key that waits for its retry (its position stays
/// before the key's message): `at` is where it reads from. When a retry is due it goes back to the
/// position, but only once it has read past where it was at the last such re-read (`mark`) or up to the
/// head: retries due sooner than a re-read takes must not keep it from ever reading further.
struct Cursor {
    position: u64,
    at: u64,
    mark: u64,
    at_head: bool,
}

impl Cursor {
    fn new(position: u64) -> Self {
        Self {
            position,
            at: position,
            mark: position,
            at_head: false,
        }
    }

    /// Whether it reads ahead of its position.
    fn ahead(&self) -> bool {
        self.at > self.position
    }

    /// Read again from the position (before every held message, so a released key's failed message
    /// is met before its later ones) once a retry is due.
    fn rewind_when_due(&mut self, attempts: &mut Attempts, now: i64) {
        let further = self.at > self.mark || self.at_head;
        if self.ahead() && further && attempts.next_due().is_none_or(|due| due <= now) {
            attempts.release_due(now);
            (self.mark, self.at) = (self.at, self.position);
        }
    }

    /// After a committed batch that read up to `last`: a batch that failed as a whole is read again,
    /// otherwise a worker reads on after it and a single reader from its position. Returns whether the
    /// batch failed as a whole.
    fn after(&mut self, report: &Report, last: u64, worker: bool) -> bool {
        self.position = report.position.unwrap_or(self.position);
        let whole = report.retry.is_some() && report.waiting.is_empty();
        self.at = match (worker, whole) {
            (true, false) => last,
            (true, true) => self.at,
            (false, _) => self.position,
        };
        whole
    }
}

/// Whether this replica holds the subscription's lease (always, without a keeper).
enum Holding {
    Yes,
    /// Taken since this reader last looked: it must reload its position.
    Taken,
    No,
}

/// Take or renew the shared lease when due, with the fence its commits carry; `seen` is the count of
/// takes this reader has seen.
async fn hold(
    shared: &Arc<Shared>,
    lease: &tokio::sync::Mutex<Option<Lease>>,
    seen: &mut u64,
) -> (Holding, Option<Fence>) {
    let mut guard = lease.lock().await;
    let Some(lease) = guard.as_mut() else {
        return (Holding::Yes, None);
    };
    let Some(held) = lease.keep(shared, shared.config.lease_ttl).await else {
        return (Holding::No, None);
    };
    let fence = Some(held.fence());
    if std::mem::replace(seen, lease.taken) != lease.taken {
        return (Holding::Taken, fence);
    }
    (Holding::Yes, fence)
}

/// When replicas share a store that keeps leases, or a broker, an event-store subscription runs on one
/// replica at a time: the one holding its lease, renewed at a third of its time to live. A replica that
/// dies loses the lease when it expires, and another takes over.
struct Lease {
    keeper: Arc<Keeper>,
    owned: Owned,
    owner: String,
    /// The lease, once taken and its fence raised.
    held: Option<ownership::Lease>,
    renewed: Option<Instant>,
    /// How many times this replica took it: each reader reloads its position after a take.
    taken: u64,
}

impl Lease {
    /// Take or renew the lease when due: the lease while this replica holds it.
    async fn keep(&mut self, shared: &Arc<Shared>, ttl: Duration) -> Option<&ownership::Lease> {
        if self.held.is_some() && self.renewed.is_some_and(|at| at.elapsed() < ttl / 3) {
            return self.held.as_ref();
        }
        let subscription = self.owned.subscription();
        let asked = match self.keeper.take(&self.owned, &self.owner, ttl).await {
            Ok(asked) => asked,
            Err(error) => {
                tracing::warn!(subscription, %error, "cannot reach the lease keeper to renew the lease; pausing");
                None
            }
        };
        let was_held = self.held.is_some();
        let fresh = asked.as_ref().map(|l| l.token) != self.held.as_ref().map(|l| l.token);
        self.held = match asked {
            Some(lease) if fresh => self.fence(shared, lease).await,
            asked => asked,
        };
        match (was_held, &self.held) {
            (false, Some(lease)) => {
                tracing::info!(subscription, owner = %self.owner, token = lease.token, "lease taken; this replica runs the subscription")
            }
            (true, None) => {
                tracing::warn!(subscription, owner = %self.owner, "lease lost; standing by")
            }
            _ => {}
        }
        self.taken += u64::from(fresh && self.held.is_some());
        self.renewed = self.held.as_ref().map(|_| Instant::now());
        self.held.as_ref()
    }

    /// Raise the store's fence to a lease just taken, before anything is read under it: the previous
    /// owner's commits are refused from then on. The lease, unless that failed (asked again next time).
    async fn fence(
        &self,
        shared: &Arc<Shared>,
        lease: ownership::Lease,
    ) -> Option<ownership::Lease> {
        match ownership::raise(shared.store.clone(), vec![lease.fence()]).await {
            Ok(()) => Some(lease),
            Err(error) => {
                tracing::warn!(subscription = lease.owned.subscription(), token = lease.token, %error, "cannot raise the fence of the lease just taken; standing by");
                None
            }
        }
    }

    /// Give the lease up on shutdown, so another replica takes over at once instead of after its time.
    async fn release(self) {
        if let Some(lease) = &self.held {
            let _ = self.keeper.release(lease).await;
        }
    }
}

/// The state of a reader whose subscription another replica runs: the lag after the stored position,
/// as far as the store can tell (unknown counts as not done).
async fn standing_by(shared: &Arc<Shared>, sub: &Arc<Subscription>, reader: &Reader) -> State {
    // Read first: a commit of this engine after it makes the lag measured below stale.
    let head = *shared.progress.head().borrow();
    let (shared, sub, reader) = (shared.clone(), sub.clone(), reader.clone());
    let lag = blocking(move || {
        let store = shared.store.as_ref();
        let position = reader.stored_position(store)?;
        store.count_after(&sub.plan.categories, position)
    })
    .await;
    State::StandingBy {
        lag: match lag {
            Ok(Ok(lag)) => lag,
            _ => u64::MAX,
        },
        head,
    }
}

/// The event-store kind: positions, lag and parked keys in the store; the broker, when there is one,
/// only names the replica holding its lease.
#[derive(Debug)]
pub(crate) struct EventStoreKind;

#[async_trait]
impl super::standing::Standing for EventStoreKind {
    fn label(&self) -> &'static str {
        "event_store"
    }

    async fn run(&self, task: Task) -> Result<(), String> {
        run(
            task.start.shared,
            task.sub,
            task.start.keeper,
            task.start.owner,
            task.stop,
        )
        .await
    }

    fn workers(&self, config: &crate::config::Config, plan: &super::SubscriptionPlan) -> u32 {
        workers::count(config, plan)
    }

    fn parks(&self, plan: &super::SubscriptionPlan) -> bool {
        crate::ordering::Ordering::of(plan).is_some_and(|o| o.park)
    }

    fn on_broker(&self) -> bool {
        false
    }

    async fn measure_broker(&self, broker: &dyn Broker, target: &Target, row: &mut Row) {
        match broker.lease_holder(&target.name).await {
            Ok(owner) => row.owner = owner,
            Err(e) => row.error = Some(e.to_string()),
        }
    }

    fn unattended(&self, row: &Row, broker_configured: bool) -> Option<&'static str> {
        (broker_configured && row.owner.is_none()).then_some("behind, no replica holds its lease")
    }
}

#[cfg(test)]
#[path = "event_store_tests.rs"]
mod tests;
