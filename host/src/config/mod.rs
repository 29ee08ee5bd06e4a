//! Configuration: `protean.toml`, parsed strictly, then resolved.
//!
//! Every key, its default and its bounds: the README's reference ("Configuration: `protean.toml`"),
//! which `tests` checks against the defaults here.
//!
//! Order of resolution for a subscription's settings, lowest first: built-in defaults, the `[server]`
//! profile, `[server]` keys, what the handler declares in code, the handler's profile, the handler's keys.
//! Operators have the last word over code. Unknown keys and bad values are errors naming the key.
//!
//! Three steps, a module each: `raw` reads the file's shape (TOML, then the `[env.NAME]` overlay, then
//! `substitute`'s `${VAR}` replacement, then serde), and resolution (`resolve`, and the store's and
//! broker's own sections in `store::config` and `broker::redis::config`) turns it into the types
//! below. Every default is in one place, the `Default` (or `DEFAULT_` constant) of the type that holds
//! it; a value out of bounds is an error, never clamped.

mod error;
mod profile;
mod raw;
mod resolve;
mod substitute;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, path::Path, time::Duration};

use protean_plugin_api::HandlerOptions;
use serde::Deserialize;

pub(crate) use self::error::{at_least, at_least_because};
pub use self::error::{Error, Invalid, Problem};
use self::{profile::Profile, raw::HandlerSection};
pub use crate::store::DEFAULT_STORE_PATH;
use crate::{broker::BrokerConfig, store::StoreConfig};

/// Subscription settings after resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Settings {
    /// Messages read and handled per batch.
    pub messages_per_tick: u32,
    /// Retries after the first failed attempt; then the message is dead-lettered.
    pub max_retries: u32,
    /// Backoff before the first retry; doubles per retry, with jitter.
    pub retry_delay_ms: u64,
    /// Upper bound of the backoff.
    pub max_retry_delay_ms: u64,
    /// The longest one handler call (a batch) may take: past it the call is a failed attempt (an
    /// isolated worker is killed; in process, liveness fails so that a supervisor restarts the host).
    pub handler_timeout_ms: u64,
    /// `[server] max_message_bytes`, the same for every subscription: a message read that is larger
    /// is dead-lettered unhandled, and a handler's write that is larger fails its message for good.
    pub max_message_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            messages_per_tick: 100,
            max_retries: 3,
            retry_delay_ms: 1000,
            max_retry_delay_ms: 30_000,
            handler_timeout_ms: 30_000,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// 1 MiB: Kafka's and NATS' default message limit and EventStoreDB's largest append. Redis (512 MB
/// strings) and MessageDB (jsonb, 255 MiB) set none, and Protean none of its own; but handling a
/// message costs a small multiple of its size in memory, times a batch, so the limit is what keeps a
/// replica within its container's memory.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Config {
    /// Where events, positions and documents live.
    #[serde(serialize_with = "store_as_text")]
    pub store: StoreConfig,
    /// How long a signal-triggered shutdown waits for in-flight batches.
    pub shutdown_grace: Duration,
    /// How long test mode may run before it gives up (exit 1).
    pub test_mode_timeout: Duration,
    /// How often an idle subscription looks for messages written by other processes.
    pub poll_interval: Duration,
    /// How often a batch is re-run after a version conflict before it counts as a failure.
    pub version_retries: u32,
    /// The broker, when one is configured (`[brokers.default]`).
    pub broker: Option<BrokerConfig>,
    /// How the outbox publishes to the broker.
    pub outbox: OutboxSettings,
    /// How long an event-store subscription's lease lasts when replicas share a broker.
    pub lease_ttl: Duration,
    /// Past this many library images mapped (each reload maps one more), a reload warns.
    pub max_generations: u64,
    /// How long the probe process of a build (loading it and constructing its instance before this
    /// process does) may take before it is killed and the build refused.
    pub probe_timeout: Duration,
    /// The health and metrics server (`[server.health]`).
    pub health: HealthSettings,
    /// Ordered subscriptions (`[server.ordering]`).
    pub ordering: OrderingSettings,
    /// Firing schedules (`[server.scheduler]`).
    pub scheduler: SchedulerSettings,
    /// How long one handler call may run. An isolated worker process past it is killed.
    pub handler_timeout: Duration,
    /// Where the domain's code runs (`[server] isolation`, `[server.worker]`).
    pub isolation: IsolationSettings,
    /// The largest message (data and metadata, in bytes) sent, read, handled or written.
    pub max_message_bytes: usize,
    /// Threads of the async runtime (`[server] runtime_threads`); none: [`default_runtime_threads`].
    pub runtime_threads: Option<u16>,
    default_subscription_type: Option<SubscriptionType>,
    server: Profile,
    server_profile: Option<String>,
    handlers: BTreeMap<String, HandlerSection>,
    profiles: BTreeMap<String, Profile>,
}

