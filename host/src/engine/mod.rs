//! The engine: runs a domain's subscriptions until it is stopped, or, in test mode, until nothing is left
//! to do.
//!
//! The path of one message: a subscription reads a batch from the store; [`batch`] routes each message
//! to its handler, calls the plugin on a blocking thread, and commits the handler's writes with the
//! processed markers and the new position as one unit of work; the events it appended wake the other
//! subscriptions (the cascade).
//!
//! Lifecycle (owned here, nowhere else): SIGINT, SIGTERM or SIGHUP stop fetching; each subscription
//! finishes and commits the batch in flight (positions are committed with every batch, so nothing else
//! needs saving); a second signal is ignored; the wait is bounded by `server.shutdown_grace_seconds`,
//! after which the process exits anyway and the unfinished batches are redelivered on the next start.

mod arrivals;
pub(crate) mod batch;
pub(crate) mod deadlines;
mod generation;
pub(crate) mod progress;
pub(crate) mod retry;
pub(crate) mod run;
pub(crate) mod scheduler;
pub mod signals;
pub mod startup;
mod testing;
pub mod timings;
pub(crate) mod turns;

#[cfg(test)]
mod linked_tests;
#[cfg(test)]
mod scheduler_tests;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use generation::Changes;
pub use progress::Totals;

use crate::sync::lock;
use crate::{
    broker,
    config::{Config, Settings, SubscriptionType},
    message::Kind,
    outbox,
    ownership::Keeper,
    plugin::Kind as HandlerKind,
    plugin::{Handlers, Plugin},
    store::{self, Store},
    subscription::{standing, PlanError, SubscriptionPlan},
    unit_of_work::{IdempotencyKey, NewMessage, UnitOfWork},
};

use batch::Subscription;
use generation::Generation;
use progress::Progress;

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Run until quiescent, then stop.
    pub test_mode: bool,
    /// The resolved configuration.
    pub config: Config,
    /// The clock of the run: the system's, or a virtual one in test mode (`--clock virtual`).
    pub clock: crate::clock::Clock,
}

/// Why the engine could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("cannot send {message_type}: {reason}")]
    BadCommand {
        message_type: String,
        reason: String,
    },
    /// A command to send is over `server.max_message_bytes`: nothing was stored.
    #[error(transparent)]
    TooBig(#[from] crate::message::TooBig),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("a subscription failed: {0}")]
    Subscription(String),
    #[error(transparent)]
    Broker(#[from] crate::broker::Error),
    #[error("handler {handler} is configured with subscription_type = \"stream\" but no broker is configured; add [brokers.default] with a uri")]
    NoBroker { handler: String },
    #[error("a broker is configured but the store keeps no outbox to publish from")]
    NoOutbox,
    #[error("reload is not available in test mode; run without --test-mode to reload")]
    ReloadInTestMode,
    #[error("no dead letter {id} waits in {subscription}; list them with `protean-host dlq list --subscription {subscription}`")]
    NoDeadLetter { subscription: String, id: String },
    #[error("{subscription} is not an event-store subscription of this domain; its dead letters are in its group's dead-letter stream")]
    NotEventStore { subscription: String },
}

/// What to do about a command over the size limit.
pub const SEND_FIX: &str =
    "nothing was stored; send less data, or raise the limit in the config file (for every replica)";

/// What replaying a dead letter did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// Handled (or found handled already) by this build; the dead letter is kept, marked replayed.
    Handled,
    /// Failed again: a new dead letter says why; the old one is marked replayed.
    DeadLettered,
}

/// What [`Engine::send_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Stored now, with this id.
    Committed(String),
    /// A command with the same key was stored before, with this id; nothing new was stored.
    AlreadyCommitted(String),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Test mode: every subscription caught up and nothing is in flight.
    Quiescent,
    /// Stopped by a signal.
    Signal(&'static str),
    /// Test mode: the time limit passed; these subscriptions were still busy.
    TimedOut { busy: Vec<String> },
    /// The domain has no handlers.
    NothingToRun,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: Outcome,
    pub totals: Totals,
    pub elapsed: Duration,
    /// How far a virtual clock moved (test mode with `--clock virtual`); None on the system clock.
    pub virtual_elapsed: Option<Duration>,
    /// Where each subscription's time went.
    pub timings: std::collections::BTreeMap<String, timings::Spent>,
}

impl RunReport {
    /// 0 for a clean stop, 1 when test mode ran out of time.
    pub fn exit_code(&self) -> u8 {
        match self.outcome {
            Outcome::TimedOut { .. } => 1,
            _ => 0,
        }
    }
}

