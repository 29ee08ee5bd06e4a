//! The subscription loop, written once: open, read, run the batch, settle, back off, report.
//!
//! Every subscription kind is a [`Source`]: it knows where its messages come from, who owns them,
//! where its position, fences and dead letters go, and what to do once a batch committed (acknowledge
//! entries, move a cursor). The loop owns the rest, the same for every kind: the backoff after an
//! outage (naming the component that failed), the progress states test mode and readiness read, the
//! blocking call of [`batch::run`] (overlapped with whatever the source reads meanwhile), the metrics
//! and the one "batch committed" line.
//!
//! Invariant: a source is only asked for more after the batch it handed over was settled (committed,
//! or failed as a whole and handed back), so a source never has two batches in flight.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    clock,
    engine::{
        arrivals::Seen,
        batch::{self, Attempts, Origin, Record, Report, Subscription, Worker},
        progress::{Progress, State},
        timings::{self, Phase, Spent},
        Shared,
    },
    store::{self, StoredMessage},
    subscription::parking::Parking,
    unit_of_work::Fence,
};

/// A part the engine depends on that did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Component {
    Store,
    Broker,
    /// The store's outbox, as the outbox processor claims from it.
    Outbox,
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Component::Store => "store",
            Component::Broker => "broker",
            Component::Outbox => "outbox",
        })
    }
}

/// Why a source cannot go on now.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Trouble {
    /// Retried after a backoff.
    #[error("{component} unavailable: {error}")]
    Unavailable { component: Component, error: String },
    /// Ends the subscription, and the engine with it.
    #[error("{0}")]
    Fatal(String),
}

impl Trouble {
    pub(crate) fn store(error: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            component: Component::Store,
            error: error.to_string(),
        }
    }

    pub(crate) fn broker(error: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            component: Component::Broker,
            error: error.to_string(),
        }
    }
}

impl From<crate::ownership::Error> for Trouble {
    fn from(error: crate::ownership::Error) -> Self {
        use crate::ownership::Error;
        match error {
            Error::Store(error) => Self::store(error),
            Error::Broker(error) => Self::broker(error),
            Error::Blocking(error) => Self::Fatal(error),
        }
    }
}

impl From<Fatal> for Trouble {
    fn from(Fatal(error): Fatal) -> Self {
        Self::Fatal(error)
    }
}

/// A failure that ends the engine (a task of the blocking pool panicked).
#[derive(Debug)]
pub(crate) struct Fatal(pub(crate) String);

/// Whether this replica owns the source's work now.
pub(crate) enum Owning {
    Yes,
    /// Taken since the source last looked: it must be opened again (another owner may have moved on).
    Taken,
    /// Another replica owns it (or nothing is this replica's now): report `state`, look again after
    /// `wait`.
    No {
        state: State,
        wait: Duration,
    },
}

/// What a fetch found.
pub(crate) enum Fetched {
    Work(Work),
    /// Nothing now: report `state`, then wait as `wake` says.
    Nothing {
        state: State,
        wake: Wake,
    },
    /// Fetch again at once (the source has more to do before it can be idle).
    Again,
    /// Shutdown came while reading.
    Stop,
}

/// How long an idle source waits before it fetches again.
pub(crate) enum Wake {
    /// At once: its read waited already.
    Now,
    /// When the engine's head moves, after `poll` (writers in other processes), or at `due`.
    Head {
        poll: Duration,
        /// In milliseconds on the engine's clock.
        due: Option<i64>,
        /// The categories it reads: a move that appended to none of them leaves it waiting. Every
        /// move wakes a source without.
        categories: Option<Vec<String>>,
    },
}

/// A source idle at the head, waiting for news.
struct Idle<'a> {
    /// Its categories, when a move of the head that appended to none of them leaves it idle.
    categories: Option<&'a [String]>,
    /// What it knew when its read found nothing.
    seen: Seen,
}

impl Idle<'_> {
    /// Until the head moves with news for it: each move without any leaves it idle at the new head,
    /// as if it had read there (its categories have nothing the move appended).
    async fn arrive(
        mut self,
        head: &mut watch::Receiver<u64>,
        source: &mut impl Source,
        progress: &Progress,
    ) {
        loop {
            if head.changed().await.is_err() {
                return;
            }
            let Some(categories) = self.categories else {
                return;
            };
            if !progress.nothing_for(categories, &mut self.seen, head) {
                return;
            }
            source.report(
                progress,
                State::Idle {
                    head: self.seen.head,
                },
            );
        }
    }
}

