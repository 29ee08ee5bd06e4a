//! The production store: PostgreSQL, shared by every replica.
//!
//! Messages live in MessageDB's `message_store.messages` (see the first migration), so MessageDB clients
//! read and write the same store; the host's own tables live in the `protean` schema. A unit of work is
//! one transaction. Appends take a store-wide transaction lock (as SQLite's single writer does): global
//! positions then become visible in increasing order, which is what lets a subscription trust that
//! nothing will appear behind the position it has read to.
//!
//! Failures: every error is a `store::Error` the engine retries with backoff; a lost connection is
//! replaced by the pool, so processing resumes when the database is back.

mod commit;
mod config;
pub use self::config::UriError;
mod documents;
mod lease;
mod listen;
pub mod migrate;
mod outbox;
mod pool;
mod schedules;
mod tls;

/// How connections are encrypted: `None` for plain ones (`sslmode` `disable` or `prefer`).
pub type Tls = Option<tokio_postgres_rustls::MakeRustlsConnect>;

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use postgres::{types::ToSql, Row};

use super::{
    check_field, DeadLetter, Error, Leases, Outbox, ParkedKey, Result, Store, StoredDocument,
    StoredMessage,
};
use crate::unit_of_work::{CallRecord, UnitOfWork};
use pool::Pool;

mod sql {
    macro_rules! sql {
        ($($name:ident = $file:literal;)+) => {$(
            pub(super) const $name: &str = include_str!(concat!("../sql/postgres/", $file, ".sql"));
        )+};
    }
    macro_rules! messages {
        ($($name:ident = $file:literal;)+) => {$(
            pub(super) const $name: &str = concat!(
                "SELECT ",
                include_str!("../sql/postgres/message_columns.sql"),
                include_str!(concat!("../sql/postgres/", $file, ".sql"))
            );
        )+};
    }
    sql! {
        MIGRATIONS_TABLE = "migrations_table";
        LOCK_MIGRATIONS = "lock_migrations";
        SCHEMA_EXISTS = "schema_exists";
        APPLIED_VERSIONS = "applied_versions";
        RECORD_VERSION = "record_version";
        SERVERS_CONNECTED = "servers_connected";
        APPEND_UNIT = "append_unit";
        INSERT_PROCESSED = "insert_processed";
        UPSERT_POSITION = "upsert_position";
        READ_POSITION = "read_position";
        INSERT_DEAD_LETTER = "insert_dead_letter";
        READ_DEAD_LETTERS = "read_dead_letters";
        RESOLVE_DEAD_LETTER = "resolve_dead_letter";
        PURGE_DEAD_LETTERS = "purge_dead_letters";
        HEAD_CATEGORY = "head_category";
        COUNT_CATEGORY = "count_category";
        HEAD_ALL = "head_all";
        DOCUMENTS_LOCK = "documents_lock";
        DOCUMENTS_UPDATE = "documents_update";
        DOCUMENTS_UPSERT = "documents_upsert";
        DOCUMENTS_INSERT = "documents_insert";
        DOCUMENTS_DELETE = "documents_delete";
        DOCUMENT_VERSION = "document_version";
        READ_DOCUMENTS = "read_documents";
        INSERT_IDEMPOTENCY_KEY = "insert_idempotency_key";
        READ_IDEMPOTENCY_KEY = "read_idempotency_key";
        GET_DOCUMENT = "get_document";
        FIND_DOCUMENTS = "find_documents";
        FIND_DOCUMENTS_EACH = "find_documents_each";
        PROCESSED_AMONG = "processed_among";
        INSERT_PROCESSED_ALL = "insert_processed_all";
        MARKED_BEFORE = "marked_before";
        LOCK_OUTBOX = "lock_outbox";
        OUTBOX_CLAIMABLE = "outbox_claimable";
        OUTBOX_ITEMS = "outbox_items";
        OUTBOX_LEASE = "outbox_lease";
        OUTBOX_PUBLISHED = "outbox_published";
        OUTBOX_RETRY = "outbox_retry";
        OUTBOX_RELEASE = "outbox_release";
        OUTBOX_COUNTS = "outbox_counts";
        OUTBOX_PENDING = "outbox_pending";
        OUTBOX_REPUBLISH = "outbox_republish";
        LEASE_TAKE = "lease_take";
        LEASE_RELEASE = "lease_release";
        RECORD_CALLS = "record_calls";
        END_CALLS = "end_calls";
        RECORDED_CALLS = "recorded_calls";
        FENCE_RAISE = "fence_raise";
        FENCE_CURRENT = "fence_current";
        FENCE_SHARE = "fence_share";
        PARK_KEY = "park_key";
        HOLD_MESSAGES = "hold_messages";
        SETTLE_HELD = "settle_held";
        UNPARK_KEYS = "unpark_keys";
        RELEASE_REPLAYED = "release_replayed";
        RELEASE_ALL = "release_all";
        PARKED_KEYS = "parked_keys";
        SCHEDULES_FIRE = "schedules_fire";
        SCHEDULES_SET = "schedules_set";
        SCHEDULES_CANCEL = "schedules_cancel";
        SCHEDULES_NEXT_DUE = "schedules_next_due";
        SCHEDULES_COUNTS = "schedules_counts";
        SCHEDULES_PRUNE = "schedules_prune";
    }
    macro_rules! schedules {
        ($($name:ident = $file:literal;)+) => {$(
            pub(super) const $name: &str = concat!(
                "SELECT ",
                include_str!("../sql/postgres/schedule_columns.sql"),
                include_str!(concat!("../sql/postgres/", $file, ".sql"))
            );
        )+};
    }
    schedules! {
        SCHEDULES_DUE = "schedules_due";
        SCHEDULES_LIST = "schedules_list";
        SCHEDULE_GET = "schedule_get";
    }
    messages! {
        HELD_MESSAGES = "held_messages";
        READ_STREAM = "read_stream";
        READ_STREAMS = "read_streams";
        READ_CATEGORY = "read_category";
        READ_CATEGORIES = "read_categories";
    }
}

