//! The embedded default store: one SQLite file in WAL mode.
//!
//! Durability: `synchronous = NORMAL` under WAL survives a crash or SIGKILL of the process (a committed
//! transaction is in the WAL before commit returns); only an OS crash or power loss can lose the last
//! transactions. Several processes may share the file (a `send` while the server runs): writers take the
//! write lock at the start of a commit (`BEGIN IMMEDIATE`) and wait up to five seconds for it.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use super::{
    category, check_field, indexed_fields,
    outbox::{self, text_checksum, to_lease, Candidate, Chooser, InFlight, Lease, Leases, Offer},
    Claim, DeadLetter, DocumentVersion, Error, MarkerKey, Outbox, OutboxCounts, OutboxItem,
    ParkedKey, PendingRow, Result, RowFailure, Store, StoredDocument, StoredMessage, ABSENT,
};
use crate::unit_of_work::{CallRecord, DocumentWrite, Parking, ProcessedMarker, UnitOfWork};

mod checkpoint;
mod schedules;

mod sql {
    pub(super) const SCHEMA: &str = include_str!("sql/sqlite/schema.sql");
    pub(super) const APPEND: &str = include_str!("sql/sqlite/append.sql");
    pub(super) const STREAM_VERSION: &str = include_str!("sql/sqlite/stream_version.sql");
    pub(super) const READ_STREAM: &str = include_str!("sql/sqlite/read_stream.sql");
    pub(super) const READ_CATEGORY: &str = include_str!("sql/sqlite/read_category.sql");
    pub(super) const HEAD_CATEGORY: &str = include_str!("sql/sqlite/head_category.sql");
    pub(super) const HEAD_ALL: &str = include_str!("sql/sqlite/head_all.sql");
    pub(super) const COUNT_CATEGORY: &str = include_str!("sql/sqlite/count_category.sql");
    pub(super) const UPSERT_POSITION: &str = include_str!("sql/sqlite/upsert_position.sql");
    pub(super) const READ_POSITION: &str = include_str!("sql/sqlite/read_position.sql");
    pub(super) const PUT_DOCUMENT: &str = include_str!("sql/sqlite/put_document.sql");
    pub(super) const DELETE_DOCUMENT: &str = include_str!("sql/sqlite/delete_document.sql");
    pub(super) const READ_DOCUMENT_FIELDS: &str =
        include_str!("sql/sqlite/read_document_fields.sql");
    pub(super) const DELETE_DOCUMENT_FIELD: &str =
        include_str!("sql/sqlite/delete_document_field.sql");
    pub(super) const INSERT_DOCUMENT_FIELD: &str =
        include_str!("sql/sqlite/insert_document_field.sql");
    pub(super) const GET_DOCUMENT: &str = include_str!("sql/sqlite/get_document.sql");
    pub(super) const DOCUMENT_VERSION: &str = include_str!("sql/sqlite/document_version.sql");
    pub(super) const DRAW_DOCUMENT_VERSIONS: &str =
        include_str!("sql/sqlite/draw_document_versions.sql");
    pub(super) const HAS_DOCUMENT_VERSIONS: &str =
        include_str!("sql/sqlite/has_document_versions.sql");
    pub(super) const ADD_DOCUMENT_VERSIONS: &str =
        include_str!("sql/sqlite/add_document_versions.sql");
    pub(super) const FIND_DOCUMENTS: &str = include_str!("sql/sqlite/find_documents.sql");
    pub(super) const INSERT_PROCESSED: &str = include_str!("sql/sqlite/insert_processed.sql");
    pub(super) const INSERT_PROCESSED_AT_ONCE: &str =
        include_str!("sql/sqlite/insert_processed_at_once.sql");
    pub(super) const INSERT_DEAD_LETTER: &str = include_str!("sql/sqlite/insert_dead_letter.sql");
    pub(super) const READ_DEAD_LETTERS: &str = include_str!("sql/sqlite/read_dead_letters.sql");
    pub(super) const IS_PROCESSED: &str = include_str!("sql/sqlite/is_processed.sql");
    pub(super) const IS_PROCESSED_KEYED: &str = include_str!("sql/sqlite/is_processed_keyed.sql");
    pub(super) const IS_PROCESSED_BEFORE_POSITIONS: &str =
        include_str!("sql/sqlite/is_processed_before_positions.sql");
    pub(super) const HAS_MARKERS_BEFORE_POSITIONS: &str =
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'processed_before_positions'";
    pub(super) const MARKERS_BY_POSITION: &str = include_str!("sql/sqlite/markers_by_position.sql");
    pub(super) const MARKERS_BY_IDENTITY: &str = include_str!("sql/sqlite/markers_by_identity.sql");
    pub(super) const RESOLVE_DEAD_LETTER: &str = include_str!("sql/sqlite/resolve_dead_letter.sql");
    pub(super) const PURGE_DEAD_LETTERS: &str = include_str!("sql/sqlite/purge_dead_letters.sql");
    pub(super) const REPLAY_COLUMNS: &str = include_str!("sql/sqlite/replay_columns.sql");
    pub(super) const OUTBOX_INSERT: &str = include_str!("sql/sqlite/outbox_insert.sql");
    pub(super) const OUTBOX_CHECKSUM_COLUMN: &str =
        include_str!("sql/sqlite/outbox_checksum_column.sql");
    pub(super) const OUTBOX_CLAIMABLE: &str = include_str!("sql/sqlite/outbox_claimable.sql");
    pub(super) const OUTBOX_LEASES: &str = include_str!("sql/sqlite/outbox_leases.sql");
    pub(super) const OUTBOX_LEASE: &str = include_str!("sql/sqlite/outbox_lease.sql");
    pub(super) const OUTBOX_PUBLISHED: &str = include_str!("sql/sqlite/outbox_published.sql");
    pub(super) const OUTBOX_RETRY: &str = include_str!("sql/sqlite/outbox_retry.sql");
    pub(super) const OUTBOX_RELEASE: &str = include_str!("sql/sqlite/outbox_release.sql");
    pub(super) const OUTBOX_COUNTS: &str = include_str!("sql/sqlite/outbox_counts.sql");
    pub(super) const OUTBOX_PENDING: &str = include_str!("sql/sqlite/outbox_pending.sql");
    pub(super) const OUTBOX_REPUBLISH: &str = include_str!("sql/sqlite/outbox_republish.sql");
    pub(super) const INSERT_IDEMPOTENCY_KEY: &str =
        include_str!("sql/sqlite/insert_idempotency_key.sql");
    pub(super) const READ_IDEMPOTENCY_KEY: &str =
        include_str!("sql/sqlite/read_idempotency_key.sql");
    pub(super) const FENCE_RAISE: &str = include_str!("sql/sqlite/fence_raise.sql");
    pub(super) const FENCE_CURRENT: &str = include_str!("sql/sqlite/fence_current.sql");
    pub(super) const RECORD_CALL: &str = include_str!("sql/sqlite/record_call.sql");
    pub(super) const END_CALL: &str = include_str!("sql/sqlite/end_call.sql");
    pub(super) const ANY_CALL: &str = "SELECT 1 FROM calls_in_flight LIMIT 1";
    pub(super) const RECORDED_CALLS: &str = include_str!("sql/sqlite/recorded_calls.sql");
    pub(super) const PARK_KEY: &str = include_str!("sql/sqlite/park_key.sql");
    pub(super) const IS_PARKED: &str = include_str!("sql/sqlite/is_parked.sql");
    pub(super) const HOLD_MESSAGE: &str = include_str!("sql/sqlite/hold_message.sql");
    pub(super) const SETTLE_HELD: &str = include_str!("sql/sqlite/settle_held.sql");
    pub(super) const UNPARK_KEY: &str = include_str!("sql/sqlite/unpark_key.sql");
    pub(super) const DROP_HELD: &str = include_str!("sql/sqlite/drop_held.sql");
    pub(super) const RELEASE_REPLAYED: &str = include_str!("sql/sqlite/release_replayed.sql");
    pub(super) const RELEASE_ALL: &str = include_str!("sql/sqlite/release_all.sql");
    pub(super) const PARKED_KEYS: &str = include_str!("sql/sqlite/parked_keys.sql");
    pub(super) const HELD_MESSAGES: &str = include_str!("sql/sqlite/held_messages.sql");
}

