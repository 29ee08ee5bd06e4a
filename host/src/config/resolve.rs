//! The file's shape turned into [`Config`]: each key checked, each absent one given its default (from
//! the resolved types' `Default`s, never written here).

use std::time::Duration;

use protean_plugin_api::HandlerOptions;

use super::{
    error::{at_least, at_least_because, Invalid, Problem},
    profile::Profile,
    raw::{
        HealthSection, OrderingSection, OutboxSection, RawConfig, SchedulerSection, ServerSection,
    },
    Config, HealthSettings, IsolationMode, IsolationSettings, OrderingSettings, OutboxSettings,
    SchedulerSettings, SubscriptionType, DEFAULT_MAX_MESSAGE_BYTES,
};
use crate::{broker::BrokerConfig, store::StoreConfig};

/// The largest `max_message_bytes`: a PostgreSQL jsonb value holds no more.
const MAX_MESSAGE_BYTES_CEILING: u64 = 268_435_455;

/// The smallest `max_message_bytes`: the metadata the host writes is about 700 bytes, and a limit of
/// a few bytes is a unit mistaken (KB or MB for bytes).
const MAX_MESSAGE_BYTES_FLOOR: u64 = 4096;

/// The shortest lease of any kind (`server`, `server.ordering`, `outbox`): a lease shorter than a
/// renewal round trip is lost between renewals, and every replica would take it in turn.
const MIN_LEASE_TTL_MS: u64 = 100;

/// The most partitions an ordered subscription may have.
const MAX_PARTITIONS: u64 = 4096;

impl Config {
    /// `raw` checked and completed with the defaults.
    pub(super) fn resolve(raw: RawConfig) -> Result<Self, Invalid> {
        let store = StoreConfig::resolve(&raw.store)?;
        let broker = BrokerConfig::resolve(raw.brokers)?;
        let outbox = outbox(&raw.outbox)?;
        let s = raw.server;
        if s.subscription_type == Some(SubscriptionType::Stream) && broker.is_none() {
            return Err(Invalid::new(
                "server.subscription_type",
                Problem::StreamWithoutBroker,
            ));
        }
        let d = Config::default();
        let config = Self {
            store,
            broker,
            outbox,
            health: health(&s.health)?,
            ordering: ordering(&s.ordering)?,
            scheduler: scheduler(&s.scheduler)?,
            isolation: isolation(&s)?,
            max_message_bytes: max_message_bytes(s.max_message_bytes)?,
            runtime_threads: at_least("server.runtime_threads", s.runtime_threads, 1)?,
            lease_ttl: at_least("server.lease_ttl_ms", s.lease_ttl_ms, MIN_LEASE_TTL_MS)?
                .map_or(d.lease_ttl, Duration::from_millis),
            test_mode_timeout: at_least(
                "server.test_mode_timeout_seconds",
                s.test_mode_timeout_seconds,
                1,
            )?
            .map_or(d.test_mode_timeout, Duration::from_secs),
            // 0 would refuse every build; there is no switch to skip the probe (see plugin::probe).
            probe_timeout: at_least_because(
                "server.probe_timeout_seconds",
                s.probe_timeout_seconds,
                1,
                Some("the seconds a new build may take to load and construct its domain instance"),
            )?
            .map_or(d.probe_timeout, Duration::from_secs),
            poll_interval: at_least("server.poll_interval_ms", s.poll_interval_ms, 1)?
                .map_or(d.poll_interval, Duration::from_millis),
            shutdown_grace: s
                .shutdown_grace_seconds
                .map_or(d.shutdown_grace, Duration::from_secs),
            version_retries: s.version_retries.unwrap_or(d.version_retries),
            max_generations: s.max_generations.unwrap_or(d.max_generations),
            handler_timeout: s
                .handler_timeout_ms
                .map_or(d.handler_timeout, Duration::from_millis),
            default_subscription_type: s.subscription_type,
            server: s.settings(),
            server_profile: s.profile,
            handlers: s.handlers,
            profiles: raw.profiles,
        };
        config.check_profiles()?;
        config.check_backoff()?;
        Ok(config)
    }