/// How to reach the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// A libpq URI or key=value string (`postgresql://user:pass@host:5432/db`).
    pub uri: crate::redact::ConnectionString,
    /// Connections per process.
    pub pool_size: u32,
    /// The server cancels a statement running longer than this.
    pub statement_timeout: Duration,
}

impl PostgresConfig {
    /// The URI as a connection configuration and its TLS connector (`None`: plain); the error says
    /// what is wrong with it.
    pub fn parse(&self) -> Result<(postgres::Config, Tls), UriError> {
        let (text, tls) = tls::split(self.uri.expose())?;
        let mut config: postgres::Config = text
            .parse()
            .map_err(|e: postgres::Error| UriError::Syntax(super::postgres_detail(&e)))?;
        let connector = tls::connector(&tls)?;
        config.ssl_mode(match tls.mode {
            tls::Mode::Disable => postgres::config::SslMode::Disable,
            tls::Mode::Prefer => postgres::config::SslMode::Prefer,
            _ => postgres::config::SslMode::Require,
        });
        // A process frozen inside a transaction (SIGSTOP, a stopped VM) keeps its row locks, and the
        // replica taking its leases over would wait on them (the fence rows) for as long as it stays
        // frozen. Transactions here are SQL only, with nothing to wait for between statements: one idle
        // for a statement's timeout is ended by the server, its locks released and its work rolled back.
        let timeout = self.statement_timeout.as_millis();
        // Every statement here is short and indexed: a parallel plan (a store's statistics lag behind
        // a fast-growing table) only starts and stops background workers for it, which the sample flow
        // on a loaded machine was seen doing for a batch's stream reads.
        config
            .options(&format!(
                "-c statement_timeout={timeout} -c idle_in_transaction_session_timeout={timeout} \
                 -c max_parallel_workers_per_gather=0"
            ))
            .connect_timeout(Duration::from_secs(5))
            // A database host that vanishes (no RST: power loss, partition) must fail the statement in
            // seconds, not after the kernel's default of minutes, so the subscription can back off and
            // the pool reconnect: keepalives every few seconds and a bound on unacknowledged data.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(self.statement_timeout + Duration::from_secs(10))
            // With the schema version: `db setup` tells the servers of older builds by it.
            .application_name(&migrate::application_name());
        Ok((config, connector))
    }