/// A store in a SQLite file: one writer connection, and a pool of reader connections so that handlers
/// and subscriptions read while another batch commits (WAL readers never wait for the writer).
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    connection: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    /// Whether markers an older build wrote are kept by identity alone (markers_by_position.sql), to
    /// be looked up beside the others.
    markers_before_positions: bool,
    /// Copies the WAL into the file off the commit path (see `checkpoint`).
    _checkpointer: checkpoint::Checkpointer,
}

/// A pooled reader connection, returned to the pool when dropped.
struct Reader<'a> {
    store: &'a SqliteStore,
    connection: Option<Connection>,
}

impl std::ops::Deref for Reader<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.connection
            .as_ref()
            .expect("a reader holds its connection until dropped")
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            let mut pool = self.store.readers.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < 8 {
                pool.push(connection);
            }
        }
    }
}

/// Create the store's directory (0700) and file (0600) when missing: the store holds every message and
/// document, so other users of the machine get nothing. SQLite gives the `-wal` and `-shm` files the
/// database file's mode. Existing files keep theirs (the operator chose them).
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Directory {
                path: dir.into(),
                source,
            })?;
    }
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(Error::File {
            path: path.into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

impl SqliteStore {
    /// Open (creating if needed) the store at `path`, creating its directory too.
    pub fn open(path: &Path) -> Result<Self> {
        create_private(path)?;
        let connection = Connection::open(path).map_err(|e| sqlite(path, e))?;
        configured(path, &connection)?;
        let markers_before_positions = connection
            .query_row(sql::HAS_MARKERS_BEFORE_POSITIONS, [], |r| r.get(0))
            .map_err(|e| sqlite(path, e))?;
        let store = Self {
            path: path.into(),
            connection: Mutex::new(connection),
            readers: Mutex::default(),
            markers_before_positions,
            _checkpointer: checkpoint::Checkpointer::start(path).map_err(|e| sqlite(path, e))?,
        };
        Ok(store)
    }

    pub(super) fn connection(&self) -> MutexGuard<'_, Connection> {
        // rusqlite rolls back an open transaction when it is dropped during a panic, so a poisoned
        // connection is still consistent.
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The identities a marker query returns (its first column).
    fn marked(&self, query: &str, params: impl rusqlite::Params) -> Result<HashSet<String>> {
        let connection = self.reader()?;
        let mut statement = connection
            .prepare_cached(query)
            .map_err(|e| self.error(e))?;
        let found = statement
            .query_map(params, |row| row.get::<_, String>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<HashSet<String>>>())
            .map_err(|e| self.error(e))?;
        Ok(found)
    }

    /// Which of `ids` (a JSON array) have a marker an older build wrote that could not be rekeyed
    /// (markers_by_position.sql); none when there are no such markers.
    fn marked_before_positions(&self, subscription: &str, ids: &str) -> Result<HashSet<String>> {
        if !self.markers_before_positions {
            return Ok(HashSet::new());
        }
        self.marked(
            sql::IS_PROCESSED_BEFORE_POSITIONS,
            params![subscription, ids],
        )
    }

    fn reader(&self) -> Result<Reader<'_>> {
        let pooled = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let connection = match pooled {
            Some(connection) => connection,
            None => {
                let connection = Connection::open(&self.path).map_err(|e| self.error(e))?;
                connection
                    .busy_timeout(Duration::from_secs(5))
                    .map_err(|e| self.error(e))?;
                connection
                    .pragma_update(None, "cache_size", -4096)
                    .map_err(|e| self.error(e))?;
                connection.set_prepared_statement_cache_capacity(32);
                connection
            }
        };
        Ok(Reader {
            store: self,
            connection: Some(connection),
        })
    }

    fn error(&self, source: rusqlite::Error) -> Error {
        sqlite(&self.path, source)
    }

    /// Apply `unit` in a transaction of its own and commit it; dropping the transaction on an error
    /// rolls it back.
    fn commit_with(&self, unit: &UnitOfWork, markers: Markers) -> Result<Option<u64>, CommitError> {
        let mut connection = self.connection();
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last = apply(&tx, unit, markers)?;
        tx.commit()?;
        Ok(last)
    }

    fn query_messages(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<StoredMessage>> {
        self.query_rows(sql, params, message_from_row)
    }

    /// The rows of a read, each made a `T` by `row`.
    fn query_rows<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        row: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        let connection = self.reader()?;
        let mut statement = connection.prepare_cached(sql).map_err(|e| self.error(e))?;
        let rows = statement
            .query_map(params, row)
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.error(e))
    }
}