/// What every subscription task shares during a run.
pub(crate) struct Shared {
    /// The running generation (its plugin and subscriptions); replaced by a reload while no
    /// subscription runs.
    generation: Mutex<Arc<Generation>>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: Config,
    pub(crate) progress: Progress,
    pub(crate) test_mode: bool,
    /// The one clock of the run (virtual in a test mode that skips waits).
    pub(crate) clock: crate::clock::Clock,
    /// Rung by a commit that set schedules: the scheduler wakes sooner if one is due sooner.
    pub(crate) scheduler_alarm: scheduler::Alarm,
    /// Prometheus counters, recorded after each batch and outbox round.
    pub(crate) metrics: crate::ops::metrics::Metrics,
    /// The handler calls in progress, with their deadlines (liveness fails past one).
    pub(crate) deadlines: deadlines::Deadlines,
    /// Who may call a handler now: a suspect calls alone.
    pub(crate) turns: turns::Turns,
    /// Where each subscription's time went.
    pub(crate) timings: timings::Timings,
}

impl Shared {
    /// The plugin to call (a batch takes it once, so a reload never changes it mid-batch).
    pub(crate) fn plugin(&self) -> Arc<dyn Handlers> {
        lock(&self.generation).plugin.clone()
    }

    /// Charge `spent` to `subscription`, in the run's timings and the metrics.
    pub(crate) fn spend(&self, subscription: &str, spent: &timings::Spent) {
        self.timings.add(subscription, spent);
        self.metrics.spent(subscription, spent);
    }

    /// The subscriptions running now.
    pub(crate) fn subscriptions(&self) -> Vec<Arc<Subscription>> {
        lock(&self.generation).subscriptions.clone()
    }
}

/// Wake the engine when any writer appends (see [`crate::store::AppendWatch`]), on a thread of its own
/// until `stop`; dropping the guard returned stops it.
fn watch_appends(
    shared: &Arc<Shared>,
    stop: CancellationToken,
) -> Option<tokio_util::sync::DropGuard> {
    let mut watch = shared.store.appends()?;
    let (shared, guard) = (shared.clone(), stop.clone().drop_guard());
    tokio::task::spawn_blocking(move || {
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            match watch.next(Duration::from_millis(250)) {
                Ok(position) => {
                    failures = 0;
                    if let Some(position) = position {
                        shared.progress.advanced(position);
                    }
                }
                Err(error) => {
                    failures += 1;
                    // Polling still finds the appends; this only makes them wait for it.
                    tracing::warn!(%error, failures, "cannot listen for appends; until it can, other writers' messages wait for the poll");
                    let until =
                        std::time::Instant::now() + Duration::from_secs(1 << failures.min(5));
                    while !stop.is_cancelled() && std::time::Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    });
    Some(guard)
}

/// Say, once per call, when a handler call passes its deadline (`/livez` fails from then on).
async fn watch_deadlines(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
            _ = shutdown.cancelled() => return,
        }
        for late in shared.deadlines.newly_overdue(std::time::Instant::now()) {
            tracing::error!(subscription = %late.subscription, handler = %late.handler, limit_ms = late.limit.as_millis() as u64, "{late}");
        }
    }
}
/// A domain ready to run.
///
/// Embedding the engine, as `protean-host` itself does:
///
/// ```no_run
/// use protean_host::{config::Config, engine::{Engine, EngineOptions, Outcome}, plugin::Library};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let library = Library::load("target/debug/libsample_domain.so".as_ref())?;
/// let domain = library.instantiate(&library.select(None)?, 3)?;
/// let options = EngineOptions { test_mode: true, config: Config::load(None)?, ..Default::default() };
/// let engine = Engine::new(domain, options)?;
/// let order = serde_json::json!({"order_id": "o1", "customer": "ada", "sku": "book", "quantity": 1, "total": 9.5});
/// engine.send("Fulfilment.PlaceOrder.v1", &order, None)?;
/// let report = engine.run()?; // returns once every subscription is caught up
/// assert_eq!(report.outcome, Outcome::Quiescent);
/// # Ok(())
/// # }
/// ```
pub struct Engine {
    store: Arc<dyn Store>,
    options: EngineOptions,
    /// The generation that runs (or will run).
    current: Mutex<Arc<Generation>>,
    /// The next generation, planned by [`Engine::reload`], until the run loop swaps it in.
    pending: Mutex<Option<Generation>>,
    reload_requested: tokio::sync::Notify,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current();
        f.debug_struct("Engine")
            .field("plugin", &current.plugin)
            .field("generation", &current.number)
            .field("subscriptions", &current.subscriptions.len())
            .finish()
    }
}

