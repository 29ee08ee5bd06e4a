//! Brokers: streams that carry published messages to consumer groups, shared by many replicas.
//!
//! Invariants: a consumer group delivers each entry to one consumer; an entry stays pending until it is
//! acknowledged, which the engine does only after the entry's unit of work has committed (or it was
//! dead-lettered); an entry pending on a dead consumer is reclaimed by a live one.
//!
//! [`open`] is the only code that knows the backends by name.

pub mod partitions;
mod redis;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::ownership::Owned;

pub(crate) use self::redis::BrokerSection;
pub use self::redis::RedisBroker;

/// One entry read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The stream it was read from.
    pub stream: String,
    /// Its stream id (`1700000000000-0`).
    pub id: String,
    /// Its `data` field (the message's JSON), if it has one that is text.
    pub data: Option<String>,
    /// How many times it has been delivered, this time included.
    pub deliveries: u32,
}

impl Entry {
    /// The entry as a stored message: Protean's `{"data", "metadata"}` in its `data` field.
    pub(crate) fn message(
        &self,
    ) -> std::result::Result<crate::store::StoredMessage, crate::message::NotAMessage> {
        let text = self
            .data
            .as_deref()
            .ok_or(crate::message::NotAMessage::NoText)?;
        crate::message::from_wire(text)
    }
}

/// An entry read, and the message it holds (or why it holds none).
pub(crate) type Decoded = (
    Entry,
    std::result::Result<crate::store::StoredMessage, String>,
);

/// Decode entries read, in their order.
pub(crate) fn decode(entries: Vec<Entry>) -> Vec<Decoded> {
    entries
        .into_iter()
        .map(|entry| {
            let message = entry.message().map_err(|e| e.to_string());
            (entry, message)
        })
        .collect()
}

/// Where a new consumer group starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupStart {
    /// The whole history of the stream (Protean's choice, and the default).
    #[default]
    Beginning,
    /// Only entries added after the group is created.
    New,
}

/// How to reach and use the broker.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BrokerConfig {
    /// `redis://host:port/db`; printed redacted.
    pub uri: crate::redact::ConnectionString,
    pub group_start: GroupStart,
    /// How long a read waits for new entries.
    pub block: Duration,
    /// An entry pending this long on a consumer is taken over by another.
    pub claim_idle: Duration,
    /// How often a consumer looks for entries to take over.
    pub reclaim_interval: Duration,
    /// Certificates for `rediss://`.
    pub tls: TlsFiles,
}

/// PEM files for a TLS connection (`rediss://`): the CA that signed the server's certificate (else the
/// system's roots), and a client certificate with its key when the server asks for one.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TlsFiles {
    pub ca_file: Option<std::path::PathBuf>,
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
}

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("broker {uri} is unreachable: {reason}")]
    Connect {
        uri: crate::redact::ConnectionString,
        reason: String,
    },
    #[error("broker {uri} refused the credentials: {reason}; check the user and password in brokers.default.uri (redis://USER:PASSWORD@HOST:PORT/DB, or redis://:PASSWORD@HOST:PORT/DB without ACL users)")]
    Credentials {
        uri: crate::redact::ConnectionString,
        reason: String,
    },
    #[error("broker command {command} failed: {source}")]
    Command {
        command: &'static str,
        source: ::redis::RedisError,
    },
    #[error("cannot read brokers.default.{key} {}: {source}", path.display())]
    TlsFile {
        key: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("invalid broker uri {uri}: {reason}; write redis://HOST:PORT[/DB]")]
    Uri {
        uri: crate::redact::ConnectionString,
        reason: String,
    },
    #[error("ordered subscription {group} runs with {running} partitions but this replica is configured with {configured}; set [server.ordering] partitions = {running}, or change the count only as docs/production.md describes (stop every replica first)")]
    PartitionCount {
        group: String,
        running: u32,
        configured: u32,
    },
}

impl Error {
    /// Whether the broker may answer if asked again later (down or starting); refused credentials or a
    /// bad URI will not fix themselves.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }
}

/// Result of broker operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A broker: publishing, consumer groups, and leases.
#[async_trait]
pub trait Broker: Send + Sync {
    /// Append `payloads` (each a message's JSON) to `stream`, in order, as Protean does: one field, `data`.
    /// The first command after the broker came back can fail on the connection that broke (the client
    /// reconnects then): a failed attempt is made once more at once, so that a row is not sent into a
    /// long backoff for it; a failed attempt may have been partly taken (at least once). The payloads
    /// are given, not lent: the client copies them into its commands, and keeping them besides would
    /// hold every message once more.
    async fn publish(&self, stream: &str, payloads: Vec<String>) -> Result<()>;

    /// A consumer named `consumer` in `group` over `streams`, with a connection of its own, so that its
    /// blocking reads never stall other commands. Creates the group where it is missing.
    async fn consumer(
        &self,
        streams: Vec<String>,
        group: &str,
        consumer: &str,
    ) -> Result<Box<dyn Consumer>>;

    /// Entries of `streams` not yet delivered to `group`, plus those delivered but not acknowledged.
    async fn backlog(&self, streams: &[String], group: &str) -> Result<u64>;

    /// Whether the broker answers.
    async fn ping(&self) -> Result<()>;

    /// Take the lease of `owned` for `owner` for `ttl`, or renew it if `owner` holds it: its fencing
    /// token (see [`crate::ownership`]). None when another owner holds it.
    async fn lease(&self, owned: &Owned, owner: &str, ttl: Duration) -> Result<Option<u64>>;

