//! Configuration: `protean.toml`, parsed strictly, then resolved.
//!
//! ```toml
//! [store]
//! provider = "sqlite"                  # or "memory", or "postgres" with uri = "postgresql://..."
//! path = "${STORE_PATH|.protean/store.db}"
//!
//! [server]
//! messages_per_tick = 100              # defaults for every subscription ...
//! max_retries = 3
//! profile = "fast"                     # ... optionally starting from a profile
//! max_message_bytes = 1048576          # data + metadata of one message, on every way in and out
//!
//! [server.handlers.inventory]          # per-handler overrides (by handler name)
//! max_retries = 5
//!
//! [profiles.careful]                   # named bundles of subscription settings
//! max_retries = 10
//! retry_delay_ms = 5000
//!
//! [env.production.store]               # overlaid on the root when PROTEAN_ENV=production
//! path = "/var/lib/shop/store.db"
//! ```
//!
//! Order of resolution for a subscription's settings, lowest first: built-in defaults, the `[server]`
//! profile, `[server]` keys, what the handler declares in code, the handler's profile, the handler's keys.
//! Operators have the last word over code. Unknown keys and bad values are errors naming the key.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use protean_plugin_api::HandlerOptions;
use serde::Deserialize;

use crate::{
    broker::{BrokerConfig, GroupStart},
    store::{PostgresConfig, StoreConfig},
};

/// Why the configuration could not be used. Each names the file and the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("cannot read config file {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("config file {}, line {line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("config file {}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

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

/// The largest `max_message_bytes`: a PostgreSQL jsonb value holds no more.
const MAX_MESSAGE_BYTES_CEILING: u64 = 268_435_455;

/// The smallest `max_message_bytes`: the metadata the host writes is about 700 bytes, and a limit of
/// a few bytes is a unit mistaken (KB or MB for bytes).
const MAX_MESSAGE_BYTES_FLOOR: u64 = 4096;

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
    /// How long one handler call may run. An isolated worker process past it is killed.
    pub handler_timeout: Duration,
    /// Where the domain's code runs (`[server] isolation`, `[server.worker]`).
    pub isolation: IsolationSettings,
    /// The largest message (data and metadata, in bytes) sent, read, handled or written.
    pub max_message_bytes: usize,
    default_subscription_type: Option<SubscriptionType>,
    server: Profile,
    server_profile: Option<String>,
    handlers: BTreeMap<String, HandlerSection>,
    profiles: BTreeMap<String, Profile>,
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

/// Subscription settings as written; every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    messages_per_tick: Option<u32>,
    max_retries: Option<u32>,
    retry_delay_ms: Option<u64>,
    max_retry_delay_ms: Option<u64>,
    handler_timeout_ms: Option<u64>,
}

impl Profile {
    fn apply(&self, s: &mut Settings) {
        s.messages_per_tick = self.messages_per_tick.unwrap_or(s.messages_per_tick);
        s.max_retries = self.max_retries.unwrap_or(s.max_retries);
        s.retry_delay_ms = self.retry_delay_ms.unwrap_or(s.retry_delay_ms);
        s.max_retry_delay_ms = self.max_retry_delay_ms.unwrap_or(s.max_retry_delay_ms);
        s.handler_timeout_ms = self.handler_timeout_ms.unwrap_or(s.handler_timeout_ms);
    }