/// A batch to run, and where its effects go.
pub(crate) struct Work {
    pub(crate) messages: Vec<StoredMessage>,
    /// The failed attempts the source keeps; handed back after the batch.
    pub(crate) attempts: Attempts,
    pub(crate) place: Place,
    /// How many messages were read for it (a drain of held messages reads none), for the log.
    pub(crate) read: usize,
}

/// Where a batch's position, fences, parked keys and dead letters go, and whose keys it handles
/// (see [`batch::Context`]).
#[derive(Default)]
pub(crate) struct Place {
    /// The name the position is stored under; None when the source keeps no position in the store,
    /// or must not move it.
    pub(crate) position: Option<String>,
    pub(crate) worker: Option<Worker>,
    pub(crate) parking: Option<Parks>,
    pub(crate) origin: Origin,
    /// Every message was read from the broker for the first time: no redelivery, no reclaimed entry
    /// (see [`batch::Context::first_delivery`]).
    pub(crate) first_delivery: bool,
    /// Checked by the store on commit: the leases the batch's messages are owned under.
    pub(crate) fences: Vec<Fence>,
    /// The messages' ordering keys, when the source worked them out already.
    pub(crate) keys: Option<Vec<String>>,
    pub(crate) record: Record,
    /// Read these next, on a blocking thread of their own while the batch runs and commits: under load
    /// the next batch is then ready when the commit is (see [`Back::next`]). A read made before the
    /// commit is as good as one made after it: it starts after the batch's last message, and the
    /// source takes it only if its position is still there.
    pub(crate) then_read: Option<Box<NextRead>>,
}

/// A read of the store's categories after a global position.
#[derive(Debug, Clone)]
pub(crate) struct NextRead {
    pub(crate) categories: Vec<String>,
    pub(crate) after: u64,
    pub(crate) limit: usize,
}

/// Messages read ahead ([`Place::then_read`]), with the position they were read after and what the
/// engine knew just before the read (an empty read-ahead is as good as a fresh read until news for
/// its categories arrives).
#[derive(Debug)]
pub(crate) struct ReadAhead {
    pub(crate) after: u64,
    pub(crate) seen: Seen,
    pub(crate) messages: Vec<StoredMessage>,
}

/// [`Parking`], owned by a batch that crosses to the blocking pool.
pub(crate) enum Parks {
    Read(Arc<std::collections::HashMap<String, u64>>),
    Drain(String),
}

impl Parks {
    fn borrow(&self) -> Parking<'_> {
        match self {
            Parks::Read(keys) => Parking::Read(keys),
            Parks::Drain(key) => Parking::Drain(key),
        }
    }
}

/// A batch handed back to its source after it ran.
pub(crate) struct Back {
    pub(crate) messages: Vec<StoredMessage>,
    pub(crate) attempts: Attempts,
    /// What [`Place::then_read`] asked for, when the batch committed and the read succeeded (a failed
    /// read is simply done again by the next fetch).
    pub(crate) next: Option<ReadAhead>,
}

/// What a source did with a committed batch.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// Wait this long before fetching again (a message waits for its retry).
    pub(crate) retry: Option<Duration>,
    /// The source's position after it, for the log.
    pub(crate) position: Option<u64>,
    /// Broker entries acknowledged, for the log.
    pub(crate) acked: Option<usize>,
}

/// One subscription kind. Implementations live in `subscription/*`; `Runner::spawn` opens them.
#[async_trait]
pub(crate) trait Source: Send {
    /// The reader's label in logs (a worker's position name), if it is one of several.
    fn label(&self) -> Option<&str> {
        None
    }

    /// Report this reader's state (a worker's state counts towards its subscription's).
    fn report(&self, progress: &Progress, state: State);

    /// Connect, or load where it stands; called again after [`Owning::Taken`].
    async fn open(&mut self) -> Result<(), Trouble>;

    /// Whether it reads on: by default until shutdown.
    fn reading(&self, shutdown: &CancellationToken) -> bool {
        !shutdown.is_cancelled()
    }