/// Every default of `[server]` that is not a subscription's or a section's own: those are the
/// `Default`s of [`Settings`], [`OutboxSettings`], [`HealthSettings`] and [`OrderingSettings`], and
/// the store's and broker's constants in their modules.
impl Default for Config {
    fn default() -> Self {
        Self {
            store: StoreConfig::default(),
            shutdown_grace: Duration::from_secs(10),
            test_mode_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            version_retries: 3,
            broker: None,
            outbox: OutboxSettings::default(),
            lease_ttl: Duration::from_secs(10),
            max_generations: 20,
            probe_timeout: Duration::from_secs(30),
            health: HealthSettings::default(),
            ordering: OrderingSettings::default(),
            scheduler: SchedulerSettings::default(),
            handler_timeout: Duration::from_millis(Settings::default().handler_timeout_ms),
            isolation: IsolationSettings::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            runtime_threads: None,
            default_subscription_type: None,
            server: Profile::default(),
            server_profile: None,
            handlers: BTreeMap::new(),
            profiles: BTreeMap::new(),
        }
    }
}

/// The async runtime's threads when `[server] runtime_threads` is not set: half the CPUs this process
/// may use (its cgroup's quota included), at least one. The runtime only moves bytes and coordinates:
/// store commits and handler calls run on blocking threads of their own, which need the other half.
/// On two cores, one runtime thread instead of two made one subscription 4–31% faster (Redis consume,
/// outbox publishing, the SQLite no-op) and left the eight-subscription sample flows as they were
/// (`docs/performance-journal.md`, the sixteenth session).
pub fn default_runtime_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    (cpus / 2).max(1)
}

impl Config {
    /// The async runtime's threads: `[server] runtime_threads`, else [`default_runtime_threads`].
    pub fn runtime_threads(&self) -> usize {
        self.runtime_threads
            .map_or_else(default_runtime_threads, usize::from)
    }

    /// Load `path` (or `./protean.toml` if it exists, or the defaults) with the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let default = Path::new("protean.toml");
        match path {
            Some(path) => Self::load_file(path, &env),
            None if default.is_file() => Self::load_file(default, &env),
            None => Ok(Self::default()),
        }
    }

    /// Load `path`, substituting variables and selecting the overlay from `env`.
    pub fn load_file(path: &Path, env: &BTreeMap<String, String>) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, path, env)
    }

    /// Parse configuration text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path, env: &BTreeMap<String, String>) -> Result<Self, Error> {
        let raw = raw::parse(text, path, env)?;
        Self::resolve(raw).map_err(|invalid| invalid.at(path))
    }

    /// The settings of `handler`, given what it declares in code.
    pub fn settings(&self, handler: &str, declared: &HandlerOptions) -> Settings {
        self.layered(self.handlers.get(handler), declared)
    }

    /// The layers of a subscription's settings, lowest first, up to a handler's section if any.
    fn layered(&self, section: Option<&HandlerSection>, declared: &HandlerOptions) -> Settings {
        let mut settings = Settings {
            max_message_bytes: self.max_message_bytes,
            ..Settings::default()
        };
        // Profiles were validated when the configuration was resolved.
        let profile = |name: &Option<String>| {
            name.as_deref()
                .and_then(|name| Profile::find(&self.profiles, name, "").ok())
        };
        if let Some(p) = profile(&self.server_profile) {
            p.apply(&mut settings);
        }
        self.server.apply(&mut settings);
        Profile {
            messages_per_tick: declared.messages_per_tick,
            max_retries: declared.max_retries,
            handler_timeout_ms: declared.timeout_ms,
            ..Profile::default()
        }
        .apply(&mut settings);
        if let Some(section) = section {
            if let Some(p) = profile(&section.profile) {
                p.apply(&mut settings);
            }
            section.settings().apply(&mut settings);
        }
        settings
    }

    /// The subscription type configured for `handler` (its own key, else `[server]`'s), if any.
    pub fn subscription_type(&self, handler: &str) -> Option<SubscriptionType> {
        self.handlers
            .get(handler)
            .and_then(|h| h.subscription_type)
            .or(self.default_subscription_type)
    }

    /// Handler names configured in `[server.handlers]`, to warn about ones the domain does not have.
    pub fn configured_handlers(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}

/// Where a handler's messages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionType {
    /// The event store, by category, from a stored position (one replica at a time).
    EventStore,
    /// Broker streams, through a consumer group (every replica shares the work).
    Stream,
}

/// Outbox publishing settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OutboxSettings {
    /// Rows claimed and published per round.
    pub messages_per_tick: u32,
    /// Failed attempts after which a row counts as held: logged as an ERROR (then reminded every
    /// [`OutboxSettings::REMIND_EVERY`] attempts) and counted as held in status and metrics. A held row
    /// is still retried, at the longest backoff: a committed message is never given up.
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles per attempt, with jitter.
    pub retry_delay_ms: u64,
    /// Upper bound of the backoff.
    pub max_retry_delay_ms: u64,
    /// How long a processor holds the target streams it claimed: a stopped replica's streams are
    /// published by another one after this long.
    pub lease_ttl: Duration,
}