    fn builtin(name: &str) -> Option<Self> {
        let (mpt, retries, delay) = match name {
            "fast" => (10, 2, 100),
            "batch" => (500, 5, 2000),
            "debug" => (1, 1, 0),
            _ => return None,
        };
        Some(Self {
            messages_per_tick: Some(mpt),
            max_retries: Some(retries),
            retry_delay_ms: Some(delay),
            max_retry_delay_ms: None,
            handler_timeout_ms: None,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
    #[serde(default)]
    brokers: BTreeMap<String, BrokerSection>,
    #[serde(default)]
    outbox: OutboxSection,
    // `[env.NAME]` overlays are merged (or dropped) before parsing.
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BrokerSection {
    uri: String,
    #[serde(default)]
    group_start: GroupStart,
    block_ms: Option<u64>,
    claim_idle_ms: Option<u64>,
    reclaim_interval_ms: Option<u64>,
    tls_ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboxSection {
    messages_per_tick: Option<u32>,
    max_attempts: Option<u32>,
    retry_delay_ms: Option<u64>,
    max_retry_delay_ms: Option<u64>,
    lease_ttl_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    #[serde(default)]
    provider: Provider,
    path: Option<PathBuf>,
    uri: Option<String>,
    pool_size: Option<u32>,
    statement_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Provider {
    Memory,
    #[default]
    Sqlite,
    Postgres,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    profile: Option<String>,
    messages_per_tick: Option<u32>,
    max_retries: Option<u32>,
    retry_delay_ms: Option<u64>,
    max_retry_delay_ms: Option<u64>,
    handler_timeout_ms: Option<u64>,
    shutdown_grace_seconds: Option<u64>,
    test_mode_timeout_seconds: Option<u64>,
    poll_interval_ms: Option<u64>,
    version_retries: Option<u32>,
    subscription_type: Option<SubscriptionType>,
    lease_ttl_ms: Option<u64>,
    max_generations: Option<u64>,
    probe_timeout_seconds: Option<u64>,
    isolation: Option<IsolationMode>,
    #[serde(default)]
    worker: WorkerSection,
    max_message_bytes: Option<u64>,
    #[serde(default)]
    handlers: BTreeMap<String, HandlerSection>,
    #[serde(default)]
    health: HealthSection,
    #[serde(default)]
    ordering: OrderingSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerSection {
    memory_limit_mb: Option<u64>,
    cpu_limit_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderingSection {
    partitions: Option<u32>,
    lease_ttl_ms: Option<u64>,
    workers: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthSection {
    enabled: Option<bool>,
    host: Option<String>,
    port: Option<u16>,
    stall_after_ms: Option<u64>,
    outbox_max_age_ms: Option<u64>,
    check_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct HandlerSection {
    profile: Option<String>,
    subscription_type: Option<SubscriptionType>,
    messages_per_tick: Option<u32>,
    max_retries: Option<u32>,
    retry_delay_ms: Option<u64>,
    max_retry_delay_ms: Option<u64>,
    handler_timeout_ms: Option<u64>,
}

impl HandlerSection {
    fn settings(&self) -> Profile {
        Profile {
            messages_per_tick: self.messages_per_tick,
            max_retries: self.max_retries,
            retry_delay_ms: self.retry_delay_ms,
            max_retry_delay_ms: self.max_retry_delay_ms,
            handler_timeout_ms: self.handler_timeout_ms,
        }
    }
}

/// `[server] isolation` with `[server.worker]`'s limits, which only a worker process can have.
fn isolation(s: &ServerSection) -> Result<IsolationSettings, (&'static str, String)> {
    let mode = s.isolation.unwrap_or_default();
    let limits = [
        ("server.worker.memory_limit_mb", s.worker.memory_limit_mb),
        (
            "server.worker.cpu_limit_seconds",
            s.worker.cpu_limit_seconds,
        ),
    ];
    for (key, value) in limits {
        match value {
            Some(0) => return Err((key, "must be at least 1".into())),
            Some(_) if mode == IsolationMode::None => return Err((
                key,
                "applies to isolation = \"process\" only; set it in [server], or remove this key"
                    .into(),
            )),
            _ => {}
        }
    }
    Ok(IsolationSettings {
        mode,
        memory_limit_mb: s.worker.memory_limit_mb,
        cpu_limit_seconds: s.worker.cpu_limit_seconds,
    })
}

/// The store section resolved; a bad value is (key, what is wrong and how to fix it).
fn store(section: StoreSection) -> Result<StoreConfig, (&'static str, String)> {
    let postgres_only = [
        ("store.uri", section.uri.is_some()),
        ("store.pool_size", section.pool_size.is_some()),
        (
            "store.statement_timeout_ms",
            section.statement_timeout_ms.is_some(),
        ),
    ];
    if !matches!(section.provider, Provider::Postgres) {
        if let Some((key, _)) = postgres_only.iter().find(|(_, set)| *set) {
            return Err((
                key,
                "applies to provider = \"postgres\" only; remove it or set the provider".into(),
            ));
        }
    }
    Ok(match section.provider {
        Provider::Memory => StoreConfig::Memory,
        Provider::Sqlite => StoreConfig::Sqlite {
            path: section.path.unwrap_or_else(|| DEFAULT_STORE_PATH.into()),
        },
        Provider::Postgres => StoreConfig::Postgres(postgres_store(section)?),
    })
}

fn postgres_store(section: StoreSection) -> Result<PostgresConfig, (&'static str, String)> {
    if section.path.is_some() {
        return Err((
            "store.path",
            "applies to provider = \"sqlite\" only; the PostgreSQL store is named by store.uri"
                .into(),
        ));
    }
    let uri = section.uri.ok_or((
        "store.uri",
        "is required for provider = \"postgres\"; set it like uri = \"postgresql://user:password@host:5432/database\"".to_owned(),
    ))?;
    let config = PostgresConfig {
        uri: uri.into(),
        pool_size: section.pool_size.unwrap_or(16),
        statement_timeout: Duration::from_millis(section.statement_timeout_ms.unwrap_or(30_000)),
    };
    if config.pool_size == 0 {
        return Err(("store.pool_size", "must be at least 1".into()));
    }
    if config.statement_timeout.is_zero() {
        return Err(("store.statement_timeout_ms", "must be at least 1".into()));
    }
    config.parse().map_err(|reason| ("store.uri", reason))?;
    Ok(config)
}

/// The default store file, relative to the working directory.
pub const DEFAULT_STORE_PATH: &str = ".protean/store.db";

impl Default for Config {
    fn default() -> Self {
        Self::from_raw(RawConfig::default(), Path::new("<defaults>"))
            .expect("the defaults are valid")
    }
}

impl Config {
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
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Syntax {
            path: path.into(),
            line: e
                .span()
                .map_or(1, |s| text[..s.start].lines().count().max(1)),
            message: e.message().to_owned(),
        })?;
        let overlays = table.remove("env");
        if let (Some(name), Some(toml::Value::Table(overlays))) = (env.get("PROTEAN_ENV"), overlays)
        {
            if let Some(toml::Value::Table(section)) = overlays.get(name) {
                merge(&mut table, section.clone());
            }
        }
        substitute(&mut table, "", env).map_err(|(key, message)| Error::Invalid {
            path: path.into(),
            key,
            message,
        })?;
        let raw: RawConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                Error::Invalid {
                    path: path.into(),
                    key: e.path().to_string(),
                    message: e.inner().message().to_owned(),
                }
            })?;
        Self::from_raw(raw, path)
    }

    fn from_raw(raw: RawConfig, path: &Path) -> Result<Self, Error> {
        let invalid = |key: &str, message: String| Error::Invalid {
            path: path.into(),
            key: key.into(),
            message,
        };
        let store = store(raw.store).map_err(|(key, message)| invalid(key, message))?;
        let s = &raw.server;
        let broker = broker(raw.brokers, path)?;
        let outbox = outbox(&raw.outbox).map_err(|(k, m)| invalid(&k, m))?;
        if s.subscription_type == Some(SubscriptionType::Stream) && broker.is_none() {
            return Err(invalid(
                "server.subscription_type",
                "\"stream\" needs a broker; add [brokers.default] with a uri".into(),
            ));
        }
        let health = health(&s.health).map_err(|(k, m)| invalid(&k, m))?;
        let ordering = ordering(&s.ordering).map_err(|(k, m)| invalid(&k, m))?;
        let isolation = isolation(s).map_err(|(k, m)| invalid(k, m))?;
        // A lease shorter than a renewal round trip is lost between renewals: every replica would
        // take it in turn. Said, not clamped, so the operator learns the value is not what runs.
        if s.lease_ttl_ms.is_some_and(|ms| ms < 100) {
            return Err(invalid(
                "server.lease_ttl_ms",
                "must be at least 100".into(),
            ));
        }
        if s.test_mode_timeout_seconds == Some(0) {
            return Err(invalid(
                "server.test_mode_timeout_seconds",
                "must be at least 1".into(),
            ));
        }
        let max_message_bytes = max_message_bytes(s.max_message_bytes)
            .map_err(|m| invalid("server.max_message_bytes", m))?;
        // 0 would refuse every build; there is no switch to skip the probe (see plugin::probe).
        if s.probe_timeout_seconds == Some(0) {
            return Err(invalid(
                "server.probe_timeout_seconds",
                "must be at least 1 (the seconds a new build may take to load and construct its domain instance)".into(),
            ));
        }
        let config = Self {
            store,
            shutdown_grace: Duration::from_secs(s.shutdown_grace_seconds.unwrap_or(10)),
            test_mode_timeout: Duration::from_secs(s.test_mode_timeout_seconds.unwrap_or(60)),
            poll_interval: Duration::from_millis(s.poll_interval_ms.unwrap_or(1000)),
            version_retries: s.version_retries.unwrap_or(3),
            broker,
            outbox,
            lease_ttl: Duration::from_millis(s.lease_ttl_ms.unwrap_or(10_000)),
            max_generations: s.max_generations.unwrap_or(20),
            probe_timeout: Duration::from_secs(s.probe_timeout_seconds.unwrap_or(30)),
            health,
            ordering,
            handler_timeout: Duration::from_millis(s.handler_timeout_ms.unwrap_or(30_000)),
            isolation,
            max_message_bytes,
            default_subscription_type: s.subscription_type,
            server: Profile {
                messages_per_tick: s.messages_per_tick,
                max_retries: s.max_retries,
                retry_delay_ms: s.retry_delay_ms,
                max_retry_delay_ms: s.max_retry_delay_ms,
                handler_timeout_ms: s.handler_timeout_ms,
            },
            server_profile: s.profile.clone(),
            handlers: raw.server.handlers,
            profiles: raw.profiles,
        };
        if config.poll_interval.is_zero() {
            return Err(invalid(
                "server.poll_interval_ms",
                "must be at least 1".into(),
            ));
        }
        for (name, profile) in &config.profiles {
            if Profile::builtin(name).is_some() {
                return Err(invalid(
                    &format!("profiles.{name}"),
                    format!("{name:?} is a built-in profile; choose another name"),
                ));
            }
            validate(profile, &format!("profiles.{name}")).map_err(|(k, m)| invalid(&k, m))?;
        }
        validate(&config.server, "server").map_err(|(k, m)| invalid(&k, m))?;
        config
            .profile(config.server_profile.as_deref(), "server.profile")
            .map_err(|(k, m)| invalid(&k, m))?;
        for (name, handler) in &config.handlers {
            let key = format!("server.handlers.{name}");
            validate(&handler.settings(), &key).map_err(|(k, m)| invalid(&k, m))?;
            config
                .profile(handler.profile.as_deref(), &format!("{key}.profile"))
                .map_err(|(k, m)| invalid(&k, m))?;
        }
        Ok(config)
    }

    fn profile(&self, name: Option<&str>, key: &str) -> Result<Option<Profile>, (String, String)> {
        let Some(name) = name else { return Ok(None) };
        if let Some(found) = self
            .profiles
            .get(name)
            .cloned()
            .or_else(|| Profile::builtin(name))
        {
            return Ok(Some(found));
        }
        let mut known: Vec<&str> = vec!["fast", "batch", "debug"];
        known.extend(self.profiles.keys().map(String::as_str));
        Err((
            key.into(),
            format!(
                "unknown profile {name:?}; known profiles: {}",
                known.join(", ")
            ),
        ))
    }

    /// The settings of `handler`, given what it declares in code.
    pub fn settings(&self, handler: &str, declared: &HandlerOptions) -> Settings {
        let mut settings = Settings {
            max_message_bytes: self.max_message_bytes,
            ..Settings::default()
        };
        // Profiles were validated when the configuration was built.
        let profile = |name: Option<&str>| self.profile(name, "").ok().flatten();
        if let Some(p) = profile(self.server_profile.as_deref()) {
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
        if let Some(section) = self.handlers.get(handler) {
            if let Some(p) = profile(section.profile.as_deref()) {
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

fn broker(
    mut brokers: BTreeMap<String, BrokerSection>,
    path: &Path,
) -> Result<Option<BrokerConfig>, Error> {
    let invalid = |key: String, message: String| Error::Invalid {
        path: path.into(),
        key,
        message,
    };
    if let Some(other) = brokers.keys().find(|name| *name != "default") {
        return Err(invalid(
            format!("brokers.{other}"),
            "only [brokers.default] is supported; rename the section".into(),
        ));
    }
    let Some(b) = brokers.remove("default") else {
        return Ok(None);
    };
    if !b.uri.contains("://") {
        return Err(invalid(
            "brokers.default.uri".into(),
            // The value itself is not shown: without a scheme there is no telling which part is a password.
            "is not a URI (no scheme://); write redis://HOST:PORT[/DB] or redis://:PASSWORD@HOST:PORT[/DB]"
                .into(),
        ));
    }
    let block = Duration::from_millis(b.block_ms.unwrap_or(1000));
    if block.is_zero() {
        return Err(invalid(
            "brokers.default.block_ms".into(),
            "must be at least 1 (0 would block forever)".into(),
        ));
    }
    // 0 would take every pending entry from its consumer at once (claim) or spin (reclaim).
    for (key, value) in [
        ("claim_idle_ms", b.claim_idle_ms),
        ("reclaim_interval_ms", b.reclaim_interval_ms),
    ] {
        if value == Some(0) {
            return Err(invalid(
                format!("brokers.default.{key}"),
                "must be at least 1".into(),
            ));
        }
    }
    let tls = crate::broker::TlsFiles {
        ca_file: b.tls_ca_file,
        cert_file: b.tls_cert_file,
        key_file: b.tls_key_file,
    };
    if tls != crate::broker::TlsFiles::default() && !b.uri.starts_with("rediss://") {
        return Err(invalid(
            "brokers.default.uri".into(),
            "tls_ca_file, tls_cert_file and tls_key_file need a TLS connection; write rediss://HOST:PORT[/DB]".into(),
        ));
    }
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err(invalid(
            "brokers.default.tls_cert_file".into(),
            "tls_cert_file and tls_key_file go together (a client certificate and its key)".into(),
        ));
    }
    Ok(Some(BrokerConfig {
        uri: b.uri.into(),
        tls,
        group_start: b.group_start,
        block,
        claim_idle: Duration::from_millis(b.claim_idle_ms.unwrap_or(30_000)),
        reclaim_interval: Duration::from_millis(b.reclaim_interval_ms.unwrap_or(5_000)),
    }))
}

/// `server.max_message_bytes`, checked: between the floor and what PostgreSQL can store.
fn max_message_bytes(value: Option<u64>) -> Result<usize, String> {
    match value {
        None => Ok(DEFAULT_MAX_MESSAGE_BYTES),
        Some(n) if n < MAX_MESSAGE_BYTES_FLOOR => Err(format!(
            "{n} is below {MAX_MESSAGE_BYTES_FLOOR}; the value is in bytes (1 MiB = 1048576)"
        )),
        Some(n) if n > MAX_MESSAGE_BYTES_CEILING => Err(format!(
            "{n} is above {MAX_MESSAGE_BYTES_CEILING}, the most a PostgreSQL jsonb value holds; keep large payloads outside messages and send a reference"
        )),
        Some(n) => Ok(usize::try_from(n).expect("at most the ceiling, which fits")),
    }
}

/// `[outbox]`, checked: at least one message per tick and attempt, a lease of at least 100 ms.
fn outbox(o: &OutboxSection) -> Result<OutboxSettings, (String, String)> {
    let defaults = OutboxSettings::default();
    let settings = OutboxSettings {
        messages_per_tick: o.messages_per_tick.unwrap_or(defaults.messages_per_tick),
        max_attempts: o.max_attempts.unwrap_or(defaults.max_attempts),
        retry_delay_ms: o.retry_delay_ms.unwrap_or(defaults.retry_delay_ms),
        max_retry_delay_ms: o.max_retry_delay_ms.unwrap_or(defaults.max_retry_delay_ms),
        lease_ttl: o
            .lease_ttl_ms
            .map_or(defaults.lease_ttl, Duration::from_millis),
    };
    let at_least =
        |key: &str, min: &str| Err((format!("outbox.{key}"), format!("must be at least {min}")));
    match settings {
        OutboxSettings {
            messages_per_tick: 0,
            ..
        } => at_least("messages_per_tick", "1"),
        OutboxSettings {
            max_attempts: 0, ..
        } => at_least("max_attempts", "1"),
        s if s.lease_ttl < Duration::from_millis(100) => at_least("lease_ttl_ms", "100"),
        s => Ok(s),
    }
}

/// `[server.ordering]`, checked: at least one partition and worker, a lease of at least 100 ms.
fn ordering(o: &OrderingSection) -> Result<OrderingSettings, (String, String)> {
    let defaults = OrderingSettings::default();
    let settings = OrderingSettings {
        partitions: o.partitions.unwrap_or(defaults.partitions),
        lease_ttl: o
            .lease_ttl_ms
            .map_or(defaults.lease_ttl, Duration::from_millis),
        workers: o.workers.unwrap_or(defaults.workers),
    };
    let at_least = |key: &str, min: &str| {
        Err((
            format!("server.ordering.{key}"),
            format!("must be at least {min}"),
        ))
    };
    match settings {
        OrderingSettings {
            partitions: 0 | 4097..,
            ..
        } => Err((
            "server.ordering.partitions".into(),
            "must be between 1 and 4096".into(),
        )),
        OrderingSettings { workers: 0, .. } => at_least("workers", "1"),
        s if s.lease_ttl < Duration::from_millis(100) => at_least("lease_ttl_ms", "100"),
        s => Ok(s),
    }
}

/// `[server.health]`, checked: every duration at least 1 ms, the host an address to bind.
fn health(h: &HealthSection) -> Result<HealthSettings, (String, String)> {
    let defaults = HealthSettings::default();
    let host = h.host.clone().unwrap_or(defaults.host);
    if host != "localhost" && host.parse::<std::net::IpAddr>().is_err() {
        return Err((
            "server.health.host".into(),
            format!("{host:?} is not an IP address; write 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"),
        ));
    }
    let millis = |key: &str, value: Option<u64>, default: Duration| match value {
        Some(0) => Err((
            format!("server.health.{key}"),
            "must be at least 1".to_owned(),
        )),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Ok(default),
    };
    Ok(HealthSettings {
        enabled: h.enabled,
        host,
        port: h.port.unwrap_or(defaults.port),
        stall_after: millis("stall_after_ms", h.stall_after_ms, defaults.stall_after)?,
        outbox_max_age: millis(
            "outbox_max_age_ms",
            h.outbox_max_age_ms,
            defaults.outbox_max_age,
        )?,
        check_timeout: millis(
            "check_timeout_ms",
            h.check_timeout_ms,
            defaults.check_timeout,
        )?,
        request_timeout: millis(
            "request_timeout_ms",
            h.request_timeout_ms,
            defaults.request_timeout,
        )?,
    })
}

fn validate(profile: &Profile, key: &str) -> Result<(), (String, String)> {
    if profile.messages_per_tick == Some(0) {
        return Err((
            format!("{key}.messages_per_tick"),
            "must be at least 1".into(),
        ));
    }
    if profile.handler_timeout_ms == Some(0) {
        return Err((
            format!("{key}.handler_timeout_ms"),
            "must be at least 1 (a handler needs some time; raise it for slow handlers)".into(),
        ));
    }
    if let (Some(delay), Some(max)) = (profile.retry_delay_ms, profile.max_retry_delay_ms) {
        if max < delay {
            return Err((
                format!("{key}.max_retry_delay_ms"),
                format!("{max} is below retry_delay_ms {delay}"),
            ));
        }
    }
    Ok(())
}

/// Replace `${VAR}` and `${VAR|default}` in every string value.
fn substitute(
    table: &mut toml::Table,
    prefix: &str,
    env: &BTreeMap<String, String>,
) -> Result<(), (String, String)> {
    for (key, value) in table.iter_mut() {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        substitute_value(value, &path, env)?;
    }
    Ok(())
}

fn substitute_value(
    value: &mut toml::Value,
    path: &str,
    env: &BTreeMap<String, String>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) => *s = expand(s, env).map_err(|m| (path.to_owned(), m))?,
        toml::Value::Table(t) => substitute(t, path, env)?,
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_value(item, &format!("{path}[{i}]"), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand(text: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            return Err(format!(
                "unclosed ${{ in {text:?}; write ${{VAR}} or ${{VAR|default}}"
            ));
        };
        let inner = &rest[start + 2..start + end];
        let (name, default) = match inner.split_once('|') {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        match (env.get(name), default) {
            (Some(value), _) => out.push_str(value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set; set it or write ${{{name}|default}}"
                ))
            }
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Merge an `[env.NAME]` overlay over the root, table by table.
fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming)) => {
                merge(existing, incoming)
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, Error> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(text, Path::new("protean.toml"), &env)
    }

    #[test]
    fn defaults_are_sqlite_under_dot_protean() {
        let config = parse("", &[]).unwrap();
        assert_eq!(
            config.store,
            StoreConfig::Sqlite {
                path: DEFAULT_STORE_PATH.into()
            }
        );
        assert_eq!(
            config.settings("any", &HandlerOptions::default()),
            Settings::default()
        );
    }

    #[test]
    fn settings_resolve_from_defaults_to_handler_keys() {
        let config = parse(
            r#"
            [server]
            profile = "fast"
            max_retries = 4
            [server.handlers.inventory]
            profile = "careful"
            messages_per_tick = 7
            handler_timeout_ms = 900
            [profiles.careful]
            retry_delay_ms = 5000
            "#,
            &[],
        )
        .unwrap();
        let declared = HandlerOptions {
            max_retries: Some(9),
            messages_per_tick: Some(50),
            timeout_ms: Some(2000),
            ..HandlerOptions::default()
        };
        let other = config.settings("billing", &declared);
        assert_eq!(
            (
                other.messages_per_tick,
                other.max_retries,
                other.retry_delay_ms
            ),
            (50, 9, 100)
        );
        let inventory = config.settings("inventory", &declared);
        assert_eq!(
            (
                inventory.messages_per_tick,
                inventory.max_retries,
                inventory.retry_delay_ms
            ),
            (7, 9, 5000)
        );
        let plain = config.settings("billing", &HandlerOptions::default());
        assert_eq!((plain.messages_per_tick, plain.max_retries), (10, 4));
        // A deadline: the default, what the handler declares in code, the operator's key over both.
        assert_eq!(plain.handler_timeout_ms, 30_000);
        assert_eq!(other.handler_timeout_ms, 2000);
        assert_eq!(inventory.handler_timeout_ms, 900);
    }

    #[test]
    fn variables_and_env_overlays() {
        let text = r#"
            [store]
            path = "${DATA|/tmp}/store.db"
            [env.production.store]
            path = "${PROD_PATH}"
        "#;
        assert_eq!(
            parse(text, &[]).unwrap().store,
            StoreConfig::Sqlite {
                path: "/tmp/store.db".into()
            }
        );
        assert_eq!(
            parse(text, &[("DATA", "/d")]).unwrap().store,
            StoreConfig::Sqlite {
                path: "/d/store.db".into()
            }
        );
        let prod = parse(
            text,
            &[("PROTEAN_ENV", "production"), ("PROD_PATH", "/p.db")],
        )
        .unwrap();
        assert_eq!(
            prod.store,
            StoreConfig::Sqlite {
                path: "/p.db".into()
            }
        );
        let unset = parse(text, &[("PROTEAN_ENV", "production")]).unwrap_err();
        assert_eq!(
            unset.to_string(),
            "config file protean.toml: store.path: environment variable PROD_PATH is not set; set it or write ${PROD_PATH|default}"
        );
    }

    #[test]
    fn a_broker_makes_streams_possible() {
        let config = parse(
            "[brokers.default]\nuri = \"redis://127.0.0.1:6390/0\"\nclaim_idle_ms = 500\n[server.handlers.x]\nsubscription_type = \"event_store\"\n",
            &[],
        )
        .unwrap();
        let broker = config.broker.clone().unwrap();
        assert_eq!(
            (broker.claim_idle, broker.block),
            (Duration::from_millis(500), Duration::from_secs(1))
        );
        assert_eq!(
            config.subscription_type("x"),
            Some(SubscriptionType::EventStore)
        );
        assert_eq!(
            config.subscription_type("y"),
            None,
            "the engine picks the default by handler kind"
        );
        let no_broker = parse("[server]\nsubscription_type = \"stream\"\n", &[]).unwrap_err();
        assert!(
            no_broker
                .to_string()
                .contains("needs a broker; add [brokers.default]"),
            "{no_broker}"
        );
        let other = parse("[brokers.events]\nuri = \"redis://x\"\n", &[]).unwrap_err();
        assert!(
            other
                .to_string()
                .contains("only [brokers.default] is supported"),
            "{other}"
        );
    }

    #[test]
    fn health_settings_default_and_errors_name_the_key() {
        let config = parse("", &[]).unwrap();
        assert_eq!(config.health, HealthSettings::default());
        assert!(config.health.runs(false) && !config.health.runs(true));
        let on = parse(
            "[server.health]\nenabled = true\nport = 0\nstall_after_ms = 250\n",
            &[],
        )
        .unwrap();
        assert!(on.health.runs(true));
        assert_eq!(
            (on.health.port, on.health.stall_after),
            (0, Duration::from_millis(250))
        );
        let cases = [
            (
                "port = 70000",
                "server.health.port: invalid value: integer `70000`, expected u16",
            ),
            (
                "port = \"http\"",
                "server.health.port: invalid type: string \"http\", expected u16",
            ),
            (
                "host = \"example\"",
                "server.health.host: \"example\" is not an IP address; write 127.0.0.1",
            ),
            (
                "stall_after_ms = 0",
                "server.health.stall_after_ms: must be at least 1",
            ),
            (
                "request_timeout_ms = 0",
                "server.health.request_timeout_ms: must be at least 1",
            ),
            (
                "check_timeout_ms = 0",
                "server.health.check_timeout_ms: must be at least 1",
            ),
            (
                "stall_after = 5",
                "server.health.stall_after: unknown field `stall_after`, expected one of",
            ),
        ];
        for (line, expected) in cases {
            let error = parse(&format!("[server.health]\n{line}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with(&format!("config file protean.toml: {expected}")),
                "{line}: {error}"
            );
            assert_eq!(error.lines().count(), 1, "one line: {error}");
        }
    }

    #[test]
    fn the_message_size_limit_defaults_to_1_mib_and_reaches_every_subscription() {
        let defaults = parse("", &[]).unwrap();
        assert_eq!(defaults.max_message_bytes, 1_048_576);
        let raised = parse(
            "[server]\nmax_message_bytes = 20000000\n[server.handlers.x]\nprofile = \"fast\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(raised.max_message_bytes, 20_000_000);
        for handler in ["x", "y"] {
            assert_eq!(
                raised
                    .settings(handler, &HandlerOptions::default())
                    .max_message_bytes,
                20_000_000,
                "{handler}"
            );
        }
    }

    #[test]
    fn the_probe_time_limit_defaults_to_30_seconds_and_is_configurable() {
        assert_eq!(
            parse("", &[]).unwrap().probe_timeout,
            Duration::from_secs(30)
        );
        let config = parse("[server]\nprobe_timeout_seconds = 5\n", &[]).unwrap();
        assert_eq!(config.probe_timeout, Duration::from_secs(5));
    }

    #[test]
    fn the_outbox_lease_is_configurable_and_max_attempts_still_reads() {
        let config = parse("[outbox]\nmax_attempts = 3\nlease_ttl_ms = 1500\n", &[]).unwrap();
        assert_eq!(
            (config.outbox.max_attempts, config.outbox.lease_ttl),
            (3, Duration::from_millis(1500))
        );
        let defaults = parse("", &[]).unwrap();
        assert_eq!(defaults.outbox.lease_ttl, Duration::from_secs(5));
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let cases = [
            ("[server]\nmax_retrys = 3", "config file protean.toml: server.max_retrys: unknown field `max_retrys`, expected one of"),
            ("[server]\nmessages_per_tick = \"ten\"", "config file protean.toml: server.messages_per_tick: invalid type: string \"ten\", expected u32"),
            ("[server]\nmessages_per_tick = 0", "config file protean.toml: server.messages_per_tick: must be at least 1"),
            ("[server]\nhandler_timeout_ms = 0", "config file protean.toml: server.handler_timeout_ms: must be at least 1 (a handler needs some time; raise it for slow handlers)"),
            ("[server.handlers.x]\nhandler_timeout_ms = 0", "config file protean.toml: server.handlers.x.handler_timeout_ms: must be at least 1 (a handler needs some time; raise it for slow handlers)"),
            ("[store]\nprovider = \"mysql\"", "config file protean.toml: store.provider: unknown variant `mysql`, expected one of `memory`, `sqlite`, `postgres`"),
            ("[store]\nprovider = \"postgres\"", "config file protean.toml: store.uri: is required for provider = \"postgres\"; set it like uri = \"postgresql://user:password@host:5432/database\""),
            ("[store]\nprovider = \"postgres\"\nuri = \"postgresql://h:notaport/db\"", "config file protean.toml: store.uri: invalid connection string: invalid value for option `port`; expected a URI like postgresql://"),
            ("[store]\nprovider = \"postgres\"\nuri = \"postgresql://h/db\"\npool_size = 0", "config file protean.toml: store.pool_size: must be at least 1"),
            ("[store]\nuri = \"postgresql://h/db\"", "config file protean.toml: store.uri: applies to provider = \"postgres\" only"),
            ("[server.handlers.x]\nprofile = \"nope\"", "config file protean.toml: server.handlers.x.profile: unknown profile \"nope\"; known profiles: fast, batch, debug"),
            ("[profiles.fast]\nmax_retries = 1", "config file protean.toml: profiles.fast: \"fast\" is a built-in profile; choose another name"),
            ("[server\nx = 1", "config file protean.toml, line 1: invalid table header\nexpected `.`, `]`"),
            ("[server.ordering]\npartitions = 0", "config file protean.toml: server.ordering.partitions: must be between 1 and 4096"),
            ("[server.ordering]\nworkers = 0", "config file protean.toml: server.ordering.workers: must be at least 1"),
            ("[server.ordering]\nlease_ttl_ms = 5", "config file protean.toml: server.ordering.lease_ttl_ms: must be at least 100"),
            ("[server.ordering]\nparts = 3", "config file protean.toml: server.ordering.parts: unknown field `parts`"),
            ("[outbox]\nlease_ttl_ms = 0", "config file protean.toml: outbox.lease_ttl_ms: must be at least 100"),
            ("[outbox]\nmax_attempts = 0", "config file protean.toml: outbox.max_attempts: must be at least 1"),
            ("[outbox]\nmessages_per_tick = 0", "config file protean.toml: outbox.messages_per_tick: must be at least 1"),
            ("[server.health]\noutbox_max_age_ms = 0", "config file protean.toml: server.health.outbox_max_age_ms: must be at least 1"),
            ("[server]\nlease_ttl_ms = 0", "config file protean.toml: server.lease_ttl_ms: must be at least 100"),
            ("[server]\nlease_ttl_ms = 99", "config file protean.toml: server.lease_ttl_ms: must be at least 100"),
            ("[server]\ntest_mode_timeout_seconds = 0", "config file protean.toml: server.test_mode_timeout_seconds: must be at least 1"),
            ("[server]\nmax_message_bytes = 1", "config file protean.toml: server.max_message_bytes: 1 is below 4096; the value is in bytes (1 MiB = 1048576)"),
            ("[server]\nmax_message_bytes = 300000000", "config file protean.toml: server.max_message_bytes: 300000000 is above 268435455, the most a PostgreSQL jsonb value holds"),
            ("[server]\nmax_message_bytes = \"1MB\"", "config file protean.toml: server.max_message_bytes: invalid type: string \"1MB\", expected u64"),
            ("[server]\nmax_message_bytes = -1", "config file protean.toml: server.max_message_bytes: invalid value: integer `-1`, expected u64"),
            ("[server]\nprobe_timeout_seconds = 0", "config file protean.toml: server.probe_timeout_seconds: must be at least 1 (the seconds a new build may take to load and construct its domain instance)"),
            ("[server]\nprobe_timeout_seconds = -1", "config file protean.toml: server.probe_timeout_seconds: invalid value: integer `-1`, expected u64"),
            ("[brokers.default]\nuri = \"redis://h\"\nclaim_idle_ms = 0", "config file protean.toml: brokers.default.claim_idle_ms: must be at least 1"),
            ("[brokers.default]\nuri = \"redis://h\"\nreclaim_interval_ms = 0", "config file protean.toml: brokers.default.reclaim_interval_ms: must be at least 1"),
            ("[brokers.default]\nuri = \"app:s3cret@h\"", "config file protean.toml: brokers.default.uri: is not a URI (no scheme://)"),
            ("[server]\nisolation = \"thread\"", "config file protean.toml: server.isolation: unknown variant `thread`, expected `none` or `process`"),
            ("[server.worker]\nmemory_limit_mb = 64", "config file protean.toml: server.worker.memory_limit_mb: applies to isolation = \"process\" only"),
            ("[server]\nisolation = \"process\"\n[server.worker]\ncpu_limit_seconds = 0", "config file protean.toml: server.worker.cpu_limit_seconds: must be at least 1"),
        ];
        for (text, expected) in cases {
            let error = parse(text, &[]).unwrap_err().to_string();
            assert!(
                error.starts_with(expected.lines().next().unwrap()),
                "{text:?}:\n  got      {error}\n  expected {expected}"
            );
        }
    }

    #[test]
    fn isolation_is_in_process_unless_asked_with_its_limits() {
        let default = parse("", &[]).unwrap();
        assert_eq!(default.isolation, IsolationSettings::default());
        assert_eq!(default.handler_timeout, Duration::from_secs(30));
        let isolated = parse(
            "[server]\nisolation = \"process\"\nhandler_timeout_ms = 500\n[server.worker]\nmemory_limit_mb = 256\ncpu_limit_seconds = 5\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            isolated.isolation,
            IsolationSettings {
                mode: IsolationMode::Process,
                memory_limit_mb: Some(256),
                cpu_limit_seconds: Some(5),
            }
        );
        assert_eq!(isolated.handler_timeout, Duration::from_millis(500));
    }
}