    /// Whether this replica owns the work now (always, unless it is leased).
    async fn own(&mut self) -> Owning {
        Owning::Yes
    }

    /// The next batch; `head` is the engine's head when the fetch began.
    async fn fetch(&mut self, head: u64, shutdown: &CancellationToken) -> Result<Fetched, Trouble>;

    /// While the batch runs: read on (the next batch comes sooner).
    async fn meanwhile(&mut self, _shutdown: &CancellationToken) {}

    /// The batch committed: settle what the store does not (acknowledgements, cursors).
    async fn committed(&mut self, report: &Report, back: Back) -> Result<Settled, Trouble>;

    /// The store refused the batch with `error`: nothing of it committed. What to wait out, if
    /// anything (a refusal because another replica owns the work now is no outage).
    async fn failed(&mut self, back: Back, error: store::Error) -> Option<Trouble>;

    /// Stopping: give back what it holds.
    async fn close(&mut self);
}

/// Run `source` of `sub` until `shutdown`. The batch in flight when it fires is finished and committed.
pub(crate) async fn run(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    mut source: impl Source,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let progress = &shared.progress;
    let mut backoff = Backoff::new(&sub.plan.name);
    let mut clocked = Clocked::new(&shared, &sub.plan.name);
    if open(&mut source, &mut backoff, &shutdown).await? {
        let mut head = progress.head();
        while source.reading(&shutdown) {
            clocked.flush();
            let owning = source.own().await;
            clocked.charge(Phase::Lease);
            match owning {
                Owning::Yes => {}
                Owning::Taken => {
                    if !open(&mut source, &mut backoff, &shutdown).await? {
                        break;
                    }
                    clocked.charge(Phase::Lease);
                }
                Owning::No { state, wait } => {
                    source.report(progress, state);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    clocked.charge(Phase::Idle);
                    continue;
                }
            }
            // The state stays what it was while reading: an idle subscription that re-reads is still
            // idle unless the read finds something.
            let seen = progress.seen(&mut head);
            let fetched = source.fetch(seen.head, &shutdown).await;
            clocked.charge(Phase::Read);
            let work = match fetched {
                Ok(Fetched::Work(work)) => work,
                Ok(Fetched::Again) => continue,
                Ok(Fetched::Stop) => break,
                Ok(Fetched::Nothing { state, wake }) => {
                    backoff.reset();
                    let Wake::Head {
                        poll,
                        due,
                        categories,
                    } = wake
                    else {
                        source.report(progress, state);
                        continue;
                    };
                    // Registered before the state is reported: see `clock::Woken`.
                    let due = due.map(|at| shared.clock.sleep_until(at));
                    let idle = matches!(state, State::Idle { .. });
                    source.report(progress, state);
                    let news = Idle {
                        categories: categories.as_deref().filter(|_| idle),
                        seen,
                    };
                    tokio::select! {
                        _ = news.arrive(&mut head, &mut source, progress) => {}
                        _ = tokio::time::sleep(poll) => {}
                        woken = clock::until(due) => {
                            source.report(progress, State::Busy);
                            drop(woken);
                        }
                        _ = shutdown.cancelled() => break,
                    }
                    clocked.charge(Phase::Idle);
                    continue;
                }
                Err(trouble) => {
                    backoff.wait(trouble, &shutdown).await?;
                    clocked.charge(Phase::Idle);
                    continue;
                }
            };
            source.report(progress, State::Busy);
            let started = Instant::now();
            let read = work.read;
            let (outcome, back, spent) =
                handle(&shared, &sub, &mut source, work, &shutdown).await?;
            clocked.add(&spent);
            clocked.charge(Phase::Engine);
            let report = match outcome {
                Ok(report) => report,
                Err(error) => {
                    let trouble = source.failed(back, error).await;
                    clocked.charge(Phase::Settle);
                    if let Some(trouble) = trouble {
                        backoff.wait(trouble, &shutdown).await?;
                        clocked.charge(Phase::Idle);
                    }
                    continue;
                }
            };
            let settled = source.committed(&report, back).await;
            clocked.charge(Phase::Settle);
            let settled = match settled {
                Ok(settled) => settled,
                Err(trouble) => {
                    backoff.wait(trouble, &shutdown).await?;
                    clocked.charge(Phase::Idle);
                    continue;
                }
            };
            backoff.reset();
            committed(
                &shared,
                &sub,
                source.label(),
                report,
                read,
                &settled,
                started,
            );
            if let Some(delay) = settled.retry {
                let wait = shared.clock.sleep(delay);
                source.report(progress, State::Retrying);
                tokio::select! {
                    woken = wait => {
                        source.report(progress, State::Busy);
                        drop(woken);
                    }
                    _ = shutdown.cancelled() => break,
                }
                clocked.charge(Phase::Idle);
            }
        }
        source.close().await;
    }
    clocked.flush();
    source.report(progress, State::Stopped);
    Ok(())
}