impl SqliteStore {
    /// One indexed range read per category, merged: each stops at the limit, so the cost does not grow
    /// with the history behind the position. The reads share one read transaction, hence one snapshot:
    /// read on separate snapshots, a commit landing between two of them could show a later message of
    /// one category while an earlier one of another is still missing, and the position would pass it.
    fn read_merged(
        &self,
        categories: &[String],
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let connection = self.reader()?;
        let snapshot = connection
            .unchecked_transaction()
            .map_err(|e| self.error(e))?;
        let mut statement = snapshot
            .prepare_cached(sql::READ_CATEGORY)
            .map_err(|e| self.error(e))?;
        let mut merged = Vec::new();
        for category in categories {
            let rows = statement
                .query_map(params![category, after, limit as i64], message_from_row)
                .map_err(|e| self.error(e))?;
            for row in rows {
                merged.push(row.map_err(|e| self.error(e))?);
            }
        }
        merged.sort_unstable_by_key(|m| m.global_position);
        merged.truncate(limit);
        Ok(merged)
    }
}

fn sqlite(path: &Path, source: rusqlite::Error) -> Error {
    Error::Sqlite {
        path: path.display().to_string(),
        source,
    }
}

fn message_from_row(row: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        global_position: row.get(0)?,
        position: row.get(1)?,
        stream: row.get(2)?,
        message_type: row.get(3)?,
        id: row.get(4)?,
        time: row.get(5)?,
        data: row.get(6)?,
        metadata: row.get(7)?,
        decoded: Default::default(),
    })
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339()
}

/// Apply a unit of work inside an open transaction, its markers inserted as `markers` says.
fn apply(
    tx: &rusqlite::Transaction<'_>,
    unit: &UnitOfWork,
    markers: Markers,
) -> Result<Option<u64>, CommitError> {
    raise_fences(tx, unit)?;
    record_idempotency_key(tx, unit)?;
    schedules::apply(tx, unit)?;
    let mut versions: HashMap<&str, i64> = HashMap::new();
    let mut last = None;
    for m in &unit.messages {
        let actual = match versions.get(m.stream.as_str()) {
            Some(v) => *v,
            None => tx
                .prepare_cached(sql::STREAM_VERSION)?
                .query_row([&m.stream], |r| r.get::<_, Option<i64>>(0))?
                .unwrap_or(-1),
        };
        if let Some(expected) = m.expected_version.filter(|e| *e != actual) {
            return Err(Error::VersionConflict {
                stream: m.stream.clone(),
                expected,
                actual,
            }
            .into());
        }
        let inserted = tx.prepare_cached(sql::APPEND)?.execute(params![
            actual + 1,
            m.time,
            m.stream,
            category(&m.stream),
            m.message_type,
            m.data,
            m.metadata,
            m.id
        ]);
        match inserted {
            Err(rusqlite::Error::SqliteFailure(e, Some(text)))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(if text.contains("messages.id") {
                    Error::DuplicateMessage(m.id.clone()).into()
                } else {
                    Error::VersionConflict {
                        stream: m.stream.clone(),
                        expected: actual,
                        actual: actual + 1,
                    }
                    .into()
                });
            }
            other => other?,
        };
        versions.insert(&m.stream, actual + 1);
        let global_position = tx.last_insert_rowid();
        if unit.publish {
            // A fired schedule's text was read back from the store, where anything may have changed
            // it: its row has no checksum, and the outbox parses it.
            let vouched = unit.fired.is_empty();
            let checksum = vouched.then(|| text_checksum(&m.data, &m.metadata));
            tx.prepare_cached(sql::OUTBOX_INSERT)?.execute(params![
                global_position,
                category(&m.stream),
                checksum
            ])?;
        }
        last = Some(global_position as u64);
    }
    let mut document_versions = draw_document_versions(tx, &unit.documents)?;
    for write in &unit.documents {
        write_document(tx, write, &mut document_versions)?;
    }
    let at = now();
    insert_markers(tx, unit, &at, markers)?;
    if let Some(update) = &unit.position {
        tx.prepare_cached(sql::UPSERT_POSITION)?.execute(params![
            update.subscription,
            update.position,
            at
        ])?;
    }
    for d in &unit.dead_letters {
        tx.prepare_cached(sql::INSERT_DEAD_LETTER)?
            .execute(params![
                d.subscription,
                d.handler,
                d.message_id,
                d.stream,
                d.global_position,
                d.message_type,
                d.data,
                d.metadata,
                d.error,
                d.attempts,
                d.build_id,
                d.failed_at
            ])?;
    }
    end_calls(tx, &unit.ended_calls)?;
    apply_parking(tx, &unit.parking, &at)?;
    Ok(last)
}

/// Clear the call records of `ended` (subscription, identity). A unit ends the record of every message
/// it settles after a call, but records are only written for messages that failed before: the table
/// is almost always empty, and one lookup then stands for a delete per message (6.5% of a Redis
/// consume's instructions). The lookup is in the unit's write transaction, so no record can appear
/// between it and the commit.
fn end_calls(tx: &rusqlite::Transaction<'_>, ended: &[(String, String)]) -> rusqlite::Result<()> {
    if ended.is_empty() || !tx.prepare_cached(sql::ANY_CALL)?.exists([])? {
        return Ok(());
    }
    let mut end = tx.prepare_cached(sql::END_CALL)?;
    for (subscription, identity) in ended {
        end.execute(params![subscription, identity])?;
    }
    Ok(())
}

/// How a unit's processed markers are inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Markers {
    /// A full batch's in one statement ([`insert_at_once`]), the rest one by one.
    AtOnce,
    /// One by one: the first that exists is refused by name.
    OneByOne,
    /// With markers an older build wrote kept by identity alone, each marker is looked for there
    /// first ([`SqliteStore::markers_before_positions`]), so all go one by one.
    BeforePositions,
}

/// The unit's processed markers, inserted as `how` says.
fn insert_markers(
    tx: &rusqlite::Transaction<'_>,
    unit: &UnitOfWork,
    at: &str,
    how: Markers,
) -> Result<(), CommitError> {
    let mut rest: &[ProcessedMarker] = &unit.processed;
    if how == Markers::AtOnce {
        let mut chunks = rest.chunks_exact(MARKERS_AT_ONCE);
        for chunk in &mut chunks {
            // A unit's markers are one subscription's, of one build: the statement binds those once.
            let alike = chunk.iter().all(|m| {
                m.subscription == chunk[0].subscription && m.build_id == chunk[0].build_id
            });
            match alike {
                true => insert_at_once(tx, chunk, at)?,
                false => insert_one_by_one(tx, chunk, at, false)?,
            }
        }
        rest = chunks.remainder();
    }
    insert_one_by_one(tx, rest, at, how == Markers::BeforePositions)
}