    /// Where the store is, for messages: host, port and database, never the password.
    pub fn label(&self) -> String {
        self.uri.to_string()
    }
}

/// A failed first connection: refused by the server (credentials, database), or not made at all (down,
/// starting up), which is worth waiting for.
fn connect_error(config: &PostgresConfig, error: &postgres::Error) -> Error {
    let (store, reason) = (config.label(), super::postgres_detail(error));
    match error.code() {
        Some(code) if *code != postgres::error::SqlState::CANNOT_CONNECT_NOW => {
            Error::Refused { store, reason }
        }
        _ => Error::Unreachable { store, reason },
    }
}

/// A store in a PostgreSQL database.
#[derive(Debug)]
pub struct PostgresStore {
    pool: Pool,
    /// How to open a connection of its own, for [`Store::appends`].
    connector: listen::Connector,
    /// Why the pool last failed to connect, for the error of a checkout that timed out.
    errors: pool::LastError,
    label: String,
}

impl PostgresStore {
    /// Connect to a store that `protean-host db setup` has set up; a store that is not set up, or one
    /// behind this build, is an error naming that command.
    pub fn open(config: &PostgresConfig) -> Result<Self> {
        let store = Self::connect(config)?;
        let status = store.status()?;
        if !status.is_current() {
            return Err(Error::NotSetUp {
                store: store.label.clone(),
                version: status.version,
                latest: migrate::latest(),
            });
        }
        Ok(store)
    }

    /// Connect without checking the schema (for `db setup` and `db status`).
    pub fn connect(config: &PostgresConfig) -> Result<Self> {
        let (parsed, tls) = config.parse().map_err(|reason| Error::BadUri {
            store: config.label(),
            reason,
        })?;
        // One connection of our own first: the pool would retry a refused password or a missing
        // database until its timeout and then say only "timed out"; this says what the server said.
        pool::connect(&parsed, &tls).map_err(|e| connect_error(config, &e))?;
        let errors = pool::LastError::default();
        Ok(Self {
            connector: listen::Connector {
                config: parsed.clone(),
                tls: tls.clone(),
            },
            pool: pool::pool(parsed, tls, config.pool_size, errors.clone()),
            errors,
            label: config.label(),
        })
    }

    /// Apply pending migrations; returns those applied.
    pub fn setup(&self) -> Result<Vec<migrate::Migration>> {
        migrate::setup(&mut *self.conn()?, &self.label)
    }

