//! Versioned migrations of the PostgreSQL store, applied by `protean-host db setup` (never by the
//! server: a schema change in production is an operator's decision, and replicas must not race on it).
//!
//! Invariant: migration N is applied only after 1..N-1, in one transaction with the row recording it,
//! under an advisory lock, so two `db setup` runs at once apply each migration exactly once.

use super::{pool::Conn, sql};
use crate::store::{Error, Result};

/// One migration: its version, a name, and its SQL.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    sql: &'static str,
}

/// Every migration, in order. Append only: an applied migration never changes.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "message_store (MessageDB 1.3 compatible)",
        sql: include_str!("../sql/postgres/migrations/001_message_store.sql"),
    },
    Migration {
        version: 2,
        name: "protean (positions, documents, markers, dead letters, outbox, leases)",
        sql: include_str!("../sql/postgres/migrations/002_protean.sql"),
    },
    Migration {
        version: 3,
        name: "fences (fencing tokens of owned partitions)",
        sql: include_str!("../sql/postgres/migrations/003_fences.sql"),
    },
    Migration {
        version: 4,
        name: "appends without their category's lock refused",
        sql: include_str!("../sql/postgres/migrations/004_category_lock_guard.sql"),
    },
    Migration {
        version: 5,
        name: "outbox: rows abandoned by older builds are pending again",
        sql: include_str!("../sql/postgres/migrations/005_outbox_revive.sql"),
    },
    Migration {
        version: 6,
        name: "document versions (optimistic concurrency of read models)",
        sql: include_str!("../sql/postgres/migrations/006_document_versions.sql"),
    },
    Migration {
        version: 7,
        name: "idempotency keys (send, once)",
        sql: include_str!("../sql/postgres/migrations/007_idempotency_keys.sql"),
    },
    Migration {
        version: 8,
        name: "processed markers keyed by stream and position, not headers.id; replayable dead letters",
        sql: include_str!("../sql/postgres/migrations/008_interop.sql"),
    },
    Migration {
        version: 9,
        name: "calls in flight (a crash counts as a failed attempt)",
        sql: include_str!("../sql/postgres/migrations/009_calls_in_flight.sql"),
    },
    Migration {
        version: 10,
        name: "parked keys of ordered event-store subscriptions and the messages they hold",
        sql: include_str!("../sql/postgres/migrations/010_parked_keys.sql"),
    },
    Migration {
        version: 11,
        name: "fencing tokens of subscription leases",
        sql: include_str!("../sql/postgres/migrations/011_lease_tokens.sql"),
    },
    Migration {
        version: 12,
        name: "scheduled messages",
        sql: include_str!("../sql/postgres/migrations/012_schedules.sql"),
    },
    Migration {
        version: 13,
        name: "appends notify listening servers (LISTEN protean_appended)",
        sql: include_str!("../sql/postgres/migrations/013_append_notifications.sql"),
    },
    Migration {
        version: 14,
        name: "the category-lock guard trusts the host's record of its locks (no pg_locks scan)",
        sql: include_str!("../sql/postgres/migrations/014_category_lock_guard_fast_path.sql"),
    },
    Migration {
        version: 15,
        name: "a read of several categories takes their locks and reads in one statement",
        sql: include_str!("../sql/postgres/migrations/015_read_categories_in_one_statement.sql"),
    },
    Migration {
        version: 16,
        name: "a unit's append takes its locks, checks versions and inserts in one statement",
        sql: include_str!("../sql/postgres/migrations/016_append_in_one_statement.sql"),
    },
    Migration {
        version: 17,
        name: "document fields in the document's row",
        sql: include_str!("../sql/postgres/migrations/017_document_fields_in_row.sql"),
    },
    Migration {
        version: 18,
        name: "published outbox rows are deleted",
        sql: include_str!("../sql/postgres/migrations/018_outbox_published_rows_deleted.sql"),
    },
    Migration {
        version: 19,
        name: "reads by category scan the category index, whatever the statistics say",
        sql: include_str!("../sql/postgres/migrations/019_category_reads_on_the_category_index.sql"),
    },
];

/// Migrations after which servers of older builds would go wrong rather than fail: `db setup` applies
/// them only while no such server is connected. 17 drops the document field table that older servers
/// write (their document writes would fail, and be retried, until they stop).
const OLDER_SERVERS_STOPPED_FIRST: &[i32] = &[17];

/// The application name of this build's connections: the schema version it knows, by which a later
/// build's `db setup` tells servers of older builds (which all named themselves `protean-host`).
pub(crate) fn application_name() -> String {
    format!("protean-host (schema {})", latest())
}

/// The schema version a connection's application name says its server knows; None for another client.
fn schema_of(application_name: &str) -> Option<i32> {
    // Every build before migration 17 named its connections plainly.
    if application_name == "protean-host" {
        return Some(16);
    }
    application_name
        .strip_prefix("protean-host (schema ")?
        .strip_suffix(')')?
        .parse()
        .ok()
}

/// The latest schema version this build knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Where a store's schema stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The highest applied version (0: never set up).
    pub version: i32,
    /// The migrations not applied yet.
    pub pending: Vec<Migration>,
}

impl Status {
    /// Whether every migration this build knows is applied.
    pub fn is_current(&self) -> bool {
        self.pending.is_empty()
    }
}

impl PartialEq for Migration {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
    }
}

impl Eq for Migration {}

pub(super) fn status(conn: &mut Conn) -> Result<Status> {
    let exists: bool = conn.query(sql::SCHEMA_EXISTS, &[])?[0].get(0);
    let applied: Vec<i32> = if exists {
        conn.query(sql::APPLIED_VERSIONS, &[])?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        Vec::new()
    };
    Ok(Status {
        version: applied.iter().copied().max().unwrap_or(0),
        pending: MIGRATIONS
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .copied()
            .collect(),
    })
}

/// Apply the pending migrations; returns those it applied (none when the store is current). `store`
/// names the store in errors.
pub(super) fn setup(conn: &mut Conn, store: &str) -> Result<Vec<Migration>> {
    conn.transaction(|c| {
        c.batch(sql::LOCK_MIGRATIONS)?;
        c.batch(sql::MIGRATIONS_TABLE)?;
        let pending = status(c)?.pending;
        refuse_under_older_servers(c, &pending, store)?;
        for migration in &pending {
            c.batch(migration.sql)?;
            c.execute(sql::RECORD_VERSION, &[&migration.version, &migration.name])?;
        }
        Ok(pending)
    })
}

/// Refuse when a pending migration needs older servers stopped and one is connected.
fn refuse_under_older_servers(c: &mut Conn, pending: &[Migration], store: &str) -> Result<()> {
    let Some(migration) = pending
        .iter()
        .find(|m| OLDER_SERVERS_STOPPED_FIRST.contains(&m.version))
    else {
        return Ok(());
    };
    let older: Vec<String> = c
        .query(sql::SERVERS_CONNECTED, &[])?
        .iter()
        .filter(|r| schema_of(r.get(1)).is_some_and(|known| known < migration.version))
        .map(|r| {
            format!(
                "process {} from {}",
                r.get::<_, i32>(0),
                r.get::<_, &str>(2)
            )
        })
        .collect();
    if older.is_empty() {
        return Ok(());
    }
    Err(Error::OlderServersConnected {
        store: store.to_owned(),
        migration: migration.version,
        connected: older.join(", "),
    })
}
