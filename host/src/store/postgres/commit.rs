//! A unit of work in one PostgreSQL transaction (the caller opens and ends it).
//!
//! Each step is one statement over arrays, not one per message, so a batch of a thousand events costs a
//! handful of round trips.

use postgres::error::SqlState;

use super::{pool::Conn, sql};
use crate::{
    store::{Error, Result},
    unit_of_work::{Parking, UnitOfWork},
};

/// Apply `unit`: its fences first, so a stale owner's unit is refused before anything is written; its
/// appends last, because they take the store-wide append lock, held until the commit: the less that
/// follows them, the sooner the next unit of another subscription can append.
pub(super) fn apply(c: &mut Conn, unit: &UnitOfWork) -> Result<Option<u64>> {
    raise_fences(c, unit)?;
    record_idempotency_key(c, unit)?;
    super::schedules::apply(c, unit)?;
    super::documents::write(c, &unit.documents)?;
    settle(c, unit)?;
    for d in &unit.dead_letters {
        c.execute(
            sql::INSERT_DEAD_LETTER,
            &[
                &d.subscription,
                &d.handler,
                &d.message_id,
                &d.stream,
                &(d.global_position as i64),
                &d.message_type,
                &d.data,
                &d.metadata,
                &d.error,
                &i64::from(d.attempts),
                &d.build_id,
                &d.failed_at,
            ],
        )?;
    }
    apply_parking(c, &unit.parking)?;
    append(c, unit)
}

/// The unit's markers, the call records it ends and its new position: one statement when it has
/// markers (insert_processed.sql), else a statement each. A marker committed before fails it
/// ([`refused_by_marker`]), and with it the unit's transaction.
fn settle(c: &mut Conn, unit: &UnitOfWork) -> Result<()> {
    let position = unit.position.as_ref();
    let (subscription, at) = (
        position.map(|p| p.subscription.as_str()),
        position.map(|p| p.position as i64),
    );
    let [subscriptions, ids, builds, ending, identities] = settling(unit);
    if unit.processed.is_empty() {
        if let (Some(subscription), Some(at)) = (subscription, at) {
            c.execute(sql::UPSERT_POSITION, &[&subscription, &at])?;
        }
        if !ending.is_empty() {
            c.execute(sql::END_CALLS, &[&ending, &identities])?;
        }
        return Ok(());
    }
    c.execute(
        sql::INSERT_PROCESSED,
        &[
            &subscriptions,
            &ids,
            &builds,
            &ending,
            &identities,
            &subscription,
            &at,
        ],
    )?;
    Ok(())
}

/// Whether `error` is a marker insert's refusal: a marker committed before, or one held twice. The
/// statement or transaction it failed is over when the caller names the marker ([`already_processed`]).
pub(super) fn refused_by_marker(error: &Error) -> bool {
    let Error::Postgres(source) = error else {
        return false;
    };
    source.as_db_error().is_some_and(|db| {
        db.code() == &SqlState::UNIQUE_VIOLATION && db.constraint() == Some("processed_pkey")
    })
}

/// A unit that only settles messages (processed markers, and the call records they end: its handlers
/// changed nothing) in one statement outside a transaction block: a statement is a transaction of its
/// own, so that is one round trip where BEGIN, the insert, the end of the calls and COMMIT were four,
/// on the way from a message to its handling. The statement inserts every marker or none: a marker
/// another consumer committed first fails it whole, and then ends no call.
pub(super) fn markers_alone(c: &mut Conn, unit: &UnitOfWork) -> Result<()> {
    c.execute(
        sql::INSERT_PROCESSED_ALL,
        &settling(unit).each_ref().map(as_sql),
    )?;
    Ok(())
}

/// The unit's processed markers as columns: subscription, message id, build id.
fn markers(unit: &UnitOfWork) -> [Vec<&str>; 3] {
    let column = |f: fn(&crate::unit_of_work::ProcessedMarker) -> &str| -> Vec<&str> {
        unit.processed.iter().map(f).collect()
    };
    [
        column(|m| &m.subscription),
        column(|m| &m.message_id),
        column(|m| &m.build_id),
    ]
}

/// The unit's markers as columns ([`markers`]), then the call records it ends: subscriptions, identities.
fn settling(unit: &UnitOfWork) -> [Vec<&str>; 5] {
    let [subscriptions, ids, builds] = markers(unit);
    let (ending, identities) = unit
        .ended_calls
        .iter()
        .map(|(s, i)| (s.as_str(), i.as_str()))
        .unzip();
    [subscriptions, ids, builds, ending, identities]
}

fn as_sql<'a>(column: &'a Vec<&str>) -> &'a (dyn postgres::types::ToSql + Sync) {
    column
}

/// Another consumer committed a marker of the unit first, or the unit holds one twice: the first such,
/// looked up outside the refused unit's transaction (a round trip on this rare path only). If the
/// lookup fails, the refusal still says which batch it was.
pub(super) fn already_processed(c: &mut Conn, unit: &UnitOfWork) -> Error {
    let [subscriptions, ids, _] = markers(unit);
    let found = c
        .query(sql::MARKED_BEFORE, &[&subscriptions, &ids])
        .ok()
        .and_then(|rows| rows.first().map(|row| row.get::<_, String>(0)));
    let first = &unit.processed[0];
    let message_id = found.unwrap_or_else(|| {
        format!(
            "{} (or another of the {} in this batch)",
            first.message_id,
            unit.processed.len()
        )
    });
    Error::AlreadyProcessed {
        subscription: first.subscription.clone(),
        message_id,
    }
}

