//! The event store and everything committed beside it: positions, documents, processed markers and
//! dead letters.
//!
//! Invariant: [`Store::commit`] applies a whole [`UnitOfWork`] or nothing. It checks every expected
//! version first, so a conflicting writer makes the whole unit fail and nothing of it is visible.
//!
//! The trait is synchronous: the engine calls it only from blocking threads (the same thread that calls
//! the plugin), so an embedded store costs no thread hop and a handler's reads are plain calls.

mod config;
mod lease;
mod memory;
mod outbox;
pub mod postgres;
#[cfg(test)]
pub(crate) mod recording;
pub mod schedules;
mod sqlite;
#[cfg(test)]
pub(crate) mod tests;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
};

use serde::Serialize;

pub(crate) use config::StoreSection;
pub use config::DEFAULT_STORE_PATH;
pub use lease::Leases;
pub use memory::MemoryStore;
pub use outbox::{
    now_ms, Claim, ForeignLease, InFlight, Outbox, OutboxCounts, OutboxItem, PendingRow, RowFailure,
};
pub use postgres::{PostgresConfig, PostgresStore};
pub use schedules::{Schedule, ScheduleCounts, ScheduleQuery, ScheduleState, Schedules};
pub use sqlite::SqliteStore;

use crate::unit_of_work::{CallRecord, UnitOfWork};

/// One stored message, as read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredMessage {
    /// Position in the whole store (1-based, increasing, gaps possible).
    pub global_position: u64,
    /// Position in its stream (0-based, gapless).
    pub position: u64,
    pub stream: String,
    pub message_type: String,
    /// `metadata.headers.id`.
    pub id: String,
    pub time: String,
    /// The `data` object as JSON text.
    pub data: String,
    /// The `metadata` object as JSON text, without the `event_store` section (derived on read).
    pub metadata: String,
    /// The parts of `metadata` the engine reads, when the reader decoded them already.
    pub decoded: crate::message::Decoded,
}

impl StoredMessage {
    /// Its size as `server.max_message_bytes` counts it: the bytes of its data and metadata.
    pub fn size(&self) -> usize {
        self.data.len() + self.metadata.len()
    }

    /// How its processed marker is found ([`Store::processed_messages`]).
    pub fn marker_key<'a>(&self, identity: &'a str) -> MarkerKey<'a> {
        MarkerKey {
            global_position: self.global_position,
            identity,
        }
    }

    /// The message's identity for exactly-once (processed markers, retry counts, acknowledgements):
    /// `{stream}@{position}`, which no two stored messages share and a redelivery of the same stored
    /// message keeps (a broker entry carries both in `metadata.event_store`). `headers.id` cannot be
    /// it: another writer sets it, and Protean 0.18 gives every command its aggregate's id. A broker
    /// entry without positions (Protean's outbox publishes `event_store: null`) falls back to
    /// `headers.id`, which Protean makes unique for events (`{stream}-{version}`), the only messages
    /// it publishes.
    pub fn identity(&self) -> String {
        if self.global_position > 0 {
            // Without `format!`: this runs several times per message on every path.
            let mut digits = itoa::Buffer::new();
            let position = digits.format(self.position);
            let mut identity = String::with_capacity(self.stream.len() + 1 + position.len());
            identity.push_str(&self.stream);
            identity.push('@');
            identity.push_str(position);
            identity
        } else {
            self.id.clone()
        }
    }
}

/// A processed marker's key: the message's identity, and its global position (0 when it has none),
/// which a store may order its markers by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkerKey<'a> {
    pub global_position: u64,
    pub identity: &'a str,
}

/// A message failed for good, recorded with why and how often it was tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub subscription: String,
    pub handler: String,
    pub message_id: String,
    pub stream: String,
    pub global_position: u64,
    pub message_type: String,
    pub data: String,
    pub metadata: String,
    pub error: String,
    pub attempts: u32,
    pub build_id: String,
    pub failed_at: String,
}

/// A key of an ordered event-store subscription parked behind a dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParkedKey {
    pub key: String,
    /// The global position of the dead letter it waits behind.
    pub dead_letter: u64,
    /// Its dead letter was replayed (and handled) or purged: its held messages are handled next.
    pub released: bool,
    /// How many messages it holds.
    pub held: u64,
}

/// A document as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDocument {
    pub id: String,
    /// JSON text.
    pub data: String,
    /// Changes with every write of the document. Drawn from one counter per store, so a version is
    /// never reused, not even by a document deleted and written again: a writer that read version `v`
    /// can tell whether anything was written since, whatever it was.
    pub version: u64,
}