impl Engine {
    /// Open the configured store and plan the domain's subscriptions. Nothing runs yet.
    pub fn new(domain: Plugin, options: EngineOptions) -> Result<Self, EngineError> {
        let store = store::open(&options.config.store)?;
        Self::with_store(domain, store, options)
    }

    /// Like [`Engine::new`], with a store the caller opened (to share it, or to inspect it afterwards).
    pub fn with_store(
        domain: Plugin,
        store: Arc<dyn Store>,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        Self::with_handlers(Arc::new(domain), store, options)
    }

    /// [`Engine::with_store`] for any implementation of the domain's handlers: a [`Plugin`], or a
    /// domain linked into a test ([`Plugin::linked`]).
    pub(crate) fn with_handlers(
        domain: Arc<dyn Handlers>,
        store: Arc<dyn Store>,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        if options.config.broker.is_some() && store.outbox().is_none() {
            return Err(EngineError::NoOutbox);
        }
        warn_unknown_handlers(domain.as_ref(), &options.config);
        let first = Generation::plan(1, domain, &options.config)?;
        Ok(Self {
            store,
            options,
            current: Mutex::new(Arc::new(first)),
            pending: Mutex::default(),
            reload_requested: tokio::sync::Notify::new(),
        })
    }

    fn current(&self) -> Arc<Generation> {
        lock(&self.current).clone()
    }

    /// Replace the domain with another build of it (hot reload). Its subscriptions are planned now
    /// (an error leaves the running build in place); a running engine swaps between batches: it stops
    /// fetching, finishes and commits the batches in flight, then starts the new build's
    /// subscriptions. Returns what changes, against the generation running now.
    pub fn reload(&self, domain: Plugin) -> Result<Changes, EngineError> {
        if self.options.test_mode {
            return Err(EngineError::ReloadInTestMode);
        }
        warn_unknown_handlers(&domain, &self.options.config);
        let current = self.current();
        let next = Generation::plan(current.number + 1, Arc::new(domain), &self.options.config)?;
        let changes = Changes::between(&current, &next);
        *lock(&self.pending) = Some(next);
        self.reload_requested.notify_one();
        Ok(changes)
    }

    /// The generation running: 1 for the library the engine started with, one more per reload.
    pub fn generation(&self) -> u64 {
        self.current().number
    }

    /// The build id of the library running.
    pub fn build_id(&self) -> String {
        self.current().plugin.build_id().to_owned()
    }

    /// The names of the stream subscriptions (their consumer groups), when a broker is configured.
    pub fn stream_subscriptions(&self) -> Vec<String> {
        self.current()
            .subscriptions
            .iter()
            .filter(|s| standing::of(s).on_broker())
            .map(|s| s.plan.name.clone())
            .collect()
    }