/// Open `source`, retried with backoff; false on shutdown.
async fn open(
    source: &mut impl Source,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> Result<bool, String> {
    loop {
        match source.open().await {
            Ok(()) => return Ok(true),
            Err(trouble) => {
                if !backoff.wait(trouble, shutdown).await? {
                    return Ok(false);
                }
            }
        }
    }
}

/// The loop's time, charged to the phase it was in (see [`timings`]) and handed to the engine's
/// timings once per round.
struct Clocked<'a> {
    shared: &'a Shared,
    name: &'a str,
    spent: Spent,
    since: Instant,
    /// Time since the last charge that [`Clocked::add`] accounted for already.
    accounted: Duration,
}

impl<'a> Clocked<'a> {
    fn new(shared: &'a Shared, name: &'a str) -> Self {
        Self {
            shared,
            name,
            spent: Spent::default(),
            since: Instant::now(),
            accounted: Duration::ZERO,
        }
    }

    /// The time since the last charge went to `phase`, less what was accounted for meanwhile.
    fn charge(&mut self, phase: Phase) {
        let now = Instant::now();
        let elapsed = (now - self.since).saturating_sub(self.accounted);
        self.spent.add(phase, elapsed);
        (self.since, self.accounted) = (now, Duration::ZERO);
    }

    /// Time measured elsewhere (the batch's blocking thread), by phase.
    fn add(&mut self, spent: &Spent) {
        self.spent.absorb(spent);
        self.accounted += spent.total();
    }

    fn flush(&mut self) {
        if !self.spent.total().is_zero() {
            self.shared
                .spend(self.name, &std::mem::take(&mut self.spent));
        }
    }
}

type Outcome = (store::Result<Report>, Back, Spent);

/// Run the batch on the blocking pool while the source reads on (and the next read of
/// [`Place::then_read`] runs beside it); what it returned, and the blocking thread's time by phase.
async fn handle(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
    source: &mut impl Source,
    work: Work,
    shutdown: &CancellationToken,
) -> Result<Outcome, String> {
    let Work {
        messages,
        mut attempts,
        mut place,
        ..
    } = work;
    // A process manager's loop is never idle under load: read after its commit, its next batch took
    // a quarter of the loop's time on PostgreSQL; beside it, 1-6% (journal, 25th session).
    let ahead = place.then_read.take().map(|read| {
        let shared = shared.clone();
        blocking(move || read_ahead(&shared, *read))
    });
    let (shared, sub) = (shared.clone(), sub.clone());
    let batch = blocking(move || {
        timings::measure(Phase::Engine, || {
            let plugin = shared.plugin();
            let defaults = batch::Context::new(&shared, &plugin, &sub);
            let ctx = batch::Context {
                position: place.position.as_deref(),
                worker: place.worker,
                parking: place.parking.as_ref().map(Parks::borrow),
                origin: place.origin,
                first_delivery: place.first_delivery,
                fences: place.fences,
                keys: place.keys.as_deref(),
                record: place.record,
                ..defaults
            };
            let outcome = batch::run(&ctx, &messages, &mut attempts);
            let back = Back {
                messages,
                attempts,
                next: None,
            };
            (outcome, back)
        })
    });
    // A read ahead that outlasts the batch is time spent reading, not the engine's.
    let batch = async { (batch.await, Instant::now()) };
    let read = async {
        source.meanwhile(shutdown).await;
        let next = match ahead {
            Some(ahead) => ahead.await?,
            None => None,
        };
        Ok::<_, Fatal>((next, Instant::now()))
    };
    let ((batch, ran), read) = tokio::join!(batch, read);
    let ((outcome, mut back), mut spent) = batch?;
    let (next, read) = read?;
    spent.add(Phase::Read, read.saturating_duration_since(ran));
    back.next = next.filter(|_| outcome.is_ok());
    Ok((outcome, back, spent))
}

