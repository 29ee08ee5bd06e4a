//! The schedules of the SQLite store: written in a unit's transaction, which holds the write lock, so
//! a firing's check and its effect cannot be split by another writer (a replica sharing the file).

use rusqlite::{params, types::Type, OptionalExtension, Row, Transaction};

use super::{CommitError, SqliteStore};
use crate::{
    store::{
        schedules::ScheduleWrite, Error, Result, Schedule, ScheduleCounts, ScheduleQuery,
        ScheduleState, Schedules,
    },
    unit_of_work::UnitOfWork,
};

mod sql {
    pub(super) const FIRE: &str = include_str!("../sql/sqlite/schedule_fire.sql");
    pub(super) const SET: &str = include_str!("../sql/sqlite/schedule_set.sql");
    pub(super) const CANCEL: &str = include_str!("../sql/sqlite/schedule_cancel.sql");
    pub(super) const DUE: &str = include_str!("../sql/sqlite/schedules_due.sql");
    pub(super) const NEXT_DUE: &str = include_str!("../sql/sqlite/schedules_next_due.sql");
    pub(super) const LIST: &str = include_str!("../sql/sqlite/schedules_list.sql");
    pub(super) const GET: &str = include_str!("../sql/sqlite/schedule_get.sql");
    pub(super) const COUNTS: &str = include_str!("../sql/sqlite/schedules_counts.sql");
    pub(super) const PRUNE: &str = include_str!("../sql/sqlite/schedules_prune.sql");
}

/// Fire the unit's schedules, refusing it unless each is still pending with the id read, then apply its
/// schedule writes in order. Before the appends: a second firing is refused as such, not as a duplicate
/// message.
pub(super) fn apply(tx: &Transaction<'_>, unit: &UnitOfWork) -> Result<(), CommitError> {
    for fired in &unit.fired {
        let changed =
            tx.prepare_cached(sql::FIRE)?
                .execute(params![fired.key, fired.id, fired.at_ms])?;
        if changed == 0 {
            return Err(Error::NotPending {
                key: fired.key.clone(),
            }
            .into());
        }
    }
    for write in &unit.schedules {
        match write {
            ScheduleWrite::Set {
                key,
                due_ms,
                message: m,
            } => tx.prepare_cached(sql::SET)?.execute(params![
                key,
                m.id,
                due_ms,
                m.stream,
                m.message_type,
                m.data,
                m.metadata
            ])?,
            ScheduleWrite::Cancel { key, at_ms } => tx
                .prepare_cached(sql::CANCEL)?
                .execute(params![key, at_ms])?,
        };
    }
    Ok(())
}

fn schedule(r: &Row<'_>) -> rusqlite::Result<Schedule> {
    let state: String = r.get(7)?;
    let state = ScheduleState::parse(&state).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            7,
            Type::Text,
            format!("unknown schedule state {state:?}").into(),
        )
    })?;
    Ok(Schedule {
        key: r.get(0)?,
        id: r.get(1)?,
        due_ms: r.get(2)?,
        stream: r.get(3)?,
        message_type: r.get(4)?,
        data: r.get(5)?,
        metadata: r.get(6)?,
        state,
        settled_ms: r.get(8)?,
    })
}

fn limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl Schedules for SqliteStore {
    fn due(&self, now_ms: i64, max: usize) -> Result<Vec<Schedule>> {
        self.query_rows(sql::DUE, params![now_ms, limit(max)], schedule)
    }

    fn next_due(&self) -> Result<Option<i64>> {
        let connection = self.reader()?;
        connection
            .prepare_cached(sql::NEXT_DUE)
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(|e| self.error(e))
    }

    fn list(&self, query: &ScheduleQuery) -> Result<Vec<Schedule>> {
        let state = query.state.map(ScheduleState::as_str);
        self.query_rows(sql::LIST, params![state, limit(query.limit)], schedule)
    }

    fn get(&self, key: &str) -> Result<Option<Schedule>> {
        let connection = self.reader()?;
        connection
            .prepare_cached(sql::GET)
            .and_then(|mut s| s.query_row([key], schedule).optional())
            .map_err(|e| self.error(e))
    }

    fn prune(&self, settled_before_ms: i64, max: usize) -> Result<u64> {
        let deleted = self.write(|tx| {
            tx.prepare_cached(sql::PRUNE)?
                .execute(params![settled_before_ms, limit(max)])
        })?;
        Ok(deleted as u64)
    }

    fn counts(&self, overdue_before_ms: i64) -> Result<ScheduleCounts> {
        let connection = self.reader()?;
        connection
            .prepare_cached(sql::COUNTS)
            .and_then(|mut s| {
                s.query_row([overdue_before_ms], |r| {
                    Ok(ScheduleCounts {
                        pending: r.get(0)?,
                        overdue: r.get(1)?,
                    })
                })
            })
            .map_err(|e| self.error(e))
    }
}