    /// The subscriptions of the running generation.
    pub(crate) fn running(&self) -> Vec<Arc<Subscription>> {
        self.current().subscriptions.clone()
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &Config {
        &self.options.config
    }

    /// The subscriptions the engine runs, with their resolved settings.
    pub fn subscriptions(&self) -> Vec<(SubscriptionPlan, Settings)> {
        self.current()
            .subscriptions
            .iter()
            .map(|s| (s.plan.clone(), s.settings))
            .collect()
    }

    /// The store the engine writes to.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Append a command of `message_type` to its command stream; returns its id. The plugin checks that
    /// `data` is such a command and names the stream. `deadline` (RFC 3339) makes it expire.
    pub fn send(
        &self,
        message_type: &str,
        data: &Value,
        deadline: Option<&str>,
    ) -> Result<String, EngineError> {
        let message = self.command(message_type, data, deadline)?;
        self.check_size(&message)?;
        let id = message.id.clone();
        self.commit_command(message, None)?;
        Ok(id)
    }

    /// [`Engine::send`] at most once per `key` (Protean's `metadata.headers.idempotency_key`): the store
    /// keeps the key with the command in the same transaction, so sending again with a key that was
    /// committed stores nothing and answers the first command's id.
    pub fn send_once(
        &self,
        message_type: &str,
        data: &Value,
        deadline: Option<&str>,
        key: &str,
    ) -> Result<Sent, EngineError> {
        let message = self
            .command(message_type, data, deadline)?
            .with_idempotency_key(key);
        self.check_size(&message)?;
        let id = message.id.clone();
        let key = IdempotencyKey {
            key: key.to_owned(),
            message_id: id.clone(),
        };
        match self.commit_command(message, Some(key)) {
            Ok(()) => Ok(Sent::Committed(id)),
            Err(store::Error::AlreadyCommitted { message_id, .. }) => {
                Ok(Sent::AlreadyCommitted(message_id))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// A new command of `message_type`, its stream named by the plugin.
    fn command(
        &self,
        message_type: &str,
        data: &Value,
        deadline: Option<&str>,
    ) -> Result<NewMessage, EngineError> {
        let bad = |reason: String| EngineError::BadCommand {
            message_type: message_type.into(),
            reason,
        };
        let bytes = serde_json::to_vec(data).map_err(|e| bad(e.to_string()))?;
        let stream = self
            .current()
            .plugin
            .command_stream(message_type, &bytes)
            .map_err(|e| bad(e.to_string()))?;
        Ok(NewMessage::new(
            Kind::Command,
            &stream,
            message_type,
            data,
            None,
            deadline,
            None,
        ))
    }

    /// A command over `server.max_message_bytes` is refused before anything is stored: every reader
    /// would dead-letter it.
    fn check_size(&self, message: &NewMessage) -> Result<(), EngineError> {
        let what = || format!("command {} with its metadata", message.message_type);
        crate::message::TooBig::check(
            message.size(),
            self.options.config.max_message_bytes,
            what,
            SEND_FIX,
        )?;
        Ok(())
    }

    fn commit_command(
        &self,
        message: NewMessage,
        idempotency_key: Option<IdempotencyKey>,
    ) -> Result<(), store::Error> {
        self.store
            .commit(&UnitOfWork {
                messages: vec![message],
                publish: self.options.config.broker.is_some(),
                idempotency_key,
                ..UnitOfWork::default()
            })
            .map(drop)
    }

    /// Handle the waiting dead letter of event-store subscription `subscription` at `global_position`
    /// again, now, in this process and with this engine's build, for that subscription's handler only
    /// (its position does not move). The unit of work carries the message's processed marker, so a
    /// message handled meanwhile is not handled twice. A retryable failure is retried after the
    /// subscription's backoff here; a failure out of retries is dead-lettered anew. Blocking.
    pub fn replay_dead_letter(
        &self,
        subscription: &str,
        global_position: u64,
    ) -> Result<Replay, EngineError> {
        let generation = self.current();
        let sub = generation
            .subscriptions
            .iter()
            .find(|s| s.plan.name == subscription && !standing::of(s).on_broker())
            .ok_or_else(|| EngineError::NotEventStore {
                subscription: subscription.to_owned(),
            })?;
        let missing = || EngineError::NoDeadLetter {
            subscription: subscription.to_owned(),
            id: global_position.to_string(),
        };
        let dead = self
            .store
            .dead_letters(Some(subscription))?
            .into_iter()
            .find(|d| d.global_position == global_position)
            .ok_or_else(missing)?;
        let message = self
            .store
            .read_stream(&dead.stream, 0)?
            .into_iter()
            .find(|m| m.global_position == global_position)
            .ok_or_else(missing)?;
        let ctx = batch::Context {
            plugin: generation.plugin.as_ref(),
            store: self.store.as_ref(),
            clock: &self.options.clock,
            subscription: sub,
            version_retries: self.options.config.version_retries,
            publish: self.options.config.broker.is_some(),
            fences: Vec::new(),
            position: None,
            worker: None,
            keys: None,
            deadlines: None,
            turns: None,
            progress: None,
            record: batch::Record::Every,
            parking: None,
            origin: batch::Origin::Store,
            first_delivery: false,
        };
        let mut attempts = batch::Attempts::default();
        let report = loop {
            let report = batch::run(&ctx, std::slice::from_ref(&message), &mut attempts)?;
            match report.retry {
                Some(delay) => std::thread::sleep(delay),
                None => break report,
            }
        };
        self.store.resolve_dead_letter(
            subscription,
            global_position,
            generation.plugin.build_id(),
        )?;
        Ok(if report.dead_lettered > 0 {
            Replay::DeadLettered
        } else {
            Replay::Handled
        })
    }

    /// Run until stopped (or, in test mode, until quiescent). Blocking: it drives its own runtime.
    pub fn run(&self) -> Result<RunReport, EngineError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.options.config.runtime_threads())
            .enable_all()
            .build()
            .map_err(EngineError::Runtime)?;
        let report = runtime.block_on(self.run_async());
        // A plugin call still running after the grace period cannot be interrupted; do not wait for it.
        runtime.shutdown_background();
        report
    }

    async fn run_async(&self) -> Result<RunReport, EngineError> {
        let started = Instant::now();
        let test_mode = self.options.test_mode;
        self.swap_pending();
        let generation = self.current();
        // Without handlers there is still the outbox to publish when a broker is configured: a replica
        // may run only that.
        if generation.subscriptions.is_empty() && self.options.config.broker.is_none() {
            tracing::warn!(
                instance = generation.plugin.name(),
                "the domain has no handlers; nothing to run"
            );
            return Ok(RunReport {
                outcome: Outcome::NothingToRun,
                totals: Totals::default(),
                elapsed: started.elapsed(),
                virtual_elapsed: None,
                timings: Default::default(),
            });
        }
        let head = {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.head(&[]))
                .await
                .map_err(|e| EngineError::Subscription(e.to_string()))??
        };
        let broker = match &self.options.config.broker {
            Some(config) => Some(broker::open(config).await?),
            None => None,
        };
        let shared = Arc::new(Shared {
            generation: Mutex::new(generation.clone()),
            store: self.store.clone(),
            config: self.options.config.clone(),
            progress: Progress::new(head, tracked(&generation, broker.is_some())),
            test_mode,
            clock: self.options.clock.clone(),
            scheduler_alarm: scheduler::Alarm::default(),
            metrics: crate::ops::metrics::Metrics::new(&generation.subscriptions),
            deadlines: deadlines::Deadlines::default(),
            turns: turns::Turns::default(),
            timings: timings::Timings::default(),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_deadlines(shared.clone(), shutdown.clone()));
        // Stopped when the run returns, however it returns.
        let _appends = watch_appends(&shared, shutdown.child_token());
        let outcome: Arc<Mutex<Option<Outcome>>> = Arc::default();
        // Installed before "engine started" is logged, so a signal right after it is never missed.
        let signals = tokio::spawn(watch_signals(
            signals::watch(),
            shutdown.clone(),
            outcome.clone(),
        ));
        let owner = format!(
            "{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let runner = Runner {
            shared: shared.clone(),
            broker: broker.clone(),
            keeper: Keeper::choose(&shared.store, broker.as_ref()),
            owner,
        };
        let mut epoch = shutdown.child_token();
        let mut workers = runner.spawn(&generation, &epoch);
        let health =
            crate::ops::health::start(shared.clone(), broker.clone(), shutdown.clone()).await;
        tracing::info!(
            instance = generation.plugin.name(),
            build = generation.plugin.build_id(),
            subscriptions = generation.subscriptions.len(),
            test_mode,
            runtime_threads = self.options.config.runtime_threads(),
            "engine started"
        );
        if test_mode {
            tokio::spawn(watch_quiescence(
                shared.clone(),
                broker.clone(),
                generation.subscriptions.clone(),
                self.options.config.test_mode_timeout,
                shutdown.clone(),
                outcome.clone(),
            ));
        }
        // Not kept for the run: a reload drops the generation it replaces once its batches are done
        // (an isolated plugin then stops its worker processes).
        drop(generation);
        let mut fatal = loop {
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Wake::Stop,
                Some(ended) = workers.join_next() => Wake::Ended(worker_error(ended, &shutdown)),
                _ = self.reload_requested.notified() => Wake::Reload,
            };
            match wake {
                Wake::Stop => break None,
                Wake::Ended(error) => break error,
                Wake::Reload => {
                    let swapped = self
                        .swap(&runner, &mut epoch, &mut workers, &shutdown)
                        .await;
                    if let Err(error) = swapped {
                        break Some(error);
                    }
                }
            }
        };
        shutdown.cancel();
        tracing::info!("engine stopping: finishing batches in flight");
        let grace = self.options.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, drain(&mut workers, &mut fatal)).await;
        if drained.is_err() {
            tracing::warn!(grace_s = grace.as_secs(), busy = ?shared.progress.busy(), "shutdown grace period over; exiting with batches in flight (they are redelivered on the next start)");
        }
        signals.abort();
        if let Some(health) = health {
            health.abort();
        }
        let totals = shared.progress.totals();
        tracing::info!(
            handled = totals.handled.values().sum::<u64>(),
            dead_lettered = totals.dead_lettered,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "engine stopped"
        );
        if let Some(error) = fatal {
            return Err(EngineError::Subscription(error));
        }
        let outcome = lock(&outcome).take().unwrap_or(Outcome::Signal("none"));
        Ok(RunReport {
            outcome,
            totals,
            elapsed: started.elapsed(),
            virtual_elapsed: shared.clock.is_virtual().then(|| shared.clock.elapsed()),
            timings: shared.timings.snapshot(),
        })
    }