/// How many markers [`insert_at_once`] writes in one statement: a batch of the default size. Smaller
/// units go one by one, rather than crowd the statement cache with a statement per size.
const MARKERS_AT_ONCE: usize = 100;

/// `sql::INSERT_PROCESSED_AT_ONCE` with [`MARKERS_AT_ONCE`] rows. The values every row shares (the
/// subscription, the build id, the time) are bound once, as `?1`, `?2` and `?3`; each row binds its
/// position and identity. Binding the shared three in every row copied 300 strings a commit into the
/// statement.
static INSERT_PROCESSED_AT_ONCE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let rows: Vec<String> = (0..MARKERS_AT_ONCE)
        .map(|i| format!("(?1, ?{}, ?{}, ?2, ?3)", 4 + 2 * i, 5 + 2 * i))
        .collect();
    format!("{}{}", sql::INSERT_PROCESSED_AT_ONCE, rows.join(", "))
});

/// Insert `markers` ([`MARKERS_AT_ONCE`] of them) in one statement: one statement's execution instead
/// of one each. When one of them exists already, the statement stops there, its rows before stay,
/// and the unit is refused as [`CommitError::MarkedBefore`], to be rolled back. They share the first
/// one's subscription and build id.
fn insert_at_once(
    tx: &rusqlite::Transaction<'_>,
    markers: &[ProcessedMarker],
    at: &str,
) -> Result<(), CommitError> {
    let mut insert = tx.prepare_cached(&INSERT_PROCESSED_AT_ONCE)?;
    let shared = &markers[0];
    insert.raw_bind_parameter(1, &shared.subscription)?;
    insert.raw_bind_parameter(2, &shared.build_id)?;
    insert.raw_bind_parameter(3, at)?;
    for (i, marker) in markers.iter().enumerate() {
        insert.raw_bind_parameter(4 + 2 * i, marker.global_position as i64)?;
        insert.raw_bind_parameter(5 + 2 * i, &marker.message_id)?;
    }
    match insert.raw_execute() {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(CommitError::MarkedBefore)
        }
        Err(e) => Err(e.into()),
    }
}

/// Insert `markers` one by one; the statement is taken from the cache once, not once per marker (each
/// lookup hashes the SQL text).
fn insert_one_by_one(
    tx: &rusqlite::Transaction<'_>,
    markers: &[ProcessedMarker],
    at: &str,
    before_positions: bool,
) -> Result<(), CommitError> {
    if markers.is_empty() {
        return Ok(());
    }
    let mut insert = tx.prepare_cached(sql::INSERT_PROCESSED)?;
    let mut before_positions = match before_positions {
        true => Some(tx.prepare_cached(sql::IS_PROCESSED_BEFORE_POSITIONS)?),
        false => None,
    };
    let already = |marker: &ProcessedMarker| Error::AlreadyProcessed {
        subscription: marker.subscription.clone(),
        message_id: marker.message_id.clone(),
    };
    for marker in markers {
        if let Some(lookup) = &mut before_positions {
            let ids = serde_json::to_string(&[&marker.message_id]).unwrap_or_default();
            if lookup.exists(params![marker.subscription, ids])? {
                return Err(already(marker).into());
            }
        }
        let inserted = insert.execute(params![
            marker.subscription,
            marker.global_position as i64,
            marker.message_id,
            marker.build_id,
            at
        ]);
        match inserted {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(already(marker).into());
            }
            other => other?,
        };
    }
    Ok(())
}

/// Park, hold, settle and unpark, in that order: a key parked by this unit holds its later messages.
fn apply_parking(
    tx: &rusqlite::Transaction<'_>,
    parking: &Parking,
    at: &str,
) -> Result<(), CommitError> {
    let subscription = &parking.subscription;
    for (key, dead_letter) in &parking.park {
        tx.prepare_cached(sql::PARK_KEY)?
            .execute(params![subscription, key, dead_letter, at])?;
    }
    for (key, global_position) in &parking.hold {
        let parked: i64 = tx
            .prepare_cached(sql::IS_PARKED)?
            .query_row(params![subscription, key], |r| r.get(0))?;
        if parked == 0 {
            return Err(Error::NotParked {
                subscription: subscription.clone(),
                key: key.clone(),
            }
            .into());
        }
        tx.prepare_cached(sql::HOLD_MESSAGE)?.execute(params![
            subscription,
            key,
            global_position
        ])?;
    }
    for (key, global_position) in &parking.settle {
        tx.prepare_cached(sql::SETTLE_HELD)?.execute(params![
            subscription,
            key,
            global_position
        ])?;
    }
    for key in &parking.unpark {
        if tx
            .prepare_cached(sql::UNPARK_KEY)?
            .execute(params![subscription, key])?
            > 0
        {
            tx.prepare_cached(sql::DROP_HELD)?
                .execute(params![subscription, key])?;
        }
    }
    Ok(())
}

/// Record the unit's idempotency key, refusing the unit when the key was committed before.
fn record_idempotency_key(
    tx: &rusqlite::Transaction<'_>,
    unit: &UnitOfWork,
) -> Result<(), CommitError> {
    let Some(key) = &unit.idempotency_key else {
        return Ok(());
    };
    let inserted = tx
        .prepare_cached(sql::INSERT_IDEMPOTENCY_KEY)?
        .execute(params![key.key, key.message_id, now()])?;
    if inserted == 0 {
        let message_id: String = tx
            .prepare_cached(sql::READ_IDEMPOTENCY_KEY)?
            .query_row([&key.key], |r| r.get(0))?;
        return Err(Error::AlreadyCommitted {
            key: key.key.clone(),
            message_id,
        }
        .into());
    }
    Ok(())
}

