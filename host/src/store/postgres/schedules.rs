//! The schedules of the PostgreSQL store, shared by every replica.
//!
//! Exactly once across replicas rests on row locks under READ COMMITTED: a firing is a conditional
//! update (still pending with the id read), so a replica firing a schedule another one fires, cancels
//! or sets again waits for that transaction and then finds the row changed: it changes nothing, and its
//! whole unit (with the message) is refused. A cancel waits for a firing the same way and then finds
//! nothing pending to cancel.
//!
//! A unit's schedule statements come before its appends, so every transaction takes schedule rows
//! before the store-wide append lock; keys go in sorted, so units touching the same rows tend to lock
//! them in one order.

use std::collections::{BTreeMap, HashSet};

use postgres::Row;

use super::{pool::Conn, sql, PostgresStore};
use crate::{
    store::{
        schedules::ScheduleWrite, Error, Result, Schedule, ScheduleCounts, ScheduleQuery,
        ScheduleState, Schedules,
    },
    unit_of_work::{NewMessage, UnitOfWork},
};

/// Fire the unit's schedules, refusing it unless each is still pending with the id read, then apply
/// its schedule writes. Nothing (not a round trip) for a unit without either.
pub(super) fn apply(c: &mut Conn, unit: &UnitOfWork) -> Result<()> {
    fire(c, unit)?;
    if unit.schedules.is_empty() {
        return Ok(());
    }
    let (sets, cancels): (Vec<_>, Vec<_>) = net(&unit.schedules)
        .into_iter()
        .partition(|(_, change)| matches!(change, Net::Set { .. }));
    if !sets.is_empty() {
        set(c, &sets)?;
    }
    if !cancels.is_empty() {
        let (keys, times): (Vec<&str>, Vec<i64>) = cancels
            .iter()
            .filter_map(|(key, change)| match change {
                Net::Cancel { at_ms } => Some((*key, *at_ms)),
                Net::Set { .. } => None,
            })
            .unzip();
        c.execute(sql::SCHEDULES_CANCEL, &[&keys, &times])?;
    }
    Ok(())
}

/// Mark the unit's fired schedules fired, in one statement; refuse the unit when one was not pending
/// with its id (or is named twice).
fn fire(c: &mut Conn, unit: &UnitOfWork) -> Result<()> {
    if unit.fired.is_empty() {
        return Ok(());
    }
    let mut fired: Vec<_> = unit.fired.iter().collect();
    fired.sort_by(|a, b| a.key.cmp(&b.key));
    let keys: Vec<&str> = fired.iter().map(|f| f.key.as_str()).collect();
    let ids: Vec<&str> = fired.iter().map(|f| f.id.as_str()).collect();
    let times: Vec<i64> = fired.iter().map(|f| f.at_ms).collect();
    let rows = c.query(sql::SCHEDULES_FIRE, &[&keys, &ids, &times])?;
    let mut changed: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    match unit.fired.iter().find(|f| !changed.remove(&f.key)) {
        Some(stale) => Err(Error::NotPending {
            key: stale.key.clone(),
        }),
        None => Ok(()),
    }
}

/// Write the schedules set by the unit, each as its writes leave it.
fn set(c: &mut Conn, sets: &[(&str, Net<'_>)]) -> Result<()> {
    let mut columns = SetColumns::default();
    for (key, change) in sets {
        if let Net::Set {
            due_ms,
            message,
            cancelled,
        } = change
        {
            columns.push(key, *due_ms, message, *cancelled);
        }
    }
    let SetColumns {
        keys,
        ids,
        due,
        streams,
        types,
        data,
        metadata,
        states,
        settled,
    } = &columns;
    c.execute(
        sql::SCHEDULES_SET,
        &[
            keys, ids, due, streams, types, data, metadata, states, settled,
        ],
    )?;
    Ok(())
}

/// The rows of one set statement, column by column.
#[derive(Default)]
struct SetColumns<'u> {
    keys: Vec<&'u str>,
    ids: Vec<&'u str>,
    due: Vec<i64>,
    streams: Vec<&'u str>,
    types: Vec<&'u str>,
    data: Vec<&'u str>,
    metadata: Vec<&'u str>,
    states: Vec<&'static str>,
    settled: Vec<Option<i64>>,
}

impl<'u> SetColumns<'u> {
    fn push(&mut self, key: &'u str, due_ms: i64, m: &'u NewMessage, cancelled: Option<i64>) {
        let state = match cancelled {
            Some(_) => ScheduleState::Cancelled,
            None => ScheduleState::Pending,
        };
        self.keys.push(key);
        self.ids.push(&m.id);
        self.due.push(due_ms);
        self.streams.push(&m.stream);
        self.types.push(&m.message_type);
        self.data.push(&m.data);
        self.metadata.push(&m.metadata);
        self.states.push(state.as_str());
        self.settled.push(cancelled);
    }
}

/// What a unit's writes leave of one key, so that each key is one row of one statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net<'u> {
    /// Set by its last `Set`, and cancelled at that time if a `Cancel` followed it.
    Set {
        due_ms: i64,
        message: &'u NewMessage,
        cancelled: Option<i64>,
    },
    /// Only cancelled: by the first cancel (a later one finds nothing pending), if the stored schedule
    /// is pending.
    Cancel { at_ms: i64 },
}

