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

pub(crate) mod batch;
pub(crate) mod progress;
pub(crate) mod retry;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use progress::Totals;

use crate::{
    broker,
    config::{Config, Settings, SubscriptionType},
    message::Kind,
    outbox,
    plugin::Kind as HandlerKind,
    plugin::Plugin,
    store::{self, Store},
    subscription::{self, event_store, stream, PlanError, SubscriptionPlan},
    unit_of_work::{NewMessage, UnitOfWork},
};

use batch::Subscription;
use progress::Progress;
use retry::RetryPolicy;

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Run until quiescent, then stop.
    pub test_mode: bool,
    /// The resolved configuration.
    pub config: Config,
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
    pub(crate) plugin: Arc<Plugin>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: Config,
    pub(crate) progress: Progress,
    pub(crate) test_mode: bool,
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
/// let options = EngineOptions { test_mode: true, config: Config::load(None)? };
/// let engine = Engine::new(domain, options)?;
/// let order = serde_json::json!({"order_id": "o1", "customer": "ada", "sku": "book", "quantity": 1, "total": 9.5});
/// engine.send("Fulfilment.PlaceOrder.v1", &order, None)?;
/// let report = engine.run()?; // returns once every subscription is caught up
/// assert_eq!(report.outcome, Outcome::Quiescent);
/// # Ok(())
/// # }
/// ```
pub struct Engine {
    plugin: Arc<Plugin>,
    store: Arc<dyn Store>,
    options: EngineOptions,
    subscriptions: Vec<Arc<Subscription>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("plugin", &self.plugin)
            .field("subscriptions", &self.subscriptions.len())
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
        let plans = subscription::plan(domain.registrations())?;
        let subscriptions = plans
            .into_iter()
            .map(|plan| {
                let handler = plan.routes.values().next().cloned().unwrap_or_default();
                let settings = options.config.settings(&handler, &plan.options);
                tracing::debug!(subscription = %plan.name, categories = ?plan.categories, handlers = ?plan.routes, ?settings, "subscription registered");
                let commands = plan.name.starts_with("commands:");
                let kind = subscription_type(&options.config, &handler, plan.kind)?;
                Ok(Arc::new(Subscription { retry: RetryPolicy::new(&settings), plan, settings, commands, kind }))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        if options.config.broker.is_some() && store.outbox().is_none() {
            return Err(EngineError::NoOutbox);
        }
        let handlers: Vec<&str> = domain
            .registrations()
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        for configured in options
            .config
            .configured_handlers()
            .filter(|h| !handlers.contains(h))
        {
            tracing::warn!(handler = configured, known = ?handlers, "server.handlers names a handler this domain does not have");
        }
        Ok(Self {
            plugin: Arc::new(domain),
            store,
            options,
            subscriptions,
        })
    }

    /// The names of the stream subscriptions (their consumer groups), when a broker is configured.
    pub fn stream_subscriptions(&self) -> Vec<&str> {
        self.subscriptions
            .iter()
            .filter(|s| s.kind == SubscriptionType::Stream)
            .map(|s| s.plan.name.as_str())
            .collect()
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &Config {
        &self.options.config
    }

    /// The subscriptions the engine runs, with their resolved settings.
    pub fn subscriptions(&self) -> Vec<(&SubscriptionPlan, Settings)> {
        self.subscriptions
            .iter()
            .map(|s| (&s.plan, s.settings))
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
        let bad = |reason: String| EngineError::BadCommand {
            message_type: message_type.into(),
            reason,
        };
        let bytes = serde_json::to_vec(data).map_err(|e| bad(e.to_string()))?;
        let stream = self
            .plugin
            .command_stream(message_type, &bytes)
            .map_err(bad)?;
        let message = NewMessage::new(
            Kind::Command,
            &stream,
            message_type,
            data,
            None,
            deadline,
            None,
        );
        let id = message.id.clone();
        self.store.commit(&UnitOfWork {
            messages: vec![message],
            publish: self.options.config.broker.is_some(),
            ..UnitOfWork::default()
        })?;
        Ok(id)
    }

    /// Run until stopped (or, in test mode, until quiescent). Blocking: it drives its own runtime.
    pub fn run(&self) -> Result<RunReport, EngineError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
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
        // Without handlers there is still the outbox to publish when a broker is configured: a replica
        // may run only that.
        if self.subscriptions.is_empty() && self.options.config.broker.is_none() {
            tracing::warn!(
                instance = self.plugin.name(),
                "the domain has no handlers; nothing to run"
            );
            return Ok(RunReport {
                outcome: Outcome::NothingToRun,
                totals: Totals::default(),
                elapsed: started.elapsed(),
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
        let mut names: Vec<String> = self
            .subscriptions
            .iter()
            .map(|s| s.plan.name.clone())
            .collect();
        if broker.is_some() {
            names.push(outbox::NAME.to_owned());
        }
        let shared = Arc::new(Shared {
            plugin: self.plugin.clone(),
            store: self.store.clone(),
            config: self.options.config.clone(),
            progress: Progress::new(head, names),
            test_mode,
        });
        let shutdown = CancellationToken::new();
        let outcome: Arc<Mutex<Option<Outcome>>> = Arc::default();
        // Installed before "engine started" is logged, so a signal right after it is never missed.
        let signals = tokio::spawn(watch_signals(
            Signals::install(),
            shutdown.clone(),
            outcome.clone(),
        ));
        let mut workers = JoinSet::new();
        let owner = format!(
            "{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        for sub in &self.subscriptions {
            match (&broker, sub.kind) {
                (Some(broker), SubscriptionType::Stream) => workers.spawn(stream::run(
                    shared.clone(),
                    broker.clone(),
                    sub.clone(),
                    shutdown.clone(),
                )),
                (broker, _) => workers.spawn(event_store::run(
                    shared.clone(),
                    sub.clone(),
                    broker.clone(),
                    owner.clone(),
                    shutdown.clone(),
                )),
            };
        }
        if let Some(broker) = &broker {
            workers.spawn(outbox::run(
                shared.clone(),
                broker.clone(),
                format!("outbox-{owner}"),
                shutdown.clone(),
            ));
        }
        tracing::info!(
            instance = self.plugin.name(),
            build = self.plugin.build_id(),
            subscriptions = self.subscriptions.len(),
            test_mode,
            "engine started"
        );
        if test_mode {
            let streams = self
                .subscriptions
                .iter()
                .filter(|s| s.kind == SubscriptionType::Stream)
                .map(|s| (s.plan.categories.clone(), s.plan.name.clone()))
                .collect();
            tokio::spawn(watch_quiescence(
                shared.clone(),
                broker.clone(),
                streams,
                self.options.config.test_mode_timeout,
                shutdown.clone(),
                outcome.clone(),
            ));
        }
        let mut fatal = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            Some(ended) = workers.join_next() => worker_error(ended, &shutdown),
        };
        shutdown.cancel();
        tracing::info!("engine stopping: finishing batches in flight");
        let grace = self.options.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while let Some(ended) = workers.join_next().await {
                if let Err(error) = ended.map_err(|e| e.to_string()).and_then(|r| r) {
                    fatal.get_or_insert(error);
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(grace_s = grace.as_secs(), busy = ?shared.progress.busy(), "shutdown grace period over; exiting with batches in flight (they are redelivered on the next start)");
        }
        signals.abort();
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
        })
    }
}

/// Where a subscription reads from: its handler's configured type, else streams when a broker is
/// configured, except for process managers, which need their categories in store order (one stream
/// per category cannot give that), so they stay on the event store, leased to one replica at a time.
fn subscription_type(
    config: &Config,
    handler: &str,
    kind: HandlerKind,
) -> Result<SubscriptionType, EngineError> {
    let chosen = config
        .subscription_type(handler)
        .unwrap_or(match (&config.broker, kind) {
            (Some(_), HandlerKind::ProcessManager) | (None, _) => SubscriptionType::EventStore,
            (Some(_), _) => SubscriptionType::Stream,
        });
    if chosen == SubscriptionType::Stream && config.broker.is_none() {
        return Err(EngineError::NoBroker {
            handler: handler.to_owned(),
        });
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The signals that stop the engine. Once installed, their default action (terminate) no longer applies.
struct Signals(Option<[tokio::signal::unix::Signal; 3]>);

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(int), Ok(term), Ok(hup)) => Self(Some([int, term, hup])),
            _ => {
                tracing::error!("cannot install signal handlers; stop the server with SIGKILL");
                Self(None)
            }
        }
    }
}