    /// The backoff of `[server]` and of each handler section, over the profiles and defaults below
    /// it: a cap below the first delay is refused (the loop would wait longer than the cap says).
    fn check_backoff(&self) -> Result<(), Invalid> {
        let server = std::iter::once(("server".to_owned(), None));
        let handlers = (self.handlers.iter())
            .map(|(name, section)| (format!("server.handlers.{name}"), Some(section)));
        for (key, section) in server.chain(handlers) {
            let s = self.layered(section, &HandlerOptions::default());
            backoff(&key, s.retry_delay_ms, s.max_retry_delay_ms)?;
        }
        Ok(())
    }

    /// Every profile and per-handler section valid, and every profile named one that exists.
    fn check_profiles(&self) -> Result<(), Invalid> {
        for (name, profile) in &self.profiles {
            if Profile::builtin(name).is_some() {
                return Err(Invalid::new(
                    format!("profiles.{name}"),
                    Problem::BuiltinProfile { name: name.clone() },
                ));
            }
            profile.validate(&format!("profiles.{name}"))?;
        }
        self.server.validate("server")?;
        if let Some(name) = &self.server_profile {
            Profile::find(&self.profiles, name, "server.profile")?;
        }
        for (name, handler) in &self.handlers {
            let key = format!("server.handlers.{name}");
            handler.settings().validate(&key)?;
            if let Some(profile) = &handler.profile {
                Profile::find(&self.profiles, profile, &format!("{key}.profile"))?;
            }
        }
        Ok(())
    }
}

/// `key.max_retry_delay_ms` not below `key.retry_delay_ms`, whichever layer set them.
pub(super) fn backoff(key: &str, delay: u64, max: u64) -> Result<(), Invalid> {
    if max < delay {
        return Err(Invalid::new(
            format!("{key}.max_retry_delay_ms"),
            Problem::BelowOther {
                value: max,
                other_key: "retry_delay_ms",
                other: delay,
            },
        ));
    }
    Ok(())
}

/// `[server] isolation` with `[server.worker]`'s limits, which only a worker process can have.
fn isolation(s: &ServerSection) -> Result<IsolationSettings, Invalid> {
    let mode = s.isolation.unwrap_or_default();
    let limits = [
        ("server.worker.memory_limit_mb", s.worker.memory_limit_mb),
        (
            "server.worker.cpu_limit_seconds",
            s.worker.cpu_limit_seconds,
        ),
    ];
    for (key, value) in limits {
        at_least(key, value, 1)?;
        if value.is_some() && mode == IsolationMode::None {
            return Err(Invalid::new(
                key,
                Problem::OnlyFor {
                    setting: "isolation = \"process\"",
                    fix: "set it in [server], or remove this key",
                },
            ));
        }
    }
    Ok(IsolationSettings {
        mode,
        memory_limit_mb: s.worker.memory_limit_mb,
        cpu_limit_seconds: s.worker.cpu_limit_seconds,
    })
}

/// `server.max_message_bytes`, checked: between the floor and what PostgreSQL can store.
fn max_message_bytes(value: Option<u64>) -> Result<usize, Invalid> {
    let problem = match value {
        None => return Ok(DEFAULT_MAX_MESSAGE_BYTES),
        Some(value) if value < MAX_MESSAGE_BYTES_FLOOR => Problem::BytesBelow {
            value,
            floor: MAX_MESSAGE_BYTES_FLOOR,
        },
        Some(value) if value > MAX_MESSAGE_BYTES_CEILING => Problem::BytesAbove {
            value,
            ceiling: MAX_MESSAGE_BYTES_CEILING,
        },
        Some(n) => return Ok(usize::try_from(n).expect("at most the ceiling, which fits")),
    };
    Err(Invalid::new("server.max_message_bytes", problem))
}