    /// The schema version and the pending migrations.
    pub fn status(&self) -> Result<migrate::Status> {
        migrate::status(&mut *self.conn()?)
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<pool::Manager>> {
        self.pool.get().map_err(|e| Error::Unreachable {
            store: self.label.clone(),
            reason: self.errors.take().unwrap_or_else(|| e.to_string()),
        })
    }

    fn messages(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<StoredMessage>> {
        let rows = self.conn()?.query(sql, params)?;
        Ok(rows.iter().map(message_from_row).collect())
    }

    /// Several categories: appends to different categories commit in any order (MessageDB clients take
    /// only their category's lock), so a message can become visible below one already seen. Taking the
    /// categories' locks shared before one snapshot of them all closes that window (migration 15 does
    /// both in one statement); a writer that takes them in another order could deadlock with this read,
    /// so the read gives up its wait first (a lock timeout below PostgreSQL's deadlock_timeout) and
    /// tries again.
    fn read_merged(
        &self,
        categories: &[String],
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredMessage>> {
        const ATTEMPTS: u32 = 20;
        const LOCK_WAIT: &str = "500ms";
        let mut conn = self.conn()?;
        let mut attempt = 1;
        let rows = loop {
            // A statement of its own (outside a transaction block): the locks end with it.
            let read = conn.query(
                sql::READ_CATEGORIES,
                &[&categories, &after, &limit, &LOCK_WAIT],
            );
            match read {
                Err(e) if attempt < ATTEMPTS && is_lock_timeout(&e) => attempt += 1,
                rows => break rows?,
            }
        };
        Ok(rows.iter().map(message_from_row).collect())
    }
}

fn is_lock_timeout(error: &Error) -> bool {
    let Error::Postgres(source) = error else {
        return false;
    };
    source.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

fn message_from_row(row: &Row) -> StoredMessage {
    message_at(row, 0)
}

/// The message in columns `first..first + 8` of a row, in `message_columns.sql`'s order.
pub(super) fn message_at(row: &Row, first: usize) -> StoredMessage {
    StoredMessage {
        global_position: row.get::<_, i64>(first) as u64,
        position: row.get::<_, i64>(first + 1) as u64,
        stream: row.get(first + 2),
        message_type: row.get(first + 3),
        id: row.get(first + 4),
        time: row.get(first + 5),
        data: row.get(first + 6),
        metadata: row.get(first + 7),
        decoded: Default::default(),
    }
}

impl Store for PostgresStore {
    fn read_categories(
        &self,
        categories: &[String],
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        match categories {
            [] => Ok(Vec::new()),
            // Appends to one category are serialised by its lock, and each draws its global position
            // under it: one category's messages become visible in global order.
            [one] => self.messages(sql::READ_CATEGORY, &[one, &(after as i64), &limit]),
            many => self.read_merged(many, after as i64, limit),
        }
    }

    fn read_stream(&self, stream: &str, from: u64) -> Result<Vec<StoredMessage>> {
        self.messages(sql::READ_STREAM, &[&stream, &(from as i64)])
    }

    fn commit(&self, unit: &UnitOfWork) -> Result<Option<u64>> {
        let mut conn = self.conn()?;
        let committed = match unit.only_settles() {
            true => commit::markers_alone(&mut conn, unit).map(|()| None),
            false => conn.transaction(|c| commit::apply(c, unit)),
        };
        match committed {
            // Named once the refused statement or transaction is over: an aborted one runs no lookup.
            Err(error) if commit::refused_by_marker(&error) => {
                Err(commit::already_processed(&mut conn, unit))
            }
            result => result,
        }
    }

    fn read_documents(&self, keys: &[(&str, &str)]) -> Result<Vec<(String, StoredDocument)>> {
        let (collections, ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        let rows = self
            .conn()?
            .query(sql::READ_DOCUMENTS, &[&collections, &ids])?;
        Ok(rows
            .iter()
            .map(|r| {
                let document = StoredDocument {
                    id: r.get(1),
                    data: r.get(2),
                    version: r.get::<_, i64>(3) as u64,
                };
                (r.get(0), document)
            })
            .collect())
    }

    fn read_streams(&self, streams: &[&str]) -> Result<Vec<StoredMessage>> {
        self.messages(sql::READ_STREAMS, &[&streams])
    }

    fn idempotency_key(&self, key: &str) -> Result<Option<String>> {
        let row = self.conn()?.query_opt(sql::READ_IDEMPOTENCY_KEY, &[&key])?;
        Ok(row.map(|r| r.get(0)))
    }

    fn position(&self, subscription: &str) -> Result<Option<u64>> {
        let row = self
            .conn()?
            .query_opt(sql::READ_POSITION, &[&subscription])?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    fn read_document(&self, collection: &str, id: &str) -> Result<Option<StoredDocument>> {
        let row = self
            .conn()?
            .query_opt(sql::GET_DOCUMENT, &[&collection, &id])?;
        Ok(row.map(|r| StoredDocument {
            id: id.to_owned(),
            data: r.get(0),
            version: r.get::<_, i64>(1) as u64,
        }))
    }

    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value: &serde_json::Value,
    ) -> Result<Vec<StoredDocument>> {
        check_field(field)?;
        let rows = self.conn()?.query(
            sql::FIND_DOCUMENTS,
            &[&documents::field_entry(
                collection,
                field,
                &value.to_string(),
            )],
        )?;
        Ok(rows
            .iter()
            .map(|r| StoredDocument {
                id: r.get(0),
                data: r.get(1),
                version: r.get::<_, i64>(2) as u64,
            })
            .collect())
    }

    fn find_documents_each(
        &self,
        finds: &[(&str, &str, &serde_json::Value)],
    ) -> Result<Vec<Vec<StoredDocument>>> {
        let mut entries = Vec::with_capacity(finds.len());
        for &(collection, field, value) in finds {
            check_field(field)?;
            entries.push(documents::field_entry(
                collection,
                field,
                &value.to_string(),
            ));
        }
        let rows = self.conn()?.query(sql::FIND_DOCUMENTS_EACH, &[&entries])?;
        let mut found = vec![Vec::new(); finds.len()];
        for row in &rows {
            let n = row.get::<_, i64>(0) as usize;
            found[n - 1].push(StoredDocument {
                id: row.get(1),
                data: row.get(2),
                version: row.get::<_, i64>(3) as u64,
            });
        }
        Ok(found)
    }

    fn head(&self, categories: &[String]) -> Result<u64> {
        let mut conn = self.conn()?;
        let head =
            |row: Option<Row>| row.and_then(|r| r.get::<_, Option<i64>>(0)).unwrap_or(0) as u64;
        if categories.is_empty() {
            return Ok(head(conn.query_opt(sql::HEAD_ALL, &[])?));
        }
        let mut max = 0;
        for category in categories {
            max = max.max(head(conn.query_opt(sql::HEAD_CATEGORY, &[category])?));
        }
        Ok(max)
    }

    /// Counted in the database: the default reads every message of the backlog, all its text, to count
    /// them (for `/metrics`, `subscriptions status`, and every replica standing by, at each look).
    fn count_after(&self, categories: &[String], after: u64) -> Result<u64> {
        let mut conn = self.conn()?;
        let after = after as i64;
        let mut total = 0;
        for category in categories {
            let params: [&(dyn ToSql + Sync); 2] = [category, &after];
            let row = conn.query_opt(sql::COUNT_CATEGORY, &params)?;
            total += row.map_or(0, |r| r.get::<_, i64>(0)) as u64;
        }
        Ok(total)
    }

    fn dead_letters(&self, subscription: Option<&str>) -> Result<Vec<DeadLetter>> {
        let rows = self
            .conn()?
            .query(sql::READ_DEAD_LETTERS, &[&subscription])?;
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                subscription: r.get(0),
                handler: r.get(1),
                message_id: r.get(2),
                stream: r.get(3),
                global_position: r.get::<_, i64>(4) as u64,
                message_type: r.get(5),
                data: r.get(6),
                metadata: r.get(7),
                error: r.get(8),
                attempts: r.get::<_, i64>(9) as u32,
                build_id: r.get(10),
                failed_at: r.get(11),
            })
            .collect())
    }

    fn resolve_dead_letter(
        &self,
        subscription: &str,
        global_position: u64,
        replayed_by: &str,
    ) -> Result<bool> {
        let position = global_position as i64;
        let updated = self.conn()?.transaction(|c| {
            let updated = c.execute(
                sql::RESOLVE_DEAD_LETTER,
                &[&subscription, &position, &replayed_by],
            )?;
            c.execute(sql::RELEASE_REPLAYED, &[&subscription, &position])?;
            Ok(updated)
        })?;
        Ok(updated > 0)
    }

    fn purge_dead_letters(&self, subscription: &str) -> Result<u64> {
        self.conn()?.transaction(|c| {
            let purged = c.execute(sql::PURGE_DEAD_LETTERS, &[&subscription])?;
            c.execute(sql::RELEASE_ALL, &[&subscription])?;
            Ok(purged)
        })
    }

    fn parked_keys(&self, subscription: &str) -> Result<Vec<ParkedKey>> {
        let rows = self.conn()?.query(sql::PARKED_KEYS, &[&subscription])?;
        Ok(rows
            .iter()
            .map(|r| ParkedKey {
                key: r.get(0),
                dead_letter: r.get::<_, i64>(1) as u64,
                released: r.get(2),
                held: r.get::<_, i64>(3) as u64,
            })
            .collect())
    }

    fn held_messages(
        &self,
        subscription: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.messages(sql::HELD_MESSAGES, &[&subscription, &key, &limit])
    }

    fn processed(&self, subscription: &str, ids: &[&str]) -> Result<HashSet<String>> {
        let rows = self
            .conn()?
            .query(sql::PROCESSED_AMONG, &[&subscription, &ids])?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn record_calls(&self, calls: &[CallRecord]) -> Result<()> {
        let subscriptions: Vec<&str> = calls.iter().map(|c| c.subscription.as_str()).collect();
        let identities: Vec<&str> = calls.iter().map(|c| c.identity.as_str()).collect();
        let attempts: Vec<i32> = calls.iter().map(|c| c.attempts as i32).collect();
        self.conn()?
            .execute(sql::RECORD_CALLS, &[&subscriptions, &identities, &attempts])?;
        Ok(())
    }

    fn recorded_calls(
        &self,
        subscription: &str,
        identities: Option<&[&str]>,
    ) -> Result<HashMap<String, u32>> {
        let rows = self
            .conn()?
            .query(sql::RECORDED_CALLS, &[&subscription, &identities])?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i32>(1) as u32))
            .collect())
    }