    /// Make the pending generation, if there is one, the current one (a reload before `run`).
    fn swap_pending(&self) {
        if let Some(next) = lock(&self.pending).take() {
            *lock(&self.current) = Arc::new(next);
        }
    }

    /// Hot reload while running: stop fetching, let every subscription finish and commit its batch,
    /// then start the new generation's subscriptions. A subscription that fails meanwhile is fatal.
    async fn swap(
        &self,
        runner: &Runner,
        epoch: &mut CancellationToken,
        workers: &mut JoinSet<Result<(), String>>,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let Some(next) = lock(&self.pending).take() else {
            return Ok(());
        };
        let started = Instant::now();
        let running = self.current();
        let changes = Changes::between(&running, &next);
        runner.warn_about(&running, &next, &changes).await;
        epoch.cancel();
        let mut failed = None;
        drain(workers, &mut failed).await;
        if let Some(error) = failed {
            return Err(error);
        }
        let next = Arc::new(next);
        *lock(&self.current) = next.clone();
        *lock(&runner.shared.generation) = next.clone();
        runner
            .shared
            .metrics
            .reloaded(next.number, &next.subscriptions);
        runner
            .shared
            .progress
            .track(tracked(&next, runner.broker.is_some()));
        *epoch = shutdown.child_token();
        *workers = runner.spawn(&next, epoch);
        let loaded = crate::plugin::generations_loaded();
        tracing::info!(
            generation = next.number,
            build = next.plugin.build_id(),
            added = ?changes.added,
            removed = ?changes.removed,
            changed = ?changes.changed,
            took_ms = started.elapsed().as_millis() as u64,
            libraries_mapped = loaded,
            "reloaded"
        );
        if loaded > self.options.config.max_generations {
            tracing::warn!(libraries_mapped = loaded, limit = self.options.config.max_generations, "old library generations stay mapped until the process exits; restart the server to release them");
        }
        Ok(())
    }
}