/// The version a document write expects to replace: [`ABSENT`] when the writer saw no document.
pub type DocumentVersion = u64;

/// The "version" of a document that does not exist (stored versions start at 1).
pub const ABSENT: DocumentVersion = 0;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("version conflict on stream {stream}: expected version {expected}, found {actual}")]
    VersionConflict {
        stream: String,
        expected: i64,
        actual: i64,
    },
    /// A document was written since the handler read it: nothing of this unit was written, and the
    /// batch is run again (it reads the new document), as for a stream version conflict.
    #[error("document {collection}/{id} changed since it was read: expected version {expected}, found {actual} (0: absent)")]
    DocumentConflict {
        collection: String,
        id: String,
        expected: DocumentVersion,
        actual: DocumentVersion,
    },
    /// A unit with this idempotency key was committed before: nothing of this one was written.
    #[error("idempotency key {key:?} was already committed, as message {message_id}")]
    AlreadyCommitted { key: String, message_id: String },
    /// The connection failed while the commit was in flight: the unit may or may not be stored, and
    /// only a look at the store (or a retry with an idempotency key) can tell.
    #[error(
        "the outcome of the commit is unknown (the connection failed while committing): {reason}"
    )]
    OutcomeUnknown { reason: String },
    #[error("message {0} is already stored")]
    DuplicateMessage(String),
    /// Another consumer committed one of these messages first (a redelivery raced the original):
    /// nothing of this unit was written, and the batch is run again without it.
    #[error("message {message_id} was already handled by {subscription}")]
    AlreadyProcessed {
        subscription: String,
        message_id: String,
    },
    /// A batch held a message behind a key that is no longer parked (its view of the parked keys was
    /// stale): nothing of the unit was written, and the batch is read again.
    #[error("cannot hold a message behind key {key:?} of {subscription}: the key is not parked")]
    NotParked { subscription: String, key: String },
    #[error("document field name {0:?} is not a plain identifier (letters, digits, _)")]
    BadField(String),
    #[error("sqlite store {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("cannot create the store directory {}: {source}", path.display())]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the store file {}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unreadable row in the store: {0}")]
    Corrupt(String),
    #[error("postgresql store: {}", postgres_detail(.0))]
    Postgres(#[from] ::postgres::Error),
    #[error("cannot reach the PostgreSQL store at {store}: {reason}")]
    Unreachable { store: String, reason: String },
    #[error("the PostgreSQL server at {store} refused the connection: {reason}; check the user, password and database in store.uri")]
    Refused { store: String, reason: String },
    #[error("store.uri {store:?} is not a PostgreSQL URI: {reason}")]
    BadUri {
        store: String,
        reason: self::postgres::UriError,
    },
    #[error("migration {migration} needs the servers of older builds stopped first, but these are connected to the PostgreSQL store at {store}: {connected}; stop them, then run `protean-host db setup` again")]
    OlderServersConnected {
        store: String,
        migration: i32,
        /// Which: process ids and client addresses.
        connected: String,
    },
    #[error("the PostgreSQL store at {store} is not set up (schema version {version} of {latest}); run `protean-host db setup`")]
    NotSetUp {
        store: String,
        version: i32,
        latest: i32,
    },
    /// A unit fired a schedule that was fired, cancelled or replaced since it was read (another replica
    /// fired it, a handler cancelled or set it again): nothing of the unit was written.
    #[error("schedule {key:?} is no longer pending as read (fired, cancelled or set again since)")]
    NotPending { key: String },
    /// A newer owner of `owned` has committed with a higher fencing token: this replica lost its lease
    /// (it stalled past it) and nothing of its unit was written.
    #[error("{owned} was taken over by a newer owner (fencing token {current} > {token}); this replica's commit is refused")]
    Fenced {
        owned: crate::ownership::Owned,
        token: u64,
        current: u64,
    },
}