    fn outbox(&self) -> Option<&dyn Outbox> {
        Some(self)
    }

    fn appends(&self) -> Option<Box<dyn crate::store::AppendWatch>> {
        Some(Box::new(listen::Listener::new(self.connector.clone())))
    }

    fn schedules(&self) -> &dyn crate::store::Schedules {
        self
    }

    fn leases(&self) -> Option<&dyn Leases> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::PostgresStore;
    use crate::store::{tests::postgres, Error, Store};

    /// A subscription at the head of a category that went quiet while another grew reads index entries
    /// of its own category only, whatever the statistics say. Here they say the category is a fifth of
    /// the store, so the planner would rather walk the primary key from the position and filter by
    /// category: through all 12,000 messages of the other category, hundreds of buffers at each poll.
    /// Each read by category must stay within a handful, planned for its arguments and generic alike,
    /// from its second call on (as a subscription polls); MessageDB's `get_category_messages` too.
    #[test]
    fn reads_at_a_quiet_categorys_head_touch_none_of_the_other_categories_messages() {
        let (store, server) = postgres();
        let append = |category: &str, count: u32| {
            server.psql(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(message_store.hash_64('{category}')); \
                 INSERT INTO message_store.messages (stream_name, position, type, data, metadata) \
                 SELECT '{category}-' || n, 0, 'Placed', '{{}}', jsonb_build_object('pad', repeat('x', 300)) \
                 FROM generate_series(1, {count}) AS n; COMMIT"
            ))
        };
        append("shop::order", 3000);
        append("shop::stock", 12000);
        server.psql("ANALYZE message_store.messages");
        let orders = ["shop::order".to_owned()];
        let with_payments = ["shop::order".to_owned(), "shop::payment".to_owned()];
        assert_eq!(store.head(&orders).unwrap(), 3000);
        assert!(store
            .read_categories(&orders, 3000, 100)
            .unwrap()
            .is_empty());
        assert!(store
            .read_categories(&with_payments, 3000, 100)
            .unwrap()
            .is_empty());
        assert_eq!(store.read_categories(&orders, 2950, 100).unwrap().len(), 50);
        assert_eq!(store.count_after(&orders, 3000).unwrap(), 0);
        assert_eq!(store.count_after(&with_payments, 2950).unwrap(), 50);
        let message_db = |arguments: &str| {
            server.psql(&format!(
                "SELECT string_agg(global_position::text, ',') FROM message_store.get_category_messages({arguments})"
            ))
        };
        assert_eq!(message_db("'shop::order', 2998, 100"), "2998,2999,3000");
        assert_eq!(message_db("'shop::order', 3001, 100"), "");
        let halves = [0, 1].map(|member| {
            server.psql(&format!(
                "SELECT count(*) FROM message_store.get_category_messages('shop::order', 1, 5000, NULL, {member}, 2)"
            ))
        });
        assert_eq!(
            halves
                .map(|n| n.parse::<u32>().unwrap())
                .iter()
                .sum::<u32>(),
            3000
        );