impl OutboxSettings {
    /// A held row is logged again every this many attempts.
    pub const REMIND_EVERY: u32 = 10;
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            messages_per_tick: 500,
            max_attempts: 10,
            retry_delay_ms: 1000,
            max_retry_delay_ms: 60_000,
            lease_ttl: Duration::from_secs(5),
        }
    }
}

/// Firing schedules (`[server.scheduler]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SchedulerSettings {
    /// How often a replica looks for schedules it did not set itself (another replica's, or one set
    /// while it was down): the longest a schedule set elsewhere, due sooner than this, can be late.
    /// Schedules this replica sets wake it by themselves.
    pub poll_interval: Duration,
    /// Schedules fired per commit, at most.
    pub batch: u32,
    /// A pending schedule this long past due counts as overdue (status, readiness, metrics).
    pub overdue_after: Duration,
    /// How long fired and cancelled schedules stay listed (`schedules list`, `inspect`) before the
    /// scheduler deletes them: the table would otherwise grow with every schedule ever set.
    pub keep_settled: Duration,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            batch: 100,
            overdue_after: Duration::from_secs(10),
            keep_settled: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Ordered subscriptions (`[server.ordering]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OrderingSettings {
    /// Partitions the keys of a broker-fed ordered subscription are spread over; each belongs to one
    /// replica at a time. Fixed for the life of its consumer group: changing it moves keys between
    /// partitions, so change it only while the subscription is drained.
    pub partitions: u32,
    /// How long a replica's hold on a partition lasts without renewal: a dead replica's keys are
    /// served again by others within this time plus a renewal interval.
    pub lease_ttl: Duration,
    /// Event-store ordered subscriptions: workers in one process, each handling the keys that fall to it
    /// and keeping its own position (`{subscription}#{w}/{workers}`). It may change between runs: new
    /// workers start from the subscription's plain position, or from the start (see
    /// `subscription::workers`).
    pub workers: u32,
}

impl Default for OrderingSettings {
    fn default() -> Self {
        Self {
            partitions: 32,
            lease_ttl: Duration::from_secs(10),
            workers: 4,
        }
    }
}

impl OrderingSettings {
    /// How often a replica renews its partitions and looks for ones to take (or give back): often
    /// enough that a dead replica's partitions are taken within the lease time plus a second.
    pub fn renew_interval(&self) -> Duration {
        (self.lease_ttl / 4).min(Duration::from_secs(1))
    }
}

/// Where the domain's code runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IsolationMode {
    /// In the host process: the fastest, but a crash of the domain is a crash of the host.
    #[default]
    None,
    /// In worker processes the host supervises: a crash or a hang costs one call.
    Process,
}

/// `[server] isolation` and the limits of each worker process (`[server.worker]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IsolationSettings {
    pub mode: IsolationMode,
    /// The worker's data memory (heap and private writable mappings), in MiB: past it an allocation
    /// fails and the worker dies, not the host.
    pub memory_limit_mb: Option<u64>,
    /// CPU seconds one call (or the domain's start) may use before the worker is killed.
    pub cpu_limit_seconds: Option<u64>,
}

/// The health and metrics server (`[server.health]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HealthSettings {
    /// `Some(true)` runs it even in test mode, `Some(false)` never; `None`: except in test mode.
    pub enabled: Option<bool>,
    /// The address to listen on (an IP address, or `localhost`).
    pub host: String,
    /// The port; 0 picks a free one (logged).
    pub port: u16,
    /// A loop with work pending that has made no progress for this long fails readiness.
    pub stall_after: Duration,
    /// An outbox whose oldest pending row was committed longer ago than this fails readiness.
    pub outbox_max_age: Duration,
    /// How long the store and broker get to answer a readiness check.
    pub check_timeout: Duration,
    /// How long a client gets to send its request headers.
    pub request_timeout: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            enabled: None,
            host: "127.0.0.1".into(),
            port: 8080,
            stall_after: Duration::from_secs(60),
            outbox_max_age: Duration::from_secs(60),
            check_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl HealthSettings {
    /// Whether the server runs, given the mode.
    pub fn runs(&self, test_mode: bool) -> bool {
        self.enabled.unwrap_or(!test_mode)
    }
}

fn store_as_text<S: serde::Serializer>(store: &StoreConfig, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&match store {
        StoreConfig::Memory => "memory".to_owned(),
        StoreConfig::Sqlite { path } => format!("sqlite:{}", path.display()),
        StoreConfig::Postgres(config) => format!("postgres:{}", config.label()),
    })
}