/// What woke the run loop.
enum Wake {
    Stop,
    /// A task ended: an error, unless the engine is stopping.
    Ended(Option<String>),
    Reload,
}

/// What starts a generation's tasks.
struct Runner {
    shared: Arc<Shared>,
    broker: Option<Arc<dyn broker::Broker>>,
    /// Who grants event-store subscriptions' leases, chosen once: none for a store nobody shares.
    keeper: Option<Arc<Keeper>>,
    /// Names this process as the holder of event-store subscription leases.
    owner: String,
}

impl Runner {
    /// One task per subscription, plus the outbox processor when there is a broker; all stop on `stop`.
    fn spawn(
        &self,
        generation: &Generation,
        stop: &CancellationToken,
    ) -> JoinSet<Result<(), String>> {
        let mut workers = JoinSet::new();
        for sub in &generation.subscriptions {
            let start = standing::Start {
                shared: self.shared.clone(),
                broker: self.broker.clone(),
                keeper: self.keeper.clone(),
                owner: self.owner.clone(),
            };
            let task = standing::Task {
                start,
                sub: sub.clone(),
                stop: stop.clone(),
            };
            workers.spawn(standing::of(sub).run(task));
        }
        workers.spawn(scheduler::run(self.shared.clone(), stop.clone()));
        if let Some(broker) = &self.broker {
            workers.spawn(outbox::run(
                self.shared.clone(),
                broker.clone(),
                format!("outbox-{}", self.owner),
                stop.clone(),
            ));
        }
        workers
    }

    /// Before a swap: a new subscription that will read a long history from its start, or a removed
    /// one that leaves messages unhandled, gets a WARN line with the numbers.
    async fn warn_about(&self, old: &Generation, new: &Generation, changes: &Changes) {
        let find = |g: &Generation, name: &str| {
            g.subscriptions
                .iter()
                .find(|s| s.plan.name == name)
                .cloned()
        };
        for sub in changes.added.iter().filter_map(|n| find(new, n)) {
            let behind = self.backlog(&sub).await;
            if behind > 0 {
                tracing::warn!(subscription = %sub.plan.name, categories = ?sub.plan.categories, messages = behind, "a new subscription starts from the beginning of its categories");
            }
        }
        for sub in changes.removed.iter().filter_map(|n| find(old, n)) {
            let unhandled = self.backlog(&sub).await;
            if unhandled > 0 {
                tracing::warn!(subscription = %sub.plan.name, unhandled, "a removed subscription leaves messages it has not handled");
            }
        }
    }