/// The net change of `writes`, applied in order, per key, by key.
fn net(writes: &[ScheduleWrite]) -> BTreeMap<&str, Net<'_>> {
    let mut changes: BTreeMap<&str, Net<'_>> = BTreeMap::new();
    for write in writes {
        match write {
            ScheduleWrite::Set {
                key,
                due_ms,
                message,
            } => {
                let set = Net::Set {
                    due_ms: *due_ms,
                    message,
                    cancelled: None,
                };
                changes.insert(key, set);
            }
            ScheduleWrite::Cancel { key, at_ms } => match changes.get_mut(key.as_str()) {
                Some(Net::Set { cancelled, .. }) => {
                    cancelled.get_or_insert(*at_ms);
                }
                Some(Net::Cancel { .. }) => {}
                None => {
                    changes.insert(key, Net::Cancel { at_ms: *at_ms });
                }
            },
        }
    }
    changes
}

fn schedule(row: &Row) -> Result<Schedule> {
    let state: String = row.get(7);
    Ok(Schedule {
        key: row.get(0),
        id: row.get(1),
        due_ms: row.get(2),
        stream: row.get(3),
        message_type: row.get(4),
        data: row.get(5),
        metadata: row.get(6),
        state: ScheduleState::parse(&state)
            .ok_or_else(|| Error::Corrupt(format!("unknown schedule state {state:?}")))?,
        settled_ms: row.get(8),
    })
}

fn limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl Schedules for PostgresStore {
    fn due(&self, now_ms: i64, max: usize) -> Result<Vec<Schedule>> {
        let rows = self
            .conn()?
            .query(sql::SCHEDULES_DUE, &[&now_ms, &limit(max)])?;
        rows.iter().map(schedule).collect()
    }

    fn next_due(&self) -> Result<Option<i64>> {
        let row = self.conn()?.query_opt(sql::SCHEDULES_NEXT_DUE, &[])?;
        Ok(row.and_then(|r| r.get(0)))
    }

    fn list(&self, query: &ScheduleQuery) -> Result<Vec<Schedule>> {
        let state = query.state.map(ScheduleState::as_str);
        let rows = self
            .conn()?
            .query(sql::SCHEDULES_LIST, &[&state, &limit(query.limit)])?;
        rows.iter().map(schedule).collect()
    }

    fn get(&self, key: &str) -> Result<Option<Schedule>> {
        let row = self.conn()?.query_opt(sql::SCHEDULE_GET, &[&key])?;
        row.as_ref().map(schedule).transpose()
    }

    fn prune(&self, settled_before_ms: i64, max: usize) -> Result<u64> {
        let deleted = self
            .conn()?
            .execute(sql::SCHEDULES_PRUNE, &[&settled_before_ms, &limit(max)])?;
        Ok(deleted)
    }

    fn counts(&self, overdue_before_ms: i64) -> Result<ScheduleCounts> {
        let row = self
            .conn()?
            .query_opt(sql::SCHEDULES_COUNTS, &[&overdue_before_ms])?
            .ok_or_else(|| Error::Corrupt("counting schedules answered no row".into()))?;
        Ok(ScheduleCounts {
            pending: row.get::<_, i64>(0) as u64,
            overdue: row.get::<_, i64>(1) as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{net, Net};
    use crate::{message::Kind, store::schedules::ScheduleWrite, unit_of_work::NewMessage};

    fn set(key: &str) -> ScheduleWrite {
        let message = NewMessage::from_json(Kind::Event, "s-1", "T.A.v1", "{}", None, None);
        ScheduleWrite::Set {
            key: key.into(),
            due_ms: 5,
            message: message.unwrap(),
        }
    }

    fn cancel(key: &str, at_ms: i64) -> ScheduleWrite {
        ScheduleWrite::Cancel {
            key: key.into(),
            at_ms,
        }
    }

    /// The writes of one key collapse to what applying them in order leaves; keys come out sorted.
    #[test]
    fn writes_collapse_per_key_as_applied_in_order() {
        let writes = [
            cancel("c", 1),
            set("b"),
            cancel("b", 2),
            cancel("b", 3),
            cancel("a", 4),
            set("a"),
            cancel("c", 5),
        ];
        let net = net(&writes);
        assert_eq!(net.keys().copied().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(matches!(
            net["a"],
            Net::Set {
                cancelled: None,
                ..
            }
        ));
        assert!(matches!(
            net["b"],
            Net::Set {
                cancelled: Some(2),
                ..
            }
        ));
        assert_eq!(net["c"], Net::Cancel { at_ms: 1 });
    }
}