/// On a blocking thread of its own, unmeasured: what outlasts the batch is charged to reading by
/// [`handle`].
fn read_ahead(shared: &Shared, read: NextRead) -> Option<ReadAhead> {
    let seen = shared.progress.seen_now();
    let messages = shared
        .store
        .read_categories(&read.categories, read.after, read.limit)
        .ok()?;
    Some(ReadAhead {
        after: read.after,
        seen,
        messages,
    })
}

/// Count, measure and log a committed batch of `read` messages.
fn committed(
    shared: &Shared,
    sub: &Subscription,
    worker: Option<&str>,
    report: Report,
    read: usize,
    settled: &Settled,
    started: Instant,
) {
    let name = &sub.plan.name;
    shared.metrics.batch(sub, &report, started.elapsed());
    if let Some(appended) = report.appended {
        shared.progress.appended(appended);
    }
    if let Some(due) = report.earliest_due {
        shared.scheduler_alarm.set(due);
    }
    for key in &report.parked {
        tracing::warn!(subscription = %name, worker, %key, "key parked: its later messages are held until its dead letter is replayed (`dlq replay`) or purged (`dlq purge`)");
    }
    tracing::info!(
        subscription = %name,
        worker,
        read,
        handled = report.handled.len(),
        dead_lettered = report.dead_lettered,
        skipped = report.skipped,
        held = report.held,
        waiting = report.waiting.len(),
        parked = report.parked.len(),
        written = report.written.len(),
        position = settled.position,
        acked = settled.acked,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "batch committed"
    );
    shared.progress.tally(report);
}

/// The wait after a component failed: 1, 2, 4 ... 30 s while it keeps failing, cut short by shutdown.
#[derive(Debug)]
pub(crate) struct Backoff {
    /// Who waits, for the log.
    name: String,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            failures: 0,
        }
    }

    /// The component answered: the next failure waits the shortest time again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// The wait after the next failure.
    fn delay(&self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(5);
        Duration::from_secs(1u64 << doublings).min(Duration::from_secs(30))
    }

    /// Wait out `trouble`: Ok(false) on shutdown; a fatal one is returned as the error.
    pub(crate) async fn wait(
        &mut self,
        trouble: Trouble,
        shutdown: &CancellationToken,
    ) -> Result<bool, String> {
        let (component, error) = match trouble {
            Trouble::Unavailable { component, error } => (component, error),
            Trouble::Fatal(error) => return Err(error),
        };
        self.failures += 1;
        let delay = self.delay();
        tracing::error!(
            subscription = %self.name,
            %component,
            %error,
            failures = self.failures,
            retry_in_s = delay.as_secs(),
            "{component} unavailable; will retry"
        );
        Ok(tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shutdown.cancelled() => false,
        })
    }
}

/// Run store and plugin work on the blocking pool. A panic there is fatal for the engine.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Fatal> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Fatal(format!("a blocking task failed: {e}")))
}

/// Run `f` on the blocking pool for a caller that has no error to give (a read-ahead's decode, so
/// that the runtime's thread reads on meanwhile): a panic there is resumed here, and a runtime that is
/// stopping gives the default (what was read ahead stays pending, and is read again).
pub(crate) async fn blocking_or_default<T: Default + Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(done) => done,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => T::default(),
    }
}

impl From<Fatal> for String {
    fn from(Fatal(error): Fatal) -> Self {
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_thirty_seconds_and_starts_over_after_a_success() {
        let mut backoff = Backoff::new("s");
        let mut delays = Vec::new();
        for _ in 0..8 {
            backoff.failures += 1;
            delays.push(backoff.delay().as_secs());
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        backoff.reset();
        backoff.failures += 1;
        assert_eq!(backoff.delay(), Duration::from_secs(1));
    }

    #[test]
    fn a_failure_names_its_component() {
        let trouble = Trouble::broker("connection refused");
        assert_eq!(
            trouble.to_string(),
            "broker unavailable: connection refused"
        );
        assert_eq!(
            Trouble::store("locked").to_string(),
            "store unavailable: locked"
        );
        assert_eq!(Component::Outbox.to_string(), "outbox");
    }
}