/// `[outbox]`, checked: at least one message per tick and attempt, a backoff cap not below its first
/// delay, a lease of at least 100 ms.
fn outbox(o: &OutboxSection) -> Result<OutboxSettings, Invalid> {
    let d = OutboxSettings::default();
    let settings = OutboxSettings {
        messages_per_tick: at_least("outbox.messages_per_tick", o.messages_per_tick, 1)?
            .unwrap_or(d.messages_per_tick),
        max_attempts: at_least("outbox.max_attempts", o.max_attempts, 1)?.unwrap_or(d.max_attempts),
        retry_delay_ms: o.retry_delay_ms.unwrap_or(d.retry_delay_ms),
        max_retry_delay_ms: o.max_retry_delay_ms.unwrap_or(d.max_retry_delay_ms),
        lease_ttl: at_least("outbox.lease_ttl_ms", o.lease_ttl_ms, MIN_LEASE_TTL_MS)?
            .map_or(d.lease_ttl, Duration::from_millis),
    };
    backoff(
        "outbox",
        settings.retry_delay_ms,
        settings.max_retry_delay_ms,
    )?;
    Ok(settings)
}

/// `[server.ordering]`, checked: at least one partition and worker, a lease of at least 100 ms.
fn ordering(o: &OrderingSection) -> Result<OrderingSettings, Invalid> {
    let d = OrderingSettings::default();
    if o.partitions
        .is_some_and(|p| p == 0 || u64::from(p) > MAX_PARTITIONS)
    {
        return Err(Invalid::new(
            "server.ordering.partitions",
            Problem::Between {
                min: 1,
                max: MAX_PARTITIONS,
            },
        ));
    }
    Ok(OrderingSettings {
        partitions: o.partitions.unwrap_or(d.partitions),
        workers: at_least("server.ordering.workers", o.workers, 1)?.unwrap_or(d.workers),
        lease_ttl: at_least(
            "server.ordering.lease_ttl_ms",
            o.lease_ttl_ms,
            MIN_LEASE_TTL_MS,
        )?
        .map_or(d.lease_ttl, Duration::from_millis),
    })
}

/// `[server.scheduler]`, checked: a poll of at least 10 ms, at least one schedule per commit, settled
/// schedules kept at least an hour.
fn scheduler(s: &SchedulerSection) -> Result<SchedulerSettings, Invalid> {
    let d = SchedulerSettings::default();
    let poll = at_least("server.scheduler.poll_interval_ms", s.poll_interval_ms, 10)?;
    let overdue = at_least("server.scheduler.overdue_after_ms", s.overdue_after_ms, 1)?;
    let keep = at_least(
        "server.scheduler.keep_settled_hours",
        s.keep_settled_hours,
        1,
    )?;
    Ok(SchedulerSettings {
        poll_interval: poll.map_or(d.poll_interval, Duration::from_millis),
        batch: at_least("server.scheduler.batch", s.batch, 1)?.unwrap_or(d.batch),
        overdue_after: overdue.map_or(d.overdue_after, Duration::from_millis),
        keep_settled: keep.map_or(d.keep_settled, |h| Duration::from_secs(h * 3600)),
    })
}

/// `[server.health]`, checked: every duration at least 1 ms, the host an address to bind.
fn health(h: &HealthSection) -> Result<HealthSettings, Invalid> {
    let d = HealthSettings::default();
    let host = h.host.clone().unwrap_or(d.host);
    if host != "localhost" && host.parse::<std::net::IpAddr>().is_err() {
        return Err(Invalid::new(
            "server.health.host",
            Problem::NotAnAddress { host },
        ));
    }
    let millis = |key: &str, value: Option<u64>, default: Duration| {
        Ok::<_, Invalid>(
            at_least(&format!("server.health.{key}"), value, 1)?
                .map_or(default, Duration::from_millis),
        )
    };
    Ok(HealthSettings {
        enabled: h.enabled,
        host,
        port: h.port.unwrap_or(d.port),
        stall_after: millis("stall_after_ms", h.stall_after_ms, d.stall_after)?,
        outbox_max_age: millis("outbox_max_age_ms", h.outbox_max_age_ms, d.outbox_max_age)?,
        check_timeout: millis("check_timeout_ms", h.check_timeout_ms, d.check_timeout)?,
        request_timeout: millis(
            "request_timeout_ms",
            h.request_timeout_ms,
            d.request_timeout,
        )?,
    })
}