/// Park, hold, settle and unpark, in that order: a key parked by this unit holds its later messages.
fn apply_parking(c: &mut Conn, parking: &Parking) -> Result<()> {
    if parking.is_empty() {
        return Ok(());
    }
    let subscription = &parking.subscription;
    let columns = |pairs: &[(String, u64)]| -> (Vec<String>, Vec<i64>) {
        pairs.iter().map(|(k, p)| (k.clone(), *p as i64)).unzip()
    };
    if !parking.park.is_empty() {
        let (keys, positions) = columns(&parking.park);
        c.execute(sql::PARK_KEY, &[subscription, &keys, &positions])?;
    }
    if !parking.hold.is_empty() {
        let (keys, positions) = columns(&parking.hold);
        let unparked = c.query(sql::HOLD_MESSAGES, &[subscription, &keys, &positions])?;
        if let Some(row) = unparked.first() {
            return Err(Error::NotParked {
                subscription: subscription.clone(),
                key: row.get(0),
            });
        }
    }
    if !parking.settle.is_empty() {
        let (keys, positions) = columns(&parking.settle);
        c.execute(sql::SETTLE_HELD, &[subscription, &keys, &positions])?;
    }
    if !parking.unpark.is_empty() {
        c.execute(sql::UNPARK_KEYS, &[subscription, &parking.unpark])?;
    }
    Ok(())
}

/// Record the unit's idempotency key, refusing the unit when the key was committed before. Before the
/// appends, so a retry waits here for an attempt still in flight rather than appending beside it.
fn record_idempotency_key(c: &mut Conn, unit: &UnitOfWork) -> Result<()> {
    let Some(key) = &unit.idempotency_key else {
        return Ok(());
    };
    if c.execute(sql::INSERT_IDEMPOTENCY_KEY, &[&key.key, &key.message_id])? == 0 {
        let message_id: String = c
            .query_opt(sql::READ_IDEMPOTENCY_KEY, &[&key.key])?
            .ok_or_else(|| Error::Corrupt(format!("idempotency key {} vanished", key.key)))?
            .get(0);
        return Err(Error::AlreadyCommitted {
            key: key.key.clone(),
            message_id,
        });
    }
    Ok(())
}

/// Check every fence of the unit, raising it for a new owner, and refuse the unit when a newer owner's
/// token is recorded for a name. Before the appends, so a stale owner's unit fails before it takes the
/// append lock. The common case, the same owner committing again, only reads (under a share lock).
fn raise_fences(c: &mut Conn, unit: &UnitOfWork) -> Result<()> {
    for fence in &unit.fences {
        let (name, token) = (fence.owned.key(), fence.token as i64);
        let recorded: Option<i64> = c
            .query_opt(sql::FENCE_SHARE, &[&name])?
            .map(|row| row.get(0));
        let current = match recorded {
            Some(current) if current == token => continue,
            Some(current) if current > token => current,
            _ if c.execute(sql::FENCE_RAISE, &[&name, &token])? > 0 => continue,
            // Raised meanwhile by a newer owner; the row is locked by this transaction now.
            _ => c
                .query_opt(sql::FENCE_CURRENT, &[&name])?
                .ok_or_else(|| Error::Corrupt(format!("fence {name} vanished")))?
                .get(0),
        };
        return Err(Error::Fenced {
            owned: fence.owned.clone(),
            token: fence.token,
            current: current as u64,
        });
    }
    Ok(())
}

/// Append the unit's messages after checking every expected version (which chain within the unit);
/// returns the last global position. One statement (migration 16): it takes the append locks, so
/// every round trip after it waits for every other appender of the store until the COMMIT.
fn append(c: &mut Conn, unit: &UnitOfWork) -> Result<Option<u64>> {
    let messages = &unit.messages;
    if messages.is_empty() {
        return Ok(None);
    }
    let column = |f: fn(&crate::unit_of_work::NewMessage) -> &str| -> Vec<&str> {
        messages.iter().map(f).collect()
    };
    let expected: Vec<Option<i64>> = messages.iter().map(|m| m.expected_version).collect();
    let row = c
        .query_opt(
            sql::APPEND_UNIT,
            &[
                &column(|m| &m.id),
                &column(|m| &m.stream),
                &expected,
                &column(|m| &m.message_type),
                &column(|m| &m.data),
                &column(|m| &m.metadata),
                &column(|m| &m.time),
                &unit.publish,
            ],
        )
        .map_err(|error| unique_violation(error, unit))?
        .ok_or_else(|| Error::Corrupt("protean.append_unit returned no row".into()))?;
    let Some(global) = row.get::<_, Option<Vec<i64>>>(0) else {
        return Err(Error::VersionConflict {
            stream: row.get(1),
            expected: row.get(2),
            actual: row.get(3),
        });
    };
    Ok(global.last().map(|g| *g as u64))
}

/// A failed insert: a duplicate id is the caller's; a duplicate stream position means a writer that
/// skipped the category lock got there first (a version conflict).
fn unique_violation(error: Error, unit: &UnitOfWork) -> Error {
    let Error::Postgres(source) = &error else {
        return error;
    };
    let Some(db) = source
        .as_db_error()
        .filter(|d| d.code() == &SqlState::UNIQUE_VIOLATION)
    else {
        return error;
    };
    let detail = db.detail().unwrap_or_default();
    if db.constraint() == Some("messages_id") {
        let id = unit
            .messages
            .iter()
            .find(|m| detail.contains(&m.id))
            .map_or_else(|| detail.to_owned(), |m| m.id.clone());
        return Error::DuplicateMessage(id);
    }
    let stream = unit
        .messages
        .iter()
        .find(|m| detail.contains(&m.stream))
        .map_or_else(String::new, |m| m.stream.clone());
    Error::VersionConflict {
        stream,
        expected: -1,
        actual: -1,
    }
}
