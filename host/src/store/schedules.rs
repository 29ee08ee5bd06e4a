//! The schedules a store keeps: messages to append when their time comes, unless cancelled first.
//!
//! Invariants, the same in every backend:
//! - a key names one schedule; setting it again (in a unit's [`ScheduleWrite::Set`]) replaces it
//!   whatever its state, with a new id, pending again;
//! - a schedule leaves `pending` once, to `fired` or to `cancelled`, never both: a firing unit
//!   ([`crate::unit_of_work::UnitOfWork::fired`]) is refused whole unless each schedule it fires is still
//!   pending with the id it read ([`super::Error::NotPending`]), and a cancel touches only a pending one;
//! - the fired message keeps the schedule's id, so even a second append of it would be refused;
//! - settled schedules are kept for `server.scheduler.keep_settled_hours`, then pruned: only a
//!   pending schedule can fire, so forgetting a settled one changes nothing but what `list` shows.
//!
//! Times are milliseconds since the Unix epoch on the engine's clock ([`crate::clock::Clock`]).

use serde::Serialize;

use super::Result;
use crate::unit_of_work::NewMessage;

/// Where a schedule is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleState {
    Pending,
    Fired,
    Cancelled,
}

impl ScheduleState {
    /// Its name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Fired => "fired",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state stored as `name`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "pending" => Some(Self::Pending),
            "fired" => Some(Self::Fired),
            "cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }
}

/// One schedule as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Schedule {
    pub key: String,
    /// The id of the message it appends (and of this schedule: setting the key again changes it).
    pub id: String,
    pub due_ms: i64,
    pub stream: String,
    pub message_type: String,
    /// JSON text of the message's `data`.
    pub data: String,
    /// JSON text of the message's `metadata`, as written when it was scheduled.
    pub metadata: String,
    pub state: ScheduleState,
    /// When it was fired or cancelled.
    pub settled_ms: Option<i64>,
}

impl Schedule {
    /// The message it appends when fired at `now`: its id, data and metadata as scheduled, its time (and
    /// `headers.time`) the firing's.
    pub fn message(&self, now: chrono::DateTime<chrono::Utc>) -> NewMessage {
        NewMessage {
            id: self.id.clone(),
            stream: self.stream.clone(),
            message_type: self.message_type.clone(),
            time: String::new(),
            data: self.data.clone(),
            metadata: self.metadata.clone(),
            expected_version: None,
        }
        .at(now)
    }
}

/// A change to the schedules, made by a handler's unit of work, in the order the handler made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleWrite {
    /// Schedule `message` for `due_ms` under `key`, replacing what the key named.
    Set {
        key: String,
        due_ms: i64,
        message: NewMessage,
    },
    /// Cancel the pending schedule of `key`, if there is one (a fired one stays fired).
    Cancel { key: String, at_ms: i64 },
}

/// "This pending schedule fired now": its message is among the unit's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredSchedule {
    pub key: String,
    /// The id read with it: a schedule replaced since is a new one, not this.
    pub id: String,
    pub at_ms: i64,
}

/// Which schedules to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleQuery {
    /// Only those in this state; all when none.
    pub state: Option<ScheduleState>,
    pub limit: usize,
}

/// How many schedules wait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ScheduleCounts {
    pub pending: u64,
    /// Pending ones due before the time asked about: late.
    pub overdue: u64,
}

/// What a store answers about its schedules (they change only through units of work).
pub trait Schedules: Send + Sync {
    /// Pending schedules due at `now_ms` or before, earliest first, at most `limit`.
    fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<Schedule>>;

    /// When the earliest pending schedule is due.
    fn next_due(&self) -> Result<Option<i64>>;

    /// Schedules matching `query`, by due time.
    fn list(&self, query: &ScheduleQuery) -> Result<Vec<Schedule>>;

    /// The schedule of `key`.
    fn get(&self, key: &str) -> Result<Option<Schedule>>;

    /// Pending schedules, and those of them due before `overdue_before_ms`.
    fn counts(&self, overdue_before_ms: i64) -> Result<ScheduleCounts>;

    /// Delete up to `limit` schedules fired or cancelled before `settled_before_ms`; how many. A
    /// pending one is never deleted; a deleted one is only gone from `list` and `get`.
    fn prune(&self, settled_before_ms: i64, limit: usize) -> Result<u64>;
}