    /// Give the lease of `owned` up, if `owner` holds it.
    async fn release(&self, owned: &Owned, owner: &str) -> Result<()>;

    /// How `group` stands on `streams` (for status and metrics). The default knows only the backlog.
    async fn group_status(&self, streams: &[String], group: &str) -> Result<GroupStatus> {
        Ok(GroupStatus {
            exists: true,
            lag: self.backlog(streams, group).await?,
            ..GroupStatus::default()
        })
    }

    /// The owner holding the lease `name`, if any.
    async fn lease_holder(&self, _name: &str) -> Result<Option<String>> {
        Ok(None)
    }

    /// One replica's handle on the partitions of the ordered subscription `group` reading `streams`
    /// (see [`partitions`]).
    async fn partitions(
        &self,
        group: &str,
        streams: &[String],
        owner: &str,
        partitions: u32,
        ttl: Duration,
    ) -> Result<Box<dyn partitions::Partitions>>;

    /// How the partitions of the ordered subscription `group` stand.
    async fn partition_status(
        &self,
        group: &str,
        streams: &[String],
        partitions: u32,
    ) -> Result<partitions::PartitionStatus>;

    /// Reading and replaying dead letters, for brokers that keep them.
    fn dead_letters(&self) -> Option<&dyn DeadLetterAdmin> {
        None
    }
}

/// How a consumer group stands, summed over the streams it reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GroupStatus {
    /// Whether the group exists on any of its streams (it is created by its first consumer).
    pub exists: bool,
    /// Entries not yet delivered to the group.
    pub lag: u64,
    /// Entries delivered but not acknowledged.
    pub pending: u64,
    /// Consumers registered in the group (the most on any one stream).
    pub consumers: u64,
    /// Entries in the group's dead-letter stream.
    pub dead_letters: u64,
}

/// One entry of a group's dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetterEntry {
    /// Its id in the dead-letter stream.
    pub id: String,
    /// `data`, `original_stream`, `original_id`, `group`, `consumer`, `error`, `attempts`, `build_id`,
    /// `failed_at`.
    pub fields: std::collections::BTreeMap<String, String>,
}

/// Dead-letter administration (the `protean-host dlq` commands).
#[async_trait]
pub trait DeadLetterAdmin: Send + Sync {
    /// The oldest `limit` dead letters of `group`.
    async fn list(&self, group: &str, limit: usize) -> Result<Vec<DeadLetterEntry>>;

    /// Send the dead letter `id` back to `group` only (through its replay stream) and remove it.
    /// False when there is no such dead letter.
    async fn replay(&self, group: &str, id: &str) -> Result<bool>;

    /// Remove every dead letter of `group`; returns how many there were.
    async fn purge(&self, group: &str) -> Result<u64>;
}

/// One consumer of a consumer group.
#[async_trait]
pub trait Consumer: Send {
    /// Up to `count` entries: this consumer's pending ones first (redeliveries, reclaimed entries),
    /// then new ones, waiting up to `block` for them. `stop` ends the wait early; what the read was
    /// given by then is returned, never left pending on a consumer that is stopping.
    async fn read(
        &mut self,
        count: usize,
        block: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Entry>>;

    /// Up to `count` new entries, without waiting and without this consumer's pending ones: the next
    /// batch, read while the current one is handled.
    async fn read_ahead(&mut self, count: usize) -> Result<Vec<Entry>>;

    /// Whether the last [`Consumer::read`] returned only entries never delivered to the group before:
    /// none of them a redelivery or an entry reclaimed from another consumer. A consumer that cannot
    /// tell says no.
    fn read_new(&self) -> bool {
        false
    }

    /// Acknowledge entries (stream, id): they are done. A broker may send acknowledgements with the
    /// next read; [`Consumer::flush`] sends what is left.
    async fn ack(&mut self, entries: &[(String, String)]) -> Result<()>;

    /// Send the acknowledgements not sent yet (before waiting, and before stopping).
    async fn flush(&mut self) -> Result<()>;

    /// Record `entry` in the group's dead-letter stream with why it failed and which build of the
    /// domain failed it, then acknowledge it.
    async fn dead_letter(
        &mut self,
        entry: &Entry,
        error: &str,
        attempts: u32,
        build_id: &str,
    ) -> Result<()>;

    /// Take over entries pending longer than `min_idle` on other consumers, and forget consumers that
    /// are gone with nothing pending. Returns how many entries were taken over.
    async fn reclaim(&mut self, min_idle: Duration) -> Result<usize>;
}

/// The dead-letter stream of a group.
pub fn dead_letter_stream(group: &str) -> String {
    format!("{group}:dlq")
}

/// The stream a group reads replayed dead letters from (a replay goes back to one group only).
pub fn replay_stream(group: &str) -> String {
    format!("{group}:replay")
}

/// Connect to the configured broker.
pub async fn open(config: &BrokerConfig) -> Result<Arc<dyn Broker>> {
    let scheme = config.uri.expose().split("://").next().unwrap_or_default();
    match scheme {
        "redis" | "rediss" | "redis+unix" | "unix" => {
            Ok(Arc::new(RedisBroker::connect(config).await?))
        }
        other => Err(Error::Uri {
            uri: config.uri.clone(),
            reason: format!("unknown scheme {other:?}"),
        }),
    }
}