/// The first SIGINT, SIGTERM or SIGHUP starts the shutdown; later ones are logged and ignored.
async fn watch_signals(
    signals: Signals,
    shutdown: CancellationToken,
    outcome: Arc<Mutex<Option<Outcome>>>,
) {
    let Some([mut int, mut term, mut hup]) = signals.0 else {
        return;
    };
    loop {
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = hup.recv() => "SIGHUP",
        };
        if shutdown.is_cancelled() {
            tracing::info!(signal = name, "already shutting down; signal ignored");
            continue;
        }
        tracing::info!(signal = name, "shutting down");
        lock(&outcome).get_or_insert(Outcome::Signal(name));
        shutdown.cancel();
    }
}

/// With a broker, quiescent also means that every group of every stream subscription has read
/// everything and has nothing pending, as Redis itself reports it.
async fn broker_drained(
    shared: &Shared,
    broker: Option<&dyn broker::Broker>,
    streams: &[(Vec<String>, String)],
) -> bool {
    let Some(broker) = broker else { return true };
    for (streams, group) in streams {
        match broker.backlog(streams, group).await {
            Ok(0) => {}
            Ok(_) | Err(_) => {
                // Not yet: look again shortly (a subscription's next read changes its state anyway).
                tokio::time::sleep(Duration::from_millis(20)).await;
                shared.progress.poke();
                return false;
            }
        }
    }
    true
}

/// Test mode: stop when quiescent, or give up at the time limit.
async fn watch_quiescence(
    shared: Arc<Shared>,
    broker: Option<Arc<dyn broker::Broker>>,
    streams: Vec<(Vec<String>, String)>,
    limit: Duration,
    shutdown: CancellationToken,
    outcome: Arc<Mutex<Option<Outcome>>>,
) {
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        if shared.progress.quiescent() && broker_drained(&shared, broker.as_deref(), &streams).await
        {
            tracing::info!("test mode: every subscription is caught up and idle");
            lock(&outcome).get_or_insert(Outcome::Quiescent);
            shutdown.cancel();
            return;
        }
        tokio::select! {
            _ = shared.progress.changed() => {}
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