impl Error {
    /// Whether another writer changed what this unit was computed from (a stream's version, a
    /// document's): running the batch again, on what is stored now, resolves it.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Error::VersionConflict { .. } | Error::DocumentConflict { .. }
        )
    }

    /// Whether asking again can never succeed: the question itself is wrong (a field name that is not
    /// an identifier) or what is stored cannot be read. A handler's read failing so fails its message
    /// for good (dead-lettered, replayable once fixed) instead of being retried until its retries run out.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::BadField(_) | Self::Corrupt(_))
    }

    /// Whether a statement ran out of its time (PostgreSQL's `statement_timeout`), as one does that
    /// waits for a lock held by a transaction whose process froze (SIGSTOP, a stopped VM): PostgreSQL
    /// ends that transaction once it has been idle for the same timeout, so asking once more gets
    /// through. Nothing of the refused statement's transaction was committed.
    pub fn is_timed_out(&self) -> bool {
        let Self::Postgres(source) = self else {
            return false;
        };
        source.code() == Some(&::postgres::error::SqlState::QUERY_CANCELED)
    }

    /// Whether the store may answer if asked again later: down, starting, or not set up yet (a
    /// migration job may be running). A refused password or a bad URI will not fix itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::NotSetUp { .. })
    }
}

/// A PostgreSQL error in one line: the server's own message when it sent one, else the client's chain.
pub(crate) fn postgres_detail(error: &::postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Result of store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Appends by any writer, told as they commit ([`Store::appends`]).
pub trait AppendWatch: Send {
    /// The highest global position appended since the last call, waiting up to `wait` for one; None
    /// when none came. After an error the next call connects again.
    fn next(&mut self, wait: std::time::Duration) -> Result<Option<u64>>;
}

/// The event store and its companions. Backends implement the primitives; the engine composes them.
pub trait Store: Send + Sync {
    /// Messages of any of `categories` with a global position greater than `after`, in global order.
    fn read_categories(
        &self,
        categories: &[String],
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>>;

    /// Messages of `stream` from stream position `from`, in order.
    fn read_stream(&self, stream: &str, from: u64) -> Result<Vec<StoredMessage>>;

    /// Apply a unit of work atomically; returns the global position of the last message it appended.
    fn commit(&self, unit: &UnitOfWork) -> Result<Option<u64>>;

    /// The stored position of a subscription (the global position it has finished).
    fn position(&self, subscription: &str) -> Result<Option<u64>>;

    /// A document by collection and id, with its version.
    fn read_document(&self, collection: &str, id: &str) -> Result<Option<StoredDocument>>;

    /// The documents of `keys` (collection, id) that exist, each with its collection: a batch's reads
    /// ahead (see `HostServices::prefetch`). A store across a network answers in one round trip.
    fn read_documents(&self, keys: &[(&str, &str)]) -> Result<Vec<(String, StoredDocument)>> {
        let mut found = Vec::new();
        for &(collection, id) in keys {
            if let Some(document) = self.read_document(collection, id)? {
                found.push((collection.to_owned(), document));
            }
        }
        Ok(found)
    }

    /// Every message of `streams`, each stream's in order: a batch's reads ahead.
    fn read_streams(&self, streams: &[&str]) -> Result<Vec<StoredMessage>> {
        let mut found = Vec::new();
        for stream in streams {
            found.extend(self.read_stream(stream, 0)?);
        }
        Ok(found)
    }

    /// Wakes for appends by any writer (another process, a MessageDB client) as they commit, for a
    /// store shared across processes; None when the store has no such thing (this process's own
    /// commits wake the engine already).
    fn appends(&self) -> Option<Box<dyn AppendWatch>> {
        None
    }

    /// A document's data by collection and id.
    fn document(&self, collection: &str, id: &str) -> Result<Option<String>> {
        Ok(self.read_document(collection, id)?.map(|d| d.data))
    }

    /// Documents whose top-level `field` equals the JSON scalar `value`, with their versions.
    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value: &serde_json::Value,
    ) -> Result<Vec<StoredDocument>>;

    /// What each of `finds` (collection, field, value) finds, in their order: a batch's finds ahead
    /// (see `HostServices::prefetch`). A store across a network answers in one round trip.
    fn find_documents_each(
        &self,
        finds: &[(&str, &str, &serde_json::Value)],
    ) -> Result<Vec<Vec<StoredDocument>>> {
        finds
            .iter()
            .map(|&(collection, field, value)| self.find_documents(collection, field, value))
            .collect()
    }

    /// The highest global position among `categories` (0 when empty); all categories when empty.
    fn head(&self, categories: &[String]) -> Result<u64>;

    /// The message committed under an idempotency key, if one was.
    fn idempotency_key(&self, key: &str) -> Result<Option<String>>;

    /// Dead letters of a subscription, oldest first; all subscriptions when `None`.
    fn dead_letters(&self, subscription: Option<&str>) -> Result<Vec<DeadLetter>>;

    /// Mark the waiting dead letter of `subscription` at `global_position` as replayed by the build
    /// `replayed_by`: it keeps its row (with the build that failed) and is no longer listed. Whether
    /// there was one. A key parked behind it is released in the same transaction, unless a newer dead
    /// letter of the message waits (the replay failed again).
    fn resolve_dead_letter(
        &self,
        subscription: &str,
        global_position: u64,
        replayed_by: &str,
    ) -> Result<bool>;

    /// Delete the waiting dead letters of `subscription`; how many. Every key parked behind one is
    /// released with them: its held messages are handled next.
    fn purge_dead_letters(&self, subscription: &str) -> Result<u64>;

    /// The keys of `subscription` parked behind a dead letter, by key.
    fn parked_keys(&self, subscription: &str) -> Result<Vec<ParkedKey>>;

    /// The first `limit` messages held behind `key` of `subscription`, in store order.
    fn held_messages(
        &self,
        subscription: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>>;

    /// Which of `ids` (message identities, [`StoredMessage::identity`]) already have a processed marker
    /// of `subscription`, by identity alone: for checks and tools (on SQLite, a scan of the
    /// subscription's markers). The engine asks [`Store::processed_messages`].
    fn processed(&self, subscription: &str, ids: &[&str]) -> Result<HashSet<String>>;

    /// Which of a batch's `messages` already have a processed marker of `subscription` (a redelivery
    /// after a commit), by identity: the identities found. A store may key its markers by global
    /// position, so that a batch's are written side by side; this finds them by it.
    fn processed_messages(
        &self,
        subscription: &str,
        messages: &[MarkerKey<'_>],
    ) -> Result<HashSet<String>> {
        let ids: Vec<&str> = messages.iter().map(|m| m.identity).collect();
        self.processed(subscription, &ids)
    }

    /// Record handler calls about to start ([`CallRecord`]), replacing earlier records of the same
    /// messages. Durable before it returns: the call may end the process.
    fn record_calls(&self, calls: &[CallRecord]) -> Result<()>;

    /// The recorded calls of `subscription` not cleared by a commit, as identity → attempts: those of
    /// `identities`, or all of them when `None`.
    fn recorded_calls(
        &self,
        subscription: &str,
        identities: Option<&[&str]>,
    ) -> Result<HashMap<String, u32>>;

    /// The outbox, for stores that keep one.
    fn outbox(&self) -> Option<&dyn Outbox> {
        None
    }

    /// How many messages of any of `categories` come after global position `after`: an event-store
    /// subscription's lag. The default reads them; a backend with a query language counts instead.
    fn count_after(&self, categories: &[String], after: u64) -> Result<u64> {
        Ok(self.read_categories(categories, after, usize::MAX)?.len() as u64)
    }

    /// Whether the store answers (readiness): the cheapest read every backend has.
    fn ping(&self) -> Result<()> {
        self.head(&[]).map(drop)
    }

    /// Leases of event-store subscriptions, for stores shared by replicas.
    fn leases(&self) -> Option<&dyn Leases> {
        None
    }

    /// The schedules kept beside the messages.
    fn schedules(&self) -> &dyn Schedules;
}

/// Which store to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// Lost when the process ends; for tests.
    Memory,
    /// A SQLite file (WAL mode).
    Sqlite { path: PathBuf },
    /// A PostgreSQL database set up by `protean-host db setup`.
    Postgres(PostgresConfig),
}

/// Open the configured store. The only place that knows the backends by name.
pub fn open(config: &StoreConfig) -> Result<Arc<dyn Store>> {
    Ok(match config {
        StoreConfig::Memory => Arc::new(MemoryStore::default()),
        StoreConfig::Sqlite { path } => Arc::new(SqliteStore::open(path)?),
        StoreConfig::Postgres(config) => Arc::new(PostgresStore::open(config)?),
    })
}

/// The category of a stream: the text before the first `-`.
pub fn category(stream: &str) -> &str {
    protean_plugin_api::category_of_stream(stream)
}

/// Document field names are interpolated into nothing, but they key an index: keep them simple.
fn check_field(field: &str) -> Result<()> {
    let plain = !field.is_empty() && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        Ok(())
    } else {
        Err(Error::BadField(field.into()))
    }
}

/// The indexable top-level fields of a document: (field, canonical JSON of a scalar value).
fn indexed_fields(data: &str) -> Vec<(String, String)> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(data) else {
        return Vec::new();
    };
    map.into_iter()
        .filter(|(_, v)| v.is_string() || v.is_number() || v.is_boolean())
        .map(|(k, v)| (k, v.to_string()))
        .collect()
}