        let reads = [
            (super::sql::READ_CATEGORY, "'shop::order', 3000, 100"),
            (
                super::sql::READ_CATEGORIES,
                "ARRAY['shop::order', 'shop::payment'], 3000, 100, '500ms'",
            ),
            (super::sql::HEAD_CATEGORY, "'shop::order'"),
            (super::sql::COUNT_CATEGORY, "'shop::order', 3000"),
            // What MessageDB clients (Python Protean's subscriptions) poll.
            (
                "SELECT * FROM message_store.get_category_messages($1, $2, $3)",
                "'shop::order', 3001, 100",
            ),
        ];
        let mut client = postgres::Client::connect(&server.uri(), postgres::NoTls).unwrap();
        for mode in ["force_custom_plan", "force_generic_plan"] {
            client
                .batch_execute(&format!("SET plan_cache_mode = {mode}; DEALLOCATE ALL"))
                .unwrap();
            for (n, (statement, arguments)) in reads.iter().enumerate() {
                client
                    .batch_execute(&format!("PREPARE read_{n} AS {statement}"))
                    .unwrap();
                let explain = format!(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE read_{n}({arguments})"
                );
                // The second call: the first also plans the function's own statements (catalog reads).
                buffers_used(&mut client, &explain);
                let buffers = buffers_used(&mut client, &explain);
                assert!(buffers <= 20, "{mode}: {buffers} buffers for {statement}");
            }
        }
    }

    /// The shared buffers (hit or read) of the plan `explain` prints as JSON.
    fn buffers_used(client: &mut postgres::Client, explain: &str) -> u64 {
        let answer = client.simple_query(explain).unwrap();
        let text = answer
            .iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(row) => row.get(0),
                _ => None,
            })
            .unwrap();
        let plan: serde_json::Value = serde_json::from_str(text).unwrap();
        let top = &plan[0]["Plan"];
        ["Shared Hit Blocks", "Shared Read Blocks"]
            .iter()
            .map(|key| top[key].as_u64().unwrap())
            .sum()
    }

    #[test]
    fn a_statement_running_past_the_timeout_is_cancelled() {
        let (_, server) = postgres();
        let config = super::PostgresConfig {
            statement_timeout: Duration::from_millis(100),
            ..server.store_config()
        };
        let store = PostgresStore::open(&config).unwrap();
        let error = store
            .conn()
            .unwrap()
            .query("SELECT pg_sleep(2)", &[])
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("canceling statement due to statement timeout"),
            "{error}"
        );
        assert_eq!(
            store.head(&[]).unwrap(),
            0,
            "the connection is still usable"
        );
    }

    #[test]
    fn the_hosts_sessions_never_plan_parallel_workers() {
        let (store, _server) = postgres();
        let mut conn = store.conn().unwrap();
        let rows = conn
            .query("SHOW max_parallel_workers_per_gather", &[])
            .unwrap();
        assert_eq!(rows[0].get::<_, &str>(0), "0");
        let rows = conn.query("SHOW statement_timeout", &[]).unwrap();
        assert_ne!(
            rows[0].get::<_, &str>(0),
            "0",
            "and the other session options still apply"
        );
    }

    #[test]
    fn a_connection_idle_across_a_database_restart_is_replaced() {
        let (store, mut server) = postgres();
        assert_eq!(store.head(&[]).unwrap(), 0);
        server.restart();
        // Idle longer than a connection is trusted without a check: the checkout validates it.
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(
            store.head(&[]).unwrap(),
            0,
            "the pool replaced its dead connection"
        );
    }

    #[test]
    fn a_database_restart_costs_at_most_one_failed_call() {
        let (store, mut server) = postgres();
        assert_eq!(store.head(&[]).unwrap(), 0);
        server.restart();
        // Used a moment ago, so trusted: this call may fail on a dead connection; that failure makes the
        // pool check every other connection, so the next call cannot.
        let first = store.head(&[]);
        assert_eq!(store.head(&[]).unwrap(), 0, "after {first:?}");
    }

    #[test]
    fn an_unreachable_database_is_an_error_naming_it_without_the_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = super::PostgresConfig {
            uri: format!("postgresql://app:secret@127.0.0.1:{port}/shop").into(),
            pool_size: 1,
            statement_timeout: Duration::from_secs(1),
        };
        let error = PostgresStore::open(&config).unwrap_err();
        assert!(matches!(error, Error::Unreachable { .. }), "{error}");
        let text = error.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot reach the PostgreSQL store at postgresql://app:***@127.0.0.1:{port}/shop: "
            )),
            "{text}"
        );
        assert!(!text.contains("secret"));
    }
}