/// Raise every fence of the unit, refusing it when a newer owner's token is recorded for a name. First
/// in the commit, so a stale owner's unit fails before it has done any work.
fn raise_fences(tx: &rusqlite::Transaction<'_>, unit: &UnitOfWork) -> Result<(), CommitError> {
    for fence in &unit.fences {
        let name = fence.owned.key();
        let raised = tx
            .prepare_cached(sql::FENCE_RAISE)?
            .execute(params![name, fence.token])?;
        if raised == 0 {
            let current: u64 = tx
                .prepare_cached(sql::FENCE_CURRENT)?
                .query_row([&name], |r| r.get(0))?;
            return Err(Error::Fenced {
                owned: fence.owned.clone(),
                token: fence.token,
                current,
            }
            .into());
        }
    }
    Ok(())
}

/// The versions of `writes`' puts, in order, drawn in one statement. Drawn one a put, they took 5.3 µs
/// each, a seventh of the SQLite writer's time in the sample flow (90,000 puts in 1,870 units).
fn draw_document_versions(
    tx: &rusqlite::Transaction<'_>,
    writes: &[DocumentWrite],
) -> rusqlite::Result<std::ops::Range<DocumentVersion>> {
    let puts = writes
        .iter()
        .filter(|w| matches!(w, DocumentWrite::Put { .. }))
        .count() as DocumentVersion;
    if puts == 0 {
        return Ok(0..0);
    }
    let last: DocumentVersion = tx
        .prepare_cached(sql::DRAW_DOCUMENT_VERSIONS)?
        .query_row([puts], |r| r.get(0))?;
    Ok(last + 1 - puts..last + 1)
}

