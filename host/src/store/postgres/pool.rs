//! Pooled PostgreSQL connections, each with its own cache of prepared statements.
//!
//! Why a custom `r2d2` manager rather than `r2d2_postgres`: the host runs the same few statements
//! thousands of times a second, and `postgres` prepares an unnamed statement for every text query (a
//! second round trip); caching the prepared statements per connection halves the round trips.
//! Reconnection is the pool's: a connection that saw its socket fail is reported broken and replaced,
//! and a checkout of a connection idle for more than a second is validated first (one round trip), so
//! the first use after a database restart gets a fresh connection. A busy connection is not validated
//! on every checkout (that would add a round trip to every read and commit), unless another connection
//! of the pool has failed since it was last checked: the first failure makes every other connection
//! suspect, so a restart costs one failed statement, not one per pooled connection.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use postgres::{types::ToSql, Client, NoTls, Row, Statement};

use crate::store::{Error, Result};

/// Opens connections for the pool.
pub(super) struct Manager {
    config: postgres::Config,
    tls: super::Tls,
    /// Bumped by every connection failure: a connection checked before the last bump is suspect.
    failures: Arc<AtomicU64>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// One connection and the statements prepared on it.
pub(crate) struct Conn {
    client: Client,
    statements: HashMap<usize, Statement>,
    broken: bool,
    /// When a statement last succeeded on it.
    last_used: Instant,
    /// The pool's failure count, shared, and its value when this connection was last known good.
    failures: Arc<AtomicU64>,
    checked_at: u64,
}

/// A connection used this recently is taken as alive without asking the server.
const TRUSTED_FOR: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("statements", &self.statements.len())
            .finish()
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Conn, postgres::Error> {
        Ok(Conn {
            client: connect(&self.config, &self.tls)?,
            statements: HashMap::new(),
            broken: false,
            last_used: Instant::now(),
            failures: self.failures.clone(),
            checked_at: self.failures.load(Ordering::Relaxed),
        })
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), postgres::Error> {
        let failures = self.failures.load(Ordering::Relaxed);
        if conn.last_used.elapsed() < TRUSTED_FOR && conn.checked_at == failures {
            return Ok(());
        }
        conn.client.simple_query("")?;
        (conn.last_used, conn.checked_at) = (Instant::now(), failures);
        Ok(())
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.broken || conn.client.is_closed()
    }
}

/// The pool of a store.
pub(super) type Pool = r2d2::Pool<Manager>;

/// The last reason the pool could not connect, in the server's words: r2d2's own timeout error says
/// only "timed out waiting for connection: db error".
#[derive(Debug, Clone, Default)]
pub(super) struct LastError(Arc<Mutex<Option<String>>>);

impl LastError {
    /// The reason of the last failed connection attempt, if one failed since the last call.
    pub(super) fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl r2d2::HandleError<postgres::Error> for LastError {
    fn handle_error(&self, error: postgres::Error) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(crate::store::postgres_detail(&error));
    }
}

/// Build a pool that connects lazily: opening a store does not wait for connections it may not need.
pub(super) fn pool(
    config: postgres::Config,
    tls: super::Tls,
    size: u32,
    errors: LastError,
) -> Pool {
    r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(1))
        .connection_timeout(Duration::from_secs(5))
        .test_on_check_out(true)
        .error_handler(Box::new(errors))
        .build_unchecked(Manager {
            config,
            tls,
            failures: Arc::default(),
        })
}

/// What a failed `COMMIT` means. An ERROR the server reports means it rolled the transaction back;
/// anything else (the socket closed, the session ended by a FATAL as at shutdown or
/// `pg_terminate_backend`) may have come after the server made the commit durable: the outcome is
/// unknown, and saying "failed" would invite a retry that doubles it.
fn commit_failed(error: Error) -> Error {
    let rolled_back = matches!(&error, Error::Postgres(e)
        if e.as_db_error().is_some_and(|db| db.severity() == "ERROR"));
    if rolled_back {
        error
    } else {
        Error::OutcomeUnknown {
            reason: error.to_string(),
        }
    }
}

/// One connection, encrypted when `tls` says so.
pub(super) fn connect(
    config: &postgres::Config,
    tls: &super::Tls,
) -> Result<Client, postgres::Error> {
    match tls {
        Some(tls) => config.connect(tls.clone()),
        None => config.connect(NoTls),
    }
}

impl Conn {
    /// The prepared form of `sql`, prepared on first use. Keyed by the text's address: every statement
    /// is a `&'static str` from an embedded file.
    fn statement(&mut self, sql: &'static str) -> Result<Statement> {
        let key = sql.as_ptr() as usize;
        if let Some(statement) = self.statements.get(&key) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).map_err(|e| self.failed(e))?;
        self.statements.insert(key, statement.clone());
        Ok(statement)
    }

    pub(super) fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let statement = self.statement(sql)?;
        let rows = self
            .client
            .query(&statement, params)
            .map_err(|e| self.failed(e))?;
        self.last_used = Instant::now();
        Ok(rows)
    }

    pub(super) fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    pub(super) fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        let statement = self.statement(sql)?;
        let count = self
            .client
            .execute(&statement, params)
            .map_err(|e| self.failed(e))?;
        self.last_used = Instant::now();
        Ok(count)
    }

    /// Run SQL text with no parameters (migrations, transaction control).
    pub(super) fn batch(&mut self, sql: &str) -> Result<()> {
        self.client.batch_execute(sql).map_err(|e| self.failed(e))
    }

    /// Run `f` in a transaction: committed when it succeeds, rolled back when it fails.
    pub(super) fn transaction<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.transaction_from("BEGIN", f)
    }

    /// [`Self::transaction`] whose first statement (SQL text without parameters, such as taking a
    /// lock) travels with its BEGIN: one round trip instead of two.
    pub(super) fn transaction_after<T>(
        &mut self,
        first: &str,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        self.transaction_from(&format!("BEGIN; {first}"), f)
    }

    fn transaction_from<T>(
        &mut self,
        begin: &str,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        if let Err(error) = self.batch(begin) {
            // A statement after BEGIN may have failed inside the transaction it opened.
            let _ = self.batch("ROLLBACK");
            return Err(error);
        }
        match f(self) {
            Ok(value) => match self.batch("COMMIT") {
                Ok(()) => Ok(value),
                Err(error) => Err(commit_failed(error)),
            },
            Err(error) => {
                // A failed rollback means a failed connection: `failed` has marked it broken.
                let _ = self.batch("ROLLBACK");
                Err(error)
            }
        }
    }

    /// Note an error: one the server did not report (a socket, a protocol failure) or a FATAL one (the
    /// server ended the session, as at shutdown) leaves the connection unusable, so the pool must not hand
    /// it out again.
    fn failed(&mut self, error: postgres::Error) -> Error {
        let fatal = error
            .as_db_error()
            .is_none_or(|db| db.severity() == "FATAL" || db.severity() == "PANIC");
        if fatal || self.client.is_closed() {
            self.broken = true;
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        Error::from(error)
    }
}
