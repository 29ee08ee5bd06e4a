//! The file's shape as serde reads it: every key optional, unknown keys refused. Nothing here has a
//! default or a bound; resolution (`config::resolve` and each backend's section) gives those.

use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;

use super::{
    error::{Error, Invalid, Problem},
    profile::Profile,
    substitute::substitute,
    IsolationMode, SubscriptionType,
};
use crate::{broker::BrokerSection, store::StoreSection};

/// The whole file, after its `[env.NAME]` overlay and variables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) store: StoreSection,
    #[serde(default)]
    pub(super) server: ServerSection,
    #[serde(default)]
    pub(super) profiles: BTreeMap<String, Profile>,
    #[serde(default)]
    pub(super) brokers: BTreeMap<String, BrokerSection>,
    #[serde(default)]
    pub(super) outbox: OutboxSection,
    // `[env.NAME]` overlays are merged (or dropped) before parsing.
}

/// `[server]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServerSection {
    pub(super) profile: Option<String>,
    pub(super) messages_per_tick: Option<u32>,
    pub(super) max_retries: Option<u32>,
    pub(super) retry_delay_ms: Option<u64>,
    pub(super) max_retry_delay_ms: Option<u64>,
    pub(super) handler_timeout_ms: Option<u64>,
    pub(super) shutdown_grace_seconds: Option<u64>,
    pub(super) test_mode_timeout_seconds: Option<u64>,
    pub(super) poll_interval_ms: Option<u64>,
    pub(super) version_retries: Option<u32>,
    pub(super) subscription_type: Option<SubscriptionType>,
    pub(super) lease_ttl_ms: Option<u64>,
    pub(super) max_generations: Option<u64>,
    pub(super) probe_timeout_seconds: Option<u64>,
    pub(super) isolation: Option<IsolationMode>,
    #[serde(default)]
    pub(super) worker: WorkerSection,
    pub(super) max_message_bytes: Option<u64>,
    pub(super) runtime_threads: Option<u16>,
    #[serde(default)]
    pub(super) handlers: BTreeMap<String, HandlerSection>,
    #[serde(default)]
    pub(super) health: HealthSection,
    #[serde(default)]
    pub(super) ordering: OrderingSection,
    #[serde(default)]
    pub(super) scheduler: SchedulerSection,
}

impl ServerSection {
    /// The subscription settings `[server]` gives every handler.
    pub(super) fn settings(&self) -> Profile {
        Profile {
            messages_per_tick: self.messages_per_tick,
            max_retries: self.max_retries,
            retry_delay_ms: self.retry_delay_ms,
            max_retry_delay_ms: self.max_retry_delay_ms,
            handler_timeout_ms: self.handler_timeout_ms,
        }
    }
}

/// `[server.worker]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WorkerSection {
    pub(super) memory_limit_mb: Option<u64>,
    pub(super) cpu_limit_seconds: Option<u64>,
}

/// `[server.ordering]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OrderingSection {
    pub(super) partitions: Option<u32>,
    pub(super) lease_ttl_ms: Option<u64>,
    pub(super) workers: Option<u32>,
}

/// `[server.scheduler]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SchedulerSection {
    pub(super) poll_interval_ms: Option<u64>,
    pub(super) batch: Option<u32>,
    pub(super) overdue_after_ms: Option<u64>,
    pub(super) keep_settled_hours: Option<u64>,
}

/// `[server.health]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HealthSection {
    pub(super) enabled: Option<bool>,
    pub(super) host: Option<String>,
    pub(super) port: Option<u16>,
    pub(super) stall_after_ms: Option<u64>,
    pub(super) outbox_max_age_ms: Option<u64>,
    pub(super) check_timeout_ms: Option<u64>,
    pub(super) request_timeout_ms: Option<u64>,
}

/// `[outbox]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OutboxSection {
    pub(super) messages_per_tick: Option<u32>,
    pub(super) max_attempts: Option<u32>,
    pub(super) retry_delay_ms: Option<u64>,
    pub(super) max_retry_delay_ms: Option<u64>,
    pub(super) lease_ttl_ms: Option<u64>,
}

/// `[server.handlers.NAME]`: one handler's settings over `[server]`'s. Kept as written (the
/// configuration is dumped by `--debug`), and applied per handler by `Config::settings`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HandlerSection {
    pub(super) profile: Option<String>,
    pub(super) subscription_type: Option<SubscriptionType>,
    pub(super) messages_per_tick: Option<u32>,
    pub(super) max_retries: Option<u32>,
    pub(super) retry_delay_ms: Option<u64>,
    pub(super) max_retry_delay_ms: Option<u64>,
    pub(super) handler_timeout_ms: Option<u64>,
}

impl HandlerSection {
    /// The subscription settings of this section.
    pub(super) fn settings(&self) -> Profile {
        Profile {
            messages_per_tick: self.messages_per_tick,
            max_retries: self.max_retries,
            retry_delay_ms: self.retry_delay_ms,
            max_retry_delay_ms: self.max_retry_delay_ms,
            handler_timeout_ms: self.handler_timeout_ms,
        }
    }
}

/// Read `text` (named `path` in errors): TOML, then the `[env.NAME]` overlay that `PROTEAN_ENV`
/// picks, then `${VAR}` substitution, then the shape above.
pub(super) fn parse(
    text: &str,
    path: &Path,
    env: &BTreeMap<String, String>,
) -> Result<RawConfig, Error> {
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Syntax {
        path: path.into(),
        line: e
            .span()
            .map_or(1, |s| text[..s.start].lines().count().max(1)),
        // toml's message can run over lines ("invalid table header\nexpected ..."): one line, so
        // that it reads as one error wherever it is logged.
        message: e.message().trim().lines().collect::<Vec<_>>().join("; "),
    })?;
    let overlays = table.remove("env");
    if let (Some(name), Some(toml::Value::Table(overlays))) = (env.get("PROTEAN_ENV"), overlays) {
        if let Some(toml::Value::Table(section)) = overlays.get(name) {
            merge(&mut table, section.clone());
        }
    }
    substitute(&mut table, "", env).map_err(|invalid| invalid.at(path))?;
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        Invalid::new(
            e.path().to_string(),
            Problem::Shape(e.inner().message().to_owned()),
        )
        .at(path)
    })
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