/// Write or delete a document and keep its field index in step, touching only the fields that changed
/// (a projector rewriting one field of a document costs one index delete and one insert). A write that
/// expects a version is checked first; the transaction holds the write lock, so nothing can change the
/// document between the check and the write. A put takes its version from `versions`
/// ([`draw_document_versions`]).
fn write_document(
    tx: &rusqlite::Transaction<'_>,
    write: &DocumentWrite,
    versions: &mut impl Iterator<Item = DocumentVersion>,
) -> Result<(), CommitError> {
    let (collection, id) = write.key();
    if let Some(expected) = write.expected() {
        let actual: DocumentVersion = tx
            .prepare_cached(sql::DOCUMENT_VERSION)?
            .query_row(params![collection, id], |r| r.get(0))
            .optional()?
            .unwrap_or(ABSENT);
        if actual != expected {
            return Err(Error::DocumentConflict {
                collection: collection.to_owned(),
                id: id.to_owned(),
                expected,
                actual,
            }
            .into());
        }
    }
    let new_fields = match write {
        DocumentWrite::Put { data, .. } => {
            let version = versions
                .next()
                .ok_or_else(|| Error::Corrupt("no document version drawn for a put".into()))?;
            tx.prepare_cached(sql::PUT_DOCUMENT)?
                .execute(params![collection, id, data, version])?;
            indexed_fields(data)
        }
        DocumentWrite::Delete { .. } => {
            tx.prepare_cached(sql::DELETE_DOCUMENT)?
                .execute(params![collection, id])?;
            Vec::new()
        }
    };
    let old_fields: Vec<(String, String)> = tx
        .prepare_cached(sql::READ_DOCUMENT_FIELDS)?
        .query_map(params![collection, id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut delete = tx.prepare_cached(sql::DELETE_DOCUMENT_FIELD)?;
    for (field, value) in old_fields.iter().filter(|f| !new_fields.contains(f)) {
        delete.execute(params![collection, field, value, id])?;
    }
    let mut insert = tx.prepare_cached(sql::INSERT_DOCUMENT_FIELD)?;
    for (field, value) in new_fields.iter().filter(|f| !old_fields.contains(f)) {
        insert.execute(params![collection, field, value, id])?;
    }
    Ok(())
}

/// A commit fails either for a domain reason or an SQLite one.
enum CommitError {
    Store(Error),
    Sqlite(rusqlite::Error),
    /// A marker of a full batch inserted at once exists already; which one, the unit says when
    /// applied again with its markers one by one.
    MarkedBefore,
}

impl From<Error> for CommitError {
    fn from(e: Error) -> Self {
        Self::Store(e)
    }
}

impl From<rusqlite::Error> for CommitError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

impl Store for SqliteStore {
    fn read_categories(
        &self,
        categories: &[String],
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        match categories {
            [] => Ok(Vec::new()),
            [one] => self.query_messages(sql::READ_CATEGORY, params![one, after, limit as i64]),
            many => self.read_merged(many, after, limit),
        }
    }

    fn read_stream(&self, stream: &str, from: u64) -> Result<Vec<StoredMessage>> {
        self.query_messages(sql::READ_STREAM, params![stream, from])
    }

    fn commit(&self, unit: &UnitOfWork) -> Result<Option<u64>> {
        let markers = match self.markers_before_positions {
            true => Markers::BeforePositions,
            false => Markers::AtOnce,
        };
        match self.commit_with(unit, markers) {
            // Another unit marked one of these messages: refused either way, and one by one the
            // refusal names the message.
            Err(CommitError::MarkedBefore) => self.commit_with(unit, Markers::OneByOne),
            other => other,
        }
        .map_err(|e| match e {
            CommitError::Store(e) => e,
            CommitError::Sqlite(e) => self.error(e),
            CommitError::MarkedBefore => unreachable!("markers one by one are refused by name"),
        })
    }

    fn position(&self, subscription: &str) -> Result<Option<u64>> {
        let connection = self.reader()?;
        let mut statement = connection
            .prepare_cached(sql::READ_POSITION)
            .map_err(|e| self.error(e))?;
        statement
            .query_row([subscription], |r| r.get(0))
            .optional()
            .map_err(|e| self.error(e))
    }

    fn read_document(&self, collection: &str, id: &str) -> Result<Option<StoredDocument>> {
        let connection = self.reader()?;
        let mut statement = connection
            .prepare_cached(sql::GET_DOCUMENT)
            .map_err(|e| self.error(e))?;
        statement
            .query_row([collection, id], |r| {
                Ok(StoredDocument {
                    id: id.to_owned(),
                    data: r.get(0)?,
                    version: r.get(1)?,
                })
            })
            .optional()
            .map_err(|e| self.error(e))
    }

    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value: &serde_json::Value,
    ) -> Result<Vec<StoredDocument>> {
        check_field(field)?;
        let connection = self.reader()?;
        let mut statement = connection
            .prepare_cached(sql::FIND_DOCUMENTS)
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map(params![collection, field, value.to_string()], |r| {
                Ok(StoredDocument {
                    id: r.get(0)?,
                    data: r.get(1)?,
                    version: r.get(2)?,
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.error(e))
    }

    fn head(&self, categories: &[String]) -> Result<u64> {
        let connection = self.reader()?;
        let mut max = 0;
        if categories.is_empty() {
            let head: Option<u64> = connection
                .query_row(sql::HEAD_ALL, [], |r| r.get(0))
                .map_err(|e| self.error(e))?;
            return Ok(head.unwrap_or(0));
        }
        let mut statement = connection
            .prepare_cached(sql::HEAD_CATEGORY)
            .map_err(|e| self.error(e))?;
        for c in categories {
            let head: Option<u64> = statement
                .query_row([c], |r| r.get(0))
                .map_err(|e| self.error(e))?;
            max = max.max(head.unwrap_or(0));
        }
        Ok(max)
    }

    fn count_after(&self, categories: &[String], after: u64) -> Result<u64> {
        let connection = self.reader()?;
        let mut statement = connection
            .prepare_cached(sql::COUNT_CATEGORY)
            .map_err(|e| self.error(e))?;
        let mut total = 0;
        for c in categories {
            let count: u64 = statement
                .query_row(params![c, after], |r| r.get(0))
                .map_err(|e| self.error(e))?;
            total += count;
        }
        Ok(total)
    }

    fn processed(&self, subscription: &str, ids: &[&str]) -> Result<HashSet<String>> {
        // One query for the whole batch: the ids travel as one JSON array.
        let ids = serde_json::to_string(ids).unwrap_or_default();
        let mut found = self.marked(sql::IS_PROCESSED, params![subscription, ids])?;
        found.extend(self.marked_before_positions(subscription, &ids)?);
        Ok(found)
    }

    fn processed_messages(
        &self,
        subscription: &str,
        messages: &[MarkerKey<'_>],
    ) -> Result<HashSet<String>> {
        let (positioned, unpositioned): (Vec<&MarkerKey<'_>>, Vec<&MarkerKey<'_>>) =
            messages.iter().partition(|m| m.global_position > 0);
        let positions: Vec<u64> = positioned.iter().map(|m| m.global_position).collect();
        let ids: Vec<&str> = unpositioned.iter().map(|m| m.identity).collect();
        let positions = serde_json::to_string(&positions).unwrap_or_default();
        let ids = serde_json::to_string(&ids).unwrap_or_default();
        let connection = self.reader()?;
        let mut statement = connection
            .prepare_cached(sql::IS_PROCESSED_KEYED)
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map(params![subscription, positions, ids], |row| {
                Ok((row.get::<_, i64>(0)? as u64, row.get::<_, String>(1)?))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<(u64, String)>>>())
            .map_err(|e| self.error(e))?;
        // A marker under a message's global position is that message's only when it names it too.
        // Rows are redeliveries, so mostly none: the batch's keys are only gathered for them.
        let mut found = HashSet::new();
        if !rows.is_empty() {
            let wanted: HashSet<(u64, &str)> = messages
                .iter()
                .map(|m| (m.global_position, m.identity))
                .collect();
            found.extend(
                rows.into_iter()
                    .filter(|(position, id)| wanted.contains(&(*position, id.as_str())))
                    .map(|(_, id)| id),
            );
        }
        if self.markers_before_positions {
            let all: Vec<&str> = messages.iter().map(|m| m.identity).collect();
            let all = serde_json::to_string(&all).unwrap_or_default();
            found.extend(self.marked_before_positions(subscription, &all)?);
        }
        Ok(found)
    }

    fn record_calls(&self, calls: &[CallRecord]) -> Result<()> {
        let mut connection = self.connection();
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.error(e))?;
        for call in calls {
            tx.prepare_cached(sql::RECORD_CALL)
                .and_then(|mut s| {
                    s.execute(params![call.subscription, call.identity, call.attempts])
                })
                .map_err(|e| self.error(e))?;
        }
        tx.commit().map_err(|e| self.error(e))
    }

    fn recorded_calls(
        &self,
        subscription: &str,
        identities: Option<&[&str]>,
    ) -> Result<HashMap<String, u32>> {
        let connection = self.reader()?;
        let mut statement = connection
            .prepare_cached(sql::RECORDED_CALLS)
            .map_err(|e| self.error(e))?;
        let wanted = identities.map(|ids| serde_json::to_string(ids).unwrap_or_default());
        statement
            .query_map(params![subscription, wanted], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, u32>(1)?))
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.error(e))
    }

    fn idempotency_key(&self, key: &str) -> Result<Option<String>> {
        let connection = self.reader()?;
        let mut statement = connection
            .prepare_cached(sql::READ_IDEMPOTENCY_KEY)
            .map_err(|e| self.error(e))?;
        statement
            .query_row([key], |r| r.get(0))
            .optional()
            .map_err(|e| self.error(e))
    }

    fn outbox(&self) -> Option<&dyn Outbox> {
        Some(self)
    }

    fn schedules(&self) -> &dyn crate::store::Schedules {
        self
    }

    fn resolve_dead_letter(
        &self,
        subscription: &str,
        global_position: u64,
        replayed_by: &str,
    ) -> Result<bool> {
        let now = crate::message::format_time(chrono::Utc::now());
        let updated = self.write(|tx| {
            let updated = tx
                .prepare_cached(sql::RESOLVE_DEAD_LETTER)?
                .execute(params![subscription, global_position, replayed_by, now])?;
            tx.prepare_cached(sql::RELEASE_REPLAYED)?
                .execute(params![subscription, global_position])?;
            Ok(updated)
        })?;
        Ok(updated > 0)
    }

    fn purge_dead_letters(&self, subscription: &str) -> Result<u64> {
        let deleted = self.write(|tx| {
            let deleted = tx
                .prepare_cached(sql::PURGE_DEAD_LETTERS)?
                .execute(params![subscription])?;
            tx.prepare_cached(sql::RELEASE_ALL)?
                .execute(params![subscription])?;
            Ok(deleted)
        })?;
        Ok(deleted as u64)
    }

    fn parked_keys(&self, subscription: &str) -> Result<Vec<ParkedKey>> {
        let connection = self.reader()?;
        let mut statement = connection
            .prepare_cached(sql::PARKED_KEYS)
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([subscription], |r| {
                Ok(ParkedKey {
                    key: r.get(0)?,
                    dead_letter: r.get(1)?,
                    released: r.get(2)?,
                    held: r.get(3)?,
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.error(e))
    }

    fn held_messages(
        &self,
        subscription: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.query_messages(sql::HELD_MESSAGES, params![subscription, key, limit])
    }

    fn dead_letters(&self, subscription: Option<&str>) -> Result<Vec<DeadLetter>> {
        let connection = self.reader()?;
        let mut statement = connection
            .prepare_cached(sql::READ_DEAD_LETTERS)
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([subscription], |r| {
                Ok(DeadLetter {
                    subscription: r.get(0)?,
                    handler: r.get(1)?,
                    message_id: r.get(2)?,
                    stream: r.get(3)?,
                    global_position: r.get(4)?,
                    message_type: r.get(5)?,
                    data: r.get(6)?,
                    metadata: r.get(7)?,
                    error: r.get(8)?,
                    attempts: r.get(9)?,
                    build_id: r.get(10)?,
                    failed_at: r.get(11)?,
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.error(e))
    }
}

impl SqliteStore {
    /// Give back the memory a large message's row took on its way through the writer connection: its
    /// overflow pages in the page cache (`PRAGMA shrink_memory`), and what SQLite freed of it, which
    /// glibc's `malloc` (SQLite's allocator; ours is jemalloc) keeps for itself until trimmed. Kept, it
    /// stayed resident while the broker's client made its own copies of the message, and publishing
    /// one peaked at 4.2–4.6 times the message's size (`protean-bench --only limits`).
    fn release_large_rows(&self) {
        if let Err(e) = self.connection().execute_batch("PRAGMA shrink_memory") {
            tracing::debug!(error = %e, "cannot shrink the writer's page cache");
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free memory of glibc's heap to the system.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// Run `f` in a write transaction (`BEGIN IMMEDIATE`: serialised with every other writer, in any
    /// process).
    fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let mut connection = self.connection();
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.error(e))?;
        let out = f(&tx).map_err(|e| self.error(e))?;
        tx.commit().map_err(|e| self.error(e))?;
        Ok(out)
    }
}

/// A row of `outbox_claimable.sql` as the claim weighs it.
fn outbox_candidate(r: &Row<'_>) -> rusqlite::Result<Candidate> {
    Ok(Candidate {
        seq: r.get(0)?,
        target: r.get(1)?,
        next_attempt_at: r.get(2)?,
    })
}

/// A row of `outbox_claimable.sql` the claim took, with its message's wire form.
fn outbox_item(r: &Row<'_>, c: Candidate) -> rusqlite::Result<OutboxItem> {
    let (data, metadata) = (text(r, 6)?, text(r, 7)?);
    let committed: Option<i64> = r.get(8)?;
    Ok(OutboxItem::new(
        c.seq,
        c.target,
        r.get(3)?,
        (data, metadata),
        (r.get(5)?, r.get(4)?),
        committed == Some(text_checksum(data, metadata)),
    ))
}

/// Column `i` of `r` as text, borrowed from the row.
fn text<'r>(r: &'r Row<'_>, i: usize) -> rusqlite::Result<&'r str> {
    let value = r.get_ref(i)?;
    value
        .as_str()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, value.data_type(), Box::new(e)))
}

impl Outbox for SqliteStore {
    fn claim(
        &self,
        worker: &str,
        limit: usize,
        lease: Duration,
        in_flight: &InFlight,
    ) -> Result<Claim> {
        let now = super::now_ms();
        let (first, last) = in_flight.longest();
        let claim = self.write(|tx| {
            let leases: Leases = tx
                .prepare_cached(sql::OUTBOX_LEASES)?
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        Lease {
                            worker: r.get(1)?,
                            until: r.get(2)?,
                        },
                    ))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut chooser = Chooser::new(&leases, worker, now, limit, in_flight);
            let mut items = Vec::new();
            // A window of the oldest pending rows (enough to skip a few held-back streams), read only
            // until the claim is full; a taken row's message comes with it. The longest run in
            // flight is passed over in the index, before any row is read.
            let mut claimable = tx.prepare_cached(sql::OUTBOX_CLAIMABLE)?;
            let mut rows = claimable.query(params![limit as i64 * 4, first, last])?;
            while let Some(row) = rows.next()? {
                let candidate = outbox_candidate(row)?;
                match chooser.offer(&candidate) {
                    Offer::Taken => items.push(outbox_item(row, candidate)?),
                    Offer::Skipped => {}
                    Offer::Full => break,
                }
            }
            drop(rows);
            let until = now + lease.as_millis() as u64;
            let mut take = tx.prepare_cached(sql::OUTBOX_LEASE)?;
            let targets = items.iter().map(|i| i.target.as_str());
            for target in to_lease(targets, &leases, worker, now, lease) {
                take.execute(params![target, worker, until])?;
            }
            Ok(chooser.choice.claim(items))
        })?;
        if claim.items.iter().any(OutboxItem::is_large) {
            self.release_large_rows();
        }
        Ok(claim)
    }

    fn published(&self, worker: &str, seqs: &[u64]) -> Result<()> {
        self.settle(worker, seqs, &[])
    }

    fn failed(&self, worker: &str, seq: u64, error: &str, retry_at: u64) -> Result<()> {
        let error = error.to_owned();
        self.settle(
            worker,
            &[],
            &[RowFailure {
                seq,
                error,
                retry_at,
            }],
        )
    }

    fn settle(&self, _worker: &str, published: &[u64], failed: &[RowFailure]) -> Result<()> {
        self.write(|tx| {
            let mut delete = tx.prepare_cached(sql::OUTBOX_PUBLISHED)?;
            for (first, last) in outbox::runs(published.iter().copied()) {
                delete.execute(params![first, last])?;
            }
            let mut retry = tx.prepare_cached(sql::OUTBOX_RETRY)?;
            for f in failed {
                retry.execute(params![f.seq, f.error, f.retry_at])?;
            }
            Ok(())
        })
    }

    fn release(&self, worker: &str) -> Result<()> {
        self.write(|tx| {
            tx.prepare_cached(sql::OUTBOX_RELEASE)?
                .execute([worker])
                .map(drop)
        })
    }

    fn counts(&self, held_after: u32) -> Result<OutboxCounts> {
        let (pending, failing, held) = {
            let connection = self.reader()?;
            let mut statement = connection
                .prepare_cached(sql::OUTBOX_COUNTS)
                .map_err(|e| self.error(e))?;
            statement
                .query_row([held_after], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(|e| self.error(e))?
        };
        Ok(OutboxCounts {
            pending,
            failing,
            held,
            oldest_pending_age_ms: self.pending(None, 1)?.first().map(|r| r.age_ms),
        })
    }

    fn pending(&self, target: Option<&str>, limit: usize) -> Result<Vec<PendingRow>> {
        let connection = self.reader()?;
        let mut statement = connection
            .prepare_cached(sql::OUTBOX_PENDING)
            .map_err(|e| self.error(e))?;
        let now = super::now_ms();
        let rows = statement
            .query_map(params![target, limit as i64], |r| {
                let time: String = r.get(7)?;
                let committed = crate::message::parse_time(&time)
                    .map_or(now, |t| t.timestamp_millis().max(0) as u64);
                Ok(PendingRow {
                    seq: r.get(0)?,
                    target: r.get(1)?,
                    stream: r.get(2)?,
                    message_type: r.get(3)?,
                    attempts: r.get(4)?,
                    last_error: r.get(5)?,
                    next_attempt_at: r.get(6)?,
                    age_ms: now.saturating_sub(committed),
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.error(e))
    }

    fn republish(&self, target: Option<&str>) -> Result<u64> {
        self.write(|tx| {
            tx.prepare_cached(sql::OUTBOX_REPUBLISH)?
                .execute([target])
                .map(|n| n as u64)
        })
    }
}

/// The schema version this build leaves in `user_version`: raise it with a change to schema.sql that
/// `upgrade` must run once on older files.
const SCHEMA_VERSION: i64 = 5;

/// Bring a file an older build made up to this build's schema, inside the schema's transaction,
/// after `sql::SCHEMA` made what was missing. A file at this version takes no write here, and no
/// step reads a table that grows with use: each open would cost more with every message handled (the
/// version-2 upgrade of markers, once run at every open, read every marker).
fn upgrade(connection: &Connection) -> rusqlite::Result<()> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < 2 {
        connection.execute_batch(sql::MARKERS_BY_IDENTITY)?;
    }
    migrate(connection)?;
    add_replay_columns(connection)?;
    add_outbox_checksums(connection)?;
    key_markers_by_position(connection)?;
    // Never lowered: a file a newer build upgraded keeps its version.
    if version < SCHEMA_VERSION {
        connection.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    Ok(())
}

/// The columns `CREATE TABLE IF NOT EXISTS` cannot add to a table that exists.
fn migrate(connection: &Connection) -> rusqlite::Result<()> {
    let versioned: i64 = connection.query_row(sql::HAS_DOCUMENT_VERSIONS, [], |r| r.get(0))?;
    if versioned == 0 {
        connection.execute_batch(sql::ADD_DOCUMENT_VERSIONS)?;
    }
    Ok(())
}

/// The dead-letter columns of replays, on a file an older build made (inside the schema transaction).
fn add_replay_columns(connection: &Connection) -> rusqlite::Result<()> {
    if !has_column(connection, "dead_letters", "replayed_by")? {
        connection.execute_batch(sql::REPLAY_COLUMNS)?;
    }
    Ok(())
}

/// The outbox's checksum column, on a file an older build made (inside the schema transaction).
fn add_outbox_checksums(connection: &Connection) -> rusqlite::Result<()> {
    if !has_column(connection, "outbox", "checksum")? {
        connection.execute_batch(sql::OUTBOX_CHECKSUM_COLUMN)?;
    }
    Ok(())
}

fn has_column(connection: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    connection.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
        params![table, column],
        |r| r.get(0),
    )
}

/// Processed markers keyed by global position (markers_by_position.sql), on a file an older build
/// made (inside the schema transaction): the old table is renamed, the schema makes the new one, and
/// the markers that can be placed move. The old table goes when none are left in it.
fn key_markers_by_position(connection: &Connection) -> rusqlite::Result<()> {
    if !has_column(connection, "processed", "global_position")? {
        connection.execute_batch("ALTER TABLE processed RENAME TO processed_before_positions")?;
        connection.execute_batch(sql::SCHEMA)?;
        connection.execute_batch(sql::MARKERS_BY_POSITION)?;
        let unplaced: i64 =
            connection.query_row("SELECT count(*) FROM processed_before_positions", [], |r| {
                r.get(0)
            })?;
        if unplaced == 0 {
            connection.execute_batch("DROP TABLE processed_before_positions")?;
        }
    }
    Ok(())
}

/// The writer connection of the store file at `path`, configured: its pragmas and the schema.
fn configured(path: &Path, connection: &Connection) -> Result<()> {
    let error = |e| sqlite(path, e);
    connection
        .busy_timeout(Duration::from_secs(5))
        .map_err(error)?;
    // Replicas starting together race to create a new file: switching it to WAL can fail with
    // SQLITE_BUSY at once, without the busy handler (SQLite avoids a deadlock that way). Try again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match configure(connection) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => break other.map_err(error)?,
        }
    }
    connection.set_prepared_statement_cache_capacity(32);
    Ok(())
}

/// Pragmas and the schema, on a connection of a store file.
fn configure(connection: &Connection) -> rusqlite::Result<()> {
    connection
        // 16 KiB pages (new files only): fewer B-tree splits and WAL frames per commit.
        .pragma_update(None, "page_size", 16384)
        .and_then(|_| connection.pragma_update(None, "journal_mode", "WAL"))
        .and_then(|_| connection.pragma_update(None, "synchronous", "NORMAL"))
        // 16 MiB of page cache (the default is 2 MiB): index pages of a busy store stay in memory
        // instead of being re-read from the OS on every lookup.
        .and_then(|_| connection.pragma_update(None, "cache_size", -16384))
        // Never checkpoint on a commit: the checkpointer thread does (`checkpoint.rs`).
        .and_then(|_| connection.pragma_update(None, "wal_autocheckpoint", 0))
        // No `journal_size_limit`: the commit that starts the WAL over would cut the file back, and
        // that commit, with every writer behind it, waited for the file system to free what it cut
        // (about 150 ms for a few hundred MiB here). The checkpointer cuts an idle WAL instead.
        .and_then(|_| {
            connection.execute_batch(&format!("BEGIN IMMEDIATE; {}", sql::SCHEMA))?;
            upgrade(connection)?;
            connection.execute_batch("COMMIT;")
        })
        .inspect_err(|_| {
            // A schema transaction cut short must not stay open for the next attempt.
            let _ = connection.execute_batch("ROLLBACK");
        })
}
