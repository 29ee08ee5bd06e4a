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

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{
    busy::BusyMark,
    parking::{self, Parked},
    workers::{self, Reader},
};

use crate::{
    broker::Broker,
    engine::{
        batch::{self, Attempts, Subscription},
        progress::State,
        Shared,
    },
    store::StoredMessage,
};

/// Run one subscription until `shutdown`. The batch in flight when it fires is finished and committed.
/// It runs on one replica at a time when the store keeps leases (preferred: the store fences a stale
/// owner's commits) or else when replicas share a broker; `owner` names this replica in either. An
/// ordered subscription runs as several workers under that one lease (see [`workers`]).
pub(crate) async fn run(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    broker: Option<Arc<dyn Broker>>,
    owner: String,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let name = sub.plan.name.clone();
    let keeper = match (shared.store.leases(), broker) {
        (Some(_), _) => Some(Keeper::Store),
        (None, Some(broker)) => Some(Keeper::Broker(broker)),
        (None, None) => None,
    };
    let lease = Arc::new(tokio::sync::Mutex::new(keeper.map(|keeper| Lease {
        keeper,
        owner,
        held: false,
        renewed: None,
        taken: 0,
    })));
    // A worker that fails stops its siblings, so the subscription ends and the engine sees the error.
    let stop = shutdown.child_token();
    let mut loops = JoinSet::new();
    for reader in Reader::all(&name, workers::count(&shared.config, &sub.plan, sub.kind)) {
        let (shared, sub, lease, stop) = (shared.clone(), sub.clone(), lease.clone(), stop.clone());
        loops.spawn(read(shared, sub, reader, lease, stop));
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
    if let Some(lease) = lease.lock().await.take().filter(|l| l.held) {
        lease.release(&shared, &name).await;
    }
    shared.progress.set(&name, State::Stopped);
    result
}

/// One reader of a subscription until `shutdown`: the only one, or one of its workers.
async fn read(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    reader: Reader,
    lease: Arc<tokio::sync::Mutex<Option<Lease>>>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let name = sub.plan.name.clone();
    let progress = &shared.progress;
    let mut mark = BusyMark::new(&name, &reader.position);
    let Some((position, mut attempts, mut died_busy)) =
        load(&shared, &reader, &mut mark, &shutdown).await?
    else {
        reader.report(progress, State::Stopped);
        return Ok(());
    };
    tracing::info!(subscription = %name, worker = reader.label(), categories = ?sub.plan.categories, position, "subscription started");
    let mut cursor = Cursor::new(position);
    let mut head = progress.head();
    let mut failures = 0u32;
    let mut taken = 0u64;
    let mut view = parking::View::of(&sub);
    // Held messages of a released key are handled every other round, so the other keys go on too.
    let mut drained = false;
    while !shutdown.is_cancelled() {
        match hold(&shared, &name, &lease, &mut taken).await {
            Holding::Yes => {}
            Holding::Taken => {
                // Another replica may have moved the position while this one stood by.
                match load(&shared, &reader, &mut mark, &shutdown).await? {
                    Some((stored, recovered, busy)) => {
                        cursor = Cursor::new(stored);
                        attempts = recovered;
                        died_busy = busy;
                    }
                    None => break,
                }
                view.changed();
            }
            Holding::No => {
                // Another replica runs this subscription: nothing to do here but wait for its lease to end,
                // and say whether that replica has left anything (test mode must not end on a dead owner).
                reader.report(progress, standing_by(&shared, &sub, &reader).await);
                tokio::select! {
                    _ = tokio::time::sleep(shared.config.lease_ttl / 3) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
        }
        cursor.rewind_when_due(&mut attempts, Instant::now());
        // The state stays what it was while reading: an idle subscription that re-reads is still idle
        // unless the read finds something.
        let seen = *head.borrow_and_update();
        if view.due(shared.config.poll_interval) {
            match load_parked(&shared, &sub).await? {
                Ok(parked) => view.update(&name, parked),
                Err(error) => {
                    failures += 1;
                    backoff(&name, &error, failures, &shutdown).await;
                    continue;
                }
            }
        }
        let released = view
            .parked()
            .and_then(|p| p.drainable(&reader, &mut attempts))
            .map(str::to_owned);
        if let Some(key) = released.clone().filter(|_| !drained) {
            drained = true;
            reader.report(progress, State::Busy);
            let started = Instant::now();
            let (outcome, returned) = drain(&shared, &sub, &reader, key, attempts).await?;
            attempts = returned;
            view.changed();
            if let Some(report) = settled(&name, outcome, &lease, &mut failures, &shutdown).await {
                committed(&shared, &sub, &reader, report, 0, cursor.position, started);
            }
            continue;
        }
        drained = false;
        let fetched = fetch(&shared, &sub, cursor.at).await?;
        let messages = match fetched {
            Ok(messages) => messages,
            Err(error) => {
                failures += 1;
                backoff(&name, &error, failures, &shutdown).await;
                continue;
            }
        };
        cursor.at_head = messages.is_empty();
        if cursor.at_head && released.is_some() {
            // A released key still holds messages: handle them without waiting.
            continue;
        }
        if cursor.at_head {
            mark.idle(&shared.store).await;
            // Read to the head past a waiting key: wait for new messages or for its retry, no sooner.
            // Ahead with no key waiting, only the position is behind: read again at once to move it.
            // A released key whose held messages wait for a retry wakes it then too.
            let due = cursor
                .ahead()
                .then(|| attempts.next_due().unwrap_or_else(Instant::now))
                .or_else(|| attempts.next_due().filter(|_| view.parked().is_some()));
            let state = match due {
                Some(_) => State::Retrying,
                None => State::Idle { head: seen },
            };
            reader.report(progress, state);
            tokio::select! {
                _ = head.changed() => {}
                _ = tokio::time::sleep(shared.config.poll_interval) => {}
                _ = sleep_until(due) => {}
                _ = shutdown.cancelled() => break,
            }
            continue;
        }
        if let Err(error) = mark.busy(&shared.store).await {
            failures += 1;
            backoff(&name, &error, failures, &shutdown).await;
            continue;
        }
        if std::mem::take(&mut died_busy) {
            // The last owner died handling these (or some of them): each is one failed attempt.
            let identities: Vec<String> = messages.iter().map(StoredMessage::identity).collect();
            attempts.suspect(identities.iter().map(String::as_str));
        }
        reader.report(progress, State::Busy);
        let started = Instant::now();
        let count = messages.len();
        let last = messages.last().map_or(cursor.at, |m| m.global_position);
        let stored = (!cursor.ahead()).then_some(reader.position.as_str());
        let parked = view.parked().map(|p| p.keys.clone());
        let (outcome, returned) =
            process(&shared, &sub, &reader, (stored, parked), messages, attempts).await?;
        attempts = returned;
        let Some(report) = settled(&name, outcome, &lease, &mut failures, &shutdown).await else {
            // A hold refused as not parked any more, among others: read the parked keys again.
            view.changed();
            continue;
        };
        if !report.parked.is_empty() {
            view.changed();
        }
        let whole = cursor.after(&report, last, reader.worker.is_some());
        // A single reader waits out a retry; a worker goes on with its other keys unless the whole
        // batch must be retried.
        let delay = report.retry.filter(|_| reader.worker.is_none() || whole);
        committed(
            &shared,
            &sub,
            &reader,
            report,
            count,
            cursor.position,
            started,
        );
        if let Some(delay) = delay {
            reader.report(progress, State::Retrying);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => break,
            }
        }
    }
    mark.idle(&shared.store).await;
    reader.report(progress, State::Stopped);
    tracing::info!(subscription = %name, worker = reader.label(), position = cursor.position, "subscription stopped");
    Ok(())
}

/// The report of a batch that committed. Else None: the lease was lost while it ran (its commit was
/// refused: stand by) or the store failed (after a backoff).
async fn settled(
    name: &str,
    outcome: Result<batch::Report, crate::store::Error>,
    lease: &tokio::sync::Mutex<Option<Lease>>,
    failures: &mut u32,
    shutdown: &CancellationToken,
) -> Option<batch::Report> {
    match outcome {
        Ok(report) => {
            *failures = 0;
            Some(report)
        }
        Err(error @ crate::store::Error::LeaseLost { .. }) => {
            tracing::warn!(subscription = %name, %error, "lease lost during a batch; standing by");
            if let Some(lease) = lease.lock().await.as_mut() {
                lease.held = false;
            }
            None
        }
        Err(error) => {
            *failures += 1;
            backoff(name, &error.to_string(), *failures, shutdown).await;
            None
        }
    }
}

/// Count, measure and log a committed batch of `read` messages.
fn committed(
    shared: &Shared,
    sub: &Subscription,
    reader: &Reader,
    report: batch::Report,
    read: usize,
    position: u64,
    started: Instant,
) {
    let name = &sub.plan.name;
    shared.metrics.batch(sub, &report, started.elapsed());
    if let Some(appended) = report.appended {
        shared.progress.advanced(appended);
    }
    for key in &report.parked {
        tracing::warn!(subscription = %name, worker = reader.label(), %key, "key parked: its later messages are held until its dead letter is replayed (`dlq replay`) or purged (`dlq purge`)");
    }
    tracing::info!(
        subscription = %name,
        worker = reader.label(),
        read,
        handled = report.handled.len(),
        dead_lettered = report.dead_lettered,
        skipped = report.skipped,
        held = report.held,
        written = report.written.len(),
        position,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "batch committed"
    );
    tracing::debug!(subscription = %name, position, "position updated");
    shared.progress.tally(report);
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
    fn rewind_when_due(&mut self, attempts: &mut Attempts, now: Instant) {
        let further = self.at > self.mark || self.at_head;
        if self.ahead() && further && attempts.next_due().is_none_or(|due| due <= now) {
            attempts.release_due(now);
            (self.mark, self.at) = (self.at, self.position);
        }
    }

    /// After a committed batch that read up to `last`: a batch that failed as a whole is read again,
    /// otherwise a worker reads on after it and a single reader from its position. Returns whether the
    /// batch failed as a whole.
    fn after(&mut self, report: &batch::Report, last: u64, worker: bool) -> bool {
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

/// The reader's stored position (see [`workers::start`]), the failed attempts of the calls recorded and
/// never settled, and whether its last owner died busy (see [`BusyMark`]), retried with backoff; None
/// on shutdown.
async fn load(
    shared: &Arc<Shared>,
    reader: &Reader,
    mark: &mut BusyMark,
    shutdown: &CancellationToken,
) -> Result<Option<(u64, Attempts, bool)>, String> {
    let mut failures = 0u32;
    loop {
        let (store, reader2) = (shared.store.clone(), reader.clone());
        let stored = blocking(move || {
            let position = reader2.stored_position(store.as_ref())?;
            let recorded = store.recorded_calls(&reader2.subscription, None)?;
            Ok::<_, crate::store::Error>((position, recorded))
        })
        .await?;
        match stored {
            Ok((position, mut recorded)) => {
                let died_busy = mark.left_in(&mut recorded);
                let mut attempts = Attempts::default();
                attempts.recover(recorded);
                return Ok(Some((position, attempts, died_busy)));
            }
            Err(error) => {
                failures += 1;
                if !backoff(&reader.subscription, &error.to_string(), failures, shutdown).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Sleep until `due`, or forever without one.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

/// Whether this replica holds the subscription's lease (always, without a keeper).
enum Holding {
    Yes,
    /// Taken since this reader last looked: it must reload its position.
    Taken,
    No,
}

/// Take or renew the shared lease when due; `seen` is the count of takes this reader has seen.
async fn hold(
    shared: &Arc<Shared>,
    subscription: &str,
    lease: &tokio::sync::Mutex<Option<Lease>>,
    seen: &mut u64,
) -> Holding {
    let mut guard = lease.lock().await;
    let Some(lease) = guard.as_mut() else {
        return Holding::Yes;
    };
    if !lease
        .keep(shared, subscription, shared.config.lease_ttl)
        .await
    {
        return Holding::No;
    }
    if std::mem::replace(seen, lease.taken) != lease.taken {
        return Holding::Taken;
    }
    Holding::Yes
}

/// When replicas share a store that keeps leases, or a broker, an event-store subscription runs on one
/// replica at a time: the one holding its lease, renewed at a third of its time to live. A replica that
/// dies loses the lease when it expires, and another takes over.
struct Lease {
    keeper: Keeper,
    owner: String,
    held: bool,
    renewed: Option<std::time::Instant>,
    /// How many times this replica took it: each reader reloads its position after a take.
    taken: u64,
}

/// Who keeps the leases.
enum Keeper {
    /// The store (`Store::leases`), called on the blocking pool like every store call.
    Store,
    Broker(Arc<dyn Broker>),
}

impl Lease {
    /// Take or renew the lease when due; whether this replica holds it.
    async fn keep(&mut self, shared: &Arc<Shared>, subscription: &str, ttl: Duration) -> bool {
        if self.held && self.renewed.is_some_and(|at| at.elapsed() < ttl / 3) {
            return true;
        }
        let held = match self.ask(shared, subscription, ttl).await {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(subscription, %error, "cannot reach the lease keeper to renew the lease; pausing");
                false
            }
        };
        let was_held = self.held;
        match (self.held, held) {
            (false, true) => {
                tracing::info!(subscription, owner = %self.owner, "lease taken; this replica runs the subscription")
            }
            (true, false) => {
                tracing::warn!(subscription, owner = %self.owner, "lease lost; standing by")
            }
            _ => {}
        }
        self.held = held;
        self.taken += u64::from(held && !was_held);
        self.renewed = held.then(std::time::Instant::now);
        held
    }

    async fn ask(
        &self,
        shared: &Arc<Shared>,
        subscription: &str,
        ttl: Duration,
    ) -> Result<bool, String> {
        match &self.keeper {
            Keeper::Broker(broker) => broker
                .lease(subscription, &self.owner, ttl)
                .await
                .map_err(|e| e.to_string()),
            Keeper::Store => {
                let (store, name, owner) = (
                    shared.store.clone(),
                    subscription.to_owned(),
                    self.owner.clone(),
                );
                blocking(move || match store.leases() {
                    Some(leases) => leases.take(&name, &owner, ttl).map_err(|e| e.to_string()),
                    None => Err("the store keeps no leases".to_owned()),
                })
                .await?
            }
        }
    }

    /// Give the lease up on shutdown, so another replica takes over at once instead of after its time.
    async fn release(self, shared: &Arc<Shared>, subscription: &str) {
        match self.keeper {
            Keeper::Broker(broker) => {
                let _ = broker.release(subscription, &self.owner).await;
            }
            Keeper::Store => {
                let (store, name) = (shared.store.clone(), subscription.to_owned());
                let _ =
                    blocking(move || store.leases().map(|l| l.release(&name, &self.owner))).await;
            }
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

async fn fetch(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
    after: u64,
) -> Result<Result<Vec<StoredMessage>, String>, String> {
    let (shared, sub) = (shared.clone(), sub.clone());
    blocking(move || {
        let limit = sub.settings.messages_per_tick as usize;
        shared
            .store
            .read_categories(&sub.plan.categories, after, limit)
            .map_err(|e| e.to_string())
    })
    .await
}

type Processed = (Result<batch::Report, crate::store::Error>, Attempts);

/// The parked keys of the subscription (see [`parking`]).
async fn load_parked(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
) -> Result<Result<Parked, String>, String> {
    let (shared, sub) = (shared.clone(), sub.clone());
    blocking(move || Parked::load(shared.store.as_ref(), &sub.plan.name).map_err(|e| e.to_string()))
        .await
}

/// Handle a batch of the messages held behind the released `key`.
async fn drain(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
    reader: &Reader,
    key: String,
    mut attempts: Attempts,
) -> Result<Processed, String> {
    let (shared, sub, reader) = (shared.clone(), sub.clone(), reader.clone());
    blocking(move || {
        let outcome = parking::drain(&shared, &sub, &reader, &key, &mut attempts);
        (outcome, attempts)
    })
    .await
}

/// Where the batch stores its position (None while reading ahead of it), and the parked keys.
type Placing<'a> = (Option<&'a str>, Option<Arc<HashMap<String, u64>>>);

async fn process(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
    reader: &Reader,
    (stored, parked): Placing<'_>,
    messages: Vec<StoredMessage>,
    mut attempts: Attempts,
) -> Result<Processed, String> {
    let (shared, sub) = (shared.clone(), sub.clone());
    let (stored, worker) = (stored.map(str::to_owned), reader.worker);
    blocking(move || {
        let plugin = shared.plugin();
        let ctx = batch::Context {
            position: stored.as_deref(),
            worker,
            parking: parked.as_deref().map(parking::Parking::Read),
            ..batch::Context::new(&shared, &plugin, &sub)
        };
        let outcome = batch::run(&ctx, &messages, &mut attempts);
        (outcome, attempts)
    })
    .await
}

/// Run store and plugin work on the blocking pool. A panic there is fatal for the engine.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("a batch task failed: {e}"))
}

/// Wait after a store failure: 1, 2, 4 ... 30 s, cut short by shutdown. Returns false on shutdown.
pub(crate) async fn backoff(
    subscription: &str,
    error: &str,
    failures: u32,
    shutdown: &CancellationToken,
) -> bool {
    let delay =
        Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(30));
    tracing::error!(
        subscription,
        error,
        failures,
        retry_in_s = delay.as_secs(),
        "store unavailable; will retry"
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.cancelled() => false,
    }
}

#[cfg(test)]
#[path = "event_store_tests.rs"]
mod tests;