    /// The messages a subscription has not finished: unread, and for a stream group also read but
    /// unacknowledged. Unknown counts as 0: this only informs a warning.
    async fn backlog(&self, sub: &Subscription) -> u64 {
        if let Some(broker) = &self.broker {
            let kind = standing::of(sub);
            let held = kind.broker_backlog(broker.as_ref(), &sub.plan, &self.shared.config);
            if let Some(backlog) = held.await {
                return backlog.unwrap_or(0);
            }
        }
        let (store, name, categories) = (
            self.shared.store.clone(),
            sub.plan.name.clone(),
            sub.plan.categories.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let position = store.position(&name).ok().flatten().unwrap_or(0);
            store.count_after(&categories, position).unwrap_or(0)
        })
        .await
        .unwrap_or(0)
    }
}

/// The names progress tracks for a generation: its subscriptions, the scheduler, and the outbox with
/// a broker.
fn tracked(generation: &Generation, broker: bool) -> Vec<String> {
    let mut names = generation.names();
    names.push(scheduler::NAME.to_owned());
    if broker {
        names.push(outbox::NAME.to_owned());
    }
    names
}

/// Wait for every worker to end; the first error is kept in `fatal`.
async fn drain(workers: &mut JoinSet<Result<(), String>>, fatal: &mut Option<String>) {
    while let Some(ended) = workers.join_next().await {
        if let Err(error) = ended.map_err(|e| e.to_string()).and_then(|r| r) {
            fatal.get_or_insert(error);
        }
    }
}

/// A server.handlers section that names no handler of this domain is probably a typo.
fn warn_unknown_handlers(domain: &dyn Handlers, config: &Config) {
    let handlers: Vec<&str> = domain
        .registrations()
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    for configured in config
        .configured_handlers()
        .filter(|h| !handlers.contains(h))
    {
        tracing::warn!(handler = configured, known = ?handlers, "server.handlers names a handler this domain does not have");
    }
}

/// Where a subscription reads from: its handler's configured type, else streams when a broker is
/// configured, except for
/// - process managers, which need their categories in store order (one stream per category cannot give
///   that), so they stay on the event store, leased to one replica at a time;
/// - command handlers: a command reaches Redis only through this host's outbox, while other writers
///   (Python Protean's `domain.process(..., asynchronous=True)`, MessageDB clients) only append it to
///   the store. Read from the store, every command is handled whoever wrote it.
fn subscription_type(
    config: &Config,
    handler: &str,
    kind: HandlerKind,
) -> Result<SubscriptionType, EngineError> {
    let configured = config.subscription_type(handler);
    let chosen = configured.unwrap_or(match (&config.broker, kind) {
        (Some(_), HandlerKind::ProcessManager | HandlerKind::CommandHandler) | (None, _) => {
            SubscriptionType::EventStore
        }
        (Some(_), _) => SubscriptionType::Stream,
    });
    if chosen == SubscriptionType::Stream && config.broker.is_none() {
        return Err(EngineError::NoBroker {
            handler: handler.to_owned(),
        });
    }
    if chosen == SubscriptionType::Stream && kind == HandlerKind::CommandHandler {
        tracing::warn!(%handler, "command handler configured with subscription_type = \"stream\": it reads only the commands this host published to Redis; commands other writers append to the store (Python Protean, MessageDB clients) wait unhandled; remove the setting to read them from the store");
    }
    Ok(chosen)
}

/// A worker that ends before shutdown is a failure, whether it returned an error or not.
fn worker_error(
    ended: Result<Result<(), String>, tokio::task::JoinError>,
    shutdown: &CancellationToken,
) -> Option<String> {
    match ended {
        Ok(Ok(())) if shutdown.is_cancelled() => None,
        Ok(Ok(())) => Some("a subscription stopped on its own".into()),
        Ok(Err(error)) => Some(error),
        Err(error) => Some(format!("a subscription task panicked: {error}")),
    }
}

/// The first SIGINT, SIGTERM or SIGHUP starts the shutdown, also one received before this engine
/// started (see [`signals`]); later ones are logged and ignored.
async fn watch_signals(
    received: Option<tokio::sync::watch::Receiver<signals::Received>>,
    shutdown: CancellationToken,
    outcome: Arc<Mutex<Option<Outcome>>>,
) {
    let Some(mut received) = received else {
        tracing::error!("cannot install signal handlers; stop the server with SIGKILL");
        return;
    };
    let mut seen = 0;
    loop {
        let now = *received.borrow_and_update();
        if now.count > seen {
            if seen == 0 {
                let name = now.first.unwrap_or("a signal");
                tracing::info!(signal = name, "shutting down");
                lock(&outcome).get_or_insert(Outcome::Signal(name));
                shutdown.cancel();
            } else {
                let name = now.last.unwrap_or("a signal");
                tracing::info!(signal = name, "already shutting down; signal ignored");
            }
            seen = now.count;
        }
        if received.changed().await.is_err() {
            return;
        }
    }
}

/// With a broker, quiescent also means that the broker holds nothing unread or unacknowledged for any
/// subscription, as Redis itself reports it.
async fn broker_drained(
    shared: &Shared,
    broker: Option<&dyn broker::Broker>,
    subscriptions: &[Arc<Subscription>],
) -> bool {
    let Some(broker) = broker else { return true };
    for sub in subscriptions {
        let held = standing::of(sub).broker_backlog(broker, &sub.plan, &shared.config);
        match held.await {
            None | Some(Ok(0)) => {}
            Some(Ok(_) | Err(_)) => {
                // Not yet: look again shortly (a subscription's next read changes its state anyway).
                tokio::time::sleep(Duration::from_millis(20)).await;
                shared.progress.poke();
                return false;
            }
        }
    }
    true
}

/// Test mode: stop when quiescent, or give up at the time limit. On a virtual clock, quiescent with
/// something still to come (a schedule, a retry) moves the clock to it at once instead.
async fn watch_quiescence(
    shared: Arc<Shared>,
    broker: Option<Arc<dyn broker::Broker>>,
    subscriptions: Vec<Arc<Subscription>>,
    limit: Duration,
    shutdown: CancellationToken,
    outcome: Arc<Mutex<Option<Outcome>>>,
) {
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        if let Step::Done = next_step(&shared, broker.as_deref(), &subscriptions).await {
            tracing::info!(
                virtual_elapsed_ms = shared.clock.elapsed().as_millis() as u64,
                "test mode: every subscription is caught up and idle"
            );
            lock(&outcome).get_or_insert(Outcome::Quiescent);
            shutdown.cancel();
            return;
        }
        tokio::select! {
            _ = shared.progress.changed() => {}
            _ = shared.clock.changed() => {}
            _ = &mut deadline => {
                let busy = shared.progress.busy();
                tracing::error!(limit_s = limit.as_secs(), ?busy, "test mode time limit reached");
                lock(&outcome).get_or_insert(Outcome::TimedOut { busy });
                shutdown.cancel();
                return;
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// What test mode does next.
enum Step {
    /// Something runs: look again when it changes.
    Wait,
    /// Nothing is left.
    Done,
}

/// Whether the run is done; on a virtual clock with only waits left, move the clock to the first.
async fn next_step(
    shared: &Arc<Shared>,
    broker: Option<&dyn broker::Broker>,
    subscriptions: &[Arc<Subscription>],
) -> Step {
    let clock = &shared.clock;
    // A loop the clock woke has not said what it does next: its state is stale.
    if !clock.settled() {
        return Step::Wait;
    }
    let done = shared.progress.quiescent();
    // Retries wait on the clock; a virtual one skips them when nothing else runs.
    let waiting =
        clock.is_virtual() && clock.next_wake().is_some() && shared.progress.only_retries();
    if !(done || waiting) || !broker_drained(shared, broker, subscriptions).await {
        return Step::Wait;
    }
    let store = shared.store.clone();
    let next_due = match run::blocking(move || store.schedules().next_due()).await {
        Ok(Ok(next_due)) => next_due,
        Ok(Err(error)) => {
            tracing::warn!(%error, "test mode: cannot read the next due schedule; looking again");
            shared.progress.poke();
            return Step::Wait;
        }
        Err(_) => return Step::Wait,
    };
    if next_due.is_some_and(|due| due <= clock.now_ms()) {
        // Due already: the scheduler has not seen it yet (set by a commit that appended nothing).
        shared.scheduler_alarm.look();
        return Step::Wait;
    }
    if clock.is_virtual() {
        if let Some(next) = next_due.into_iter().chain(clock.next_wake()).min() {
            tracing::debug!(
                to_ms = next,
                "test mode: nothing runs; the virtual clock moves to what comes next"
            );
            clock.advance_to(next);
            shared.scheduler_alarm.look();
            return Step::Wait;
        }
    }
    if !done {
        return Step::Wait;
    }
    if next_due.is_some() {
        tracing::info!("test mode: schedules still pending are left for a later run (on the system clock, test mode does not wait for them; `--clock virtual` does)");
    }
    Step::Done
}
