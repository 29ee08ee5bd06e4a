//! What `protean-host schedules` shows and does: schedules listed and inspected as operators read them
//! (times in RFC 3339 and relative to now, data and metadata as JSON), and cancelled by key.
//!
//! A cancel is the one write here: a unit of work with one [`ScheduleWrite::Cancel`], which the store
//! applies only to a pending schedule, so it can never undo a firing that won the race; the schedule is
//! read back after the commit to say which of the two happened.

use std::fmt::Write as _;

use chrono::{SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use serde_json::Value;

use super::status::schedules_line;
use crate::{
    store::{self, Schedule, ScheduleCounts, ScheduleState, Store},
    unit_of_work::{ScheduleWrite, UnitOfWork},
};

/// One schedule as `list --json` and `inspect` show it: everything stored, its data and metadata as
/// JSON rather than JSON text, its times also in RFC 3339.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduleView {
    pub key: String,
    pub id: String,
    pub state: ScheduleState,
    pub due: String,
    pub due_ms: i64,
    pub stream: String,
    pub message_type: String,
    pub data: Value,
    pub metadata: Value,
    /// When it fired or was cancelled.
    pub settled: Option<String>,
    pub settled_ms: Option<i64>,
}

impl From<&Schedule> for ScheduleView {
    fn from(s: &Schedule) -> Self {
        Self {
            key: s.key.clone(),
            id: s.id.clone(),
            state: s.state,
            due: time(s.due_ms),
            due_ms: s.due_ms,
            stream: s.stream.clone(),
            message_type: s.message_type.clone(),
            data: json(&s.data),
            metadata: json(&s.metadata),
            settled: s.settled_ms.map(time),
            settled_ms: s.settled_ms,
        }
    }
}

/// Stored JSON text as JSON; text that is not JSON (written by another tool) as the string it is.
fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// `2026-12-02T15:00:00.000Z`.
pub fn time(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms).single().map_or_else(
        || format!("{ms} ms since the epoch"),
        |t| t.to_rfc3339_opts(SecondsFormat::Millis, true),
    )
}

/// `in 4.0 s`, `12.3 s ago`, `in 5 min`, `2.5 h ago`, `in 3.0 d`: how far `ms` is from `now_ms`.
pub fn relative(ms: i64, now_ms: i64) -> String {
    let distance = (ms - now_ms).unsigned_abs() as f64 / 1000.0;
    let amount = match distance {
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 2.0 * 3600.0 => format!("{:.0} min", s / 60.0),
        s if s < 48.0 * 3600.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} d", s / 86_400.0),
    };
    if ms >= now_ms {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// `schedules list` as text: one line each, then the counts (`overdue_after_ms`: what overdue means).
pub fn list_text(
    schedules: &[Schedule],
    counts: &ScheduleCounts,
    overdue_after_ms: u64,
    now_ms: i64,
) -> String {
    let mut out = format!(
        "{:<32} {:<9} {:<24} {:>12}  {:<30} type\n",
        "key", "state", "due", "", "stream"
    );
    for s in schedules {
        let _ = writeln!(
            out,
            "{:<32} {:<9} {:<24} {:>12}  {:<30} {}",
            s.key,
            s.state.as_str(),
            time(s.due_ms),
            relative(s.due_ms, now_ms),
            s.stream,
            s.message_type
        );
    }
    let _ = writeln!(
        out,
        "{} listed; {}",
        schedules.len(),
        schedules_line(counts, Some(overdue_after_ms))
    );
    out
}

/// `schedules inspect` as text: every field, data and metadata as indented JSON.
pub fn inspect_text(s: &Schedule, now_ms: i64) -> String {
    let view = ScheduleView::from(s);
    let settled = match (s.state, &view.settled) {
        (ScheduleState::Pending, _) | (_, None) => "-".to_owned(),
        (state, Some(at)) => format!("{} at {at}", state.as_str()),
    };
    let pretty = |v: &Value| {
        serde_json::to_string_pretty(v)
            .unwrap_or_default()
            .replace('\n', "\n  ")
    };
    format!(
        "key:      {}\nid:       {}\nstate:    {}\ndue:      {} ({})\nsettled:  {settled}\nstream:   {}\ntype:     {}\ndata:\n  {}\nmetadata:\n  {}\n",
        s.key,
        s.id,
        s.state.as_str(),
        view.due,
        relative(s.due_ms, now_ms),
        s.stream,
        s.message_type,
        pretty(&view.data),
        pretty(&view.metadata),
    )
}

/// What `schedules cancel` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    /// It was pending and is cancelled now (as read back).
    Cancelled(Schedule),
    /// It fired, before the cancel or racing it: its message was appended.
    AlreadyFired(Schedule),
    /// It was cancelled before.
    AlreadyCancelled(Schedule),
    /// Set again (by a handler) after the cancel: pending, as a new schedule.
    SetAgain(Schedule),
    /// No schedule has the key.
    NotFound,
}

/// Cancel the schedule of `key` at `now_ms` if it is pending, and say what became of it.
pub fn cancel(store: &dyn Store, key: &str, now_ms: i64) -> store::Result<Cancel> {
    let Some(before) = store.schedules().get(key)? else {
        return Ok(Cancel::NotFound);
    };
    if before.state != ScheduleState::Pending {
        // Nothing to cancel; committing anyway could cancel one set again since, unasked.
        return Ok(settled(before));
    }
    let unit = UnitOfWork {
        schedules: vec![ScheduleWrite::Cancel {
            key: key.to_owned(),
            at_ms: now_ms,
        }],
        ..UnitOfWork::default()
    };
    match store.commit(&unit) {
        // The read back says whether a commit whose answer was lost landed.
        Ok(_) | Err(store::Error::OutcomeUnknown { .. }) => {}
        Err(error) => return Err(error),
    }
    Ok(match store.schedules().get(key)? {
        None => Cancel::NotFound,
        Some(after) if after.state == ScheduleState::Pending => Cancel::SetAgain(after),
        Some(after) if after.state == ScheduleState::Cancelled => Cancel::Cancelled(after),
        Some(after) => settled(after),
    })
}

/// A schedule found already settled.
fn settled(schedule: Schedule) -> Cancel {
    match schedule.state {
        ScheduleState::Fired => Cancel::AlreadyFired(schedule),
        ScheduleState::Cancelled => Cancel::AlreadyCancelled(schedule),
        ScheduleState::Pending => Cancel::SetAgain(schedule),
    }
}

/// When a settled schedule fired or was cancelled, for messages.
pub fn settled_at(schedule: &Schedule) -> String {
    schedule
        .settled_ms
        .map_or_else(|| "an unrecorded time".to_owned(), time)
}

/// Units that set schedules, for tests of what reads them.
#[cfg(test)]
pub(crate) mod testing {
    use crate::{
        message::Kind,
        store::Store,
        unit_of_work::{NewMessage, ScheduleWrite, UnitOfWork},
    };

    /// Schedule a `Shop.Remind.v1` command to `shop::order:command` for `due_ms` under `key`.
    pub(crate) fn set(store: &dyn Store, key: &str, due_ms: i64) {
        let data = serde_json::json!({"order": key});
        let message = NewMessage::new(
            Kind::Command,
            "shop::order:command-1",
            "Shop.Remind.v1",
            &data,
            None,
            None,
            None,
        );
        let unit = UnitOfWork {
            schedules: vec![ScheduleWrite::Set {
                key: key.into(),
                due_ms,
                message,
            }],
            ..UnitOfWork::default()
        };
        store.commit(&unit).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::set, *};
    use crate::{
        store::{schedules::FiredSchedule, MemoryStore},
        unit_of_work::NewMessage,
    };

    const NOW: i64 = 1_800_000_000_000;

    /// Fire the schedule of `key` as the scheduler does: its message appended in the same unit.
    fn fire(store: &dyn Store, key: &str, at_ms: i64) {
        let schedule = store.schedules().get(key).unwrap().unwrap();
        let message: NewMessage = schedule.message(Utc.timestamp_millis_opt(at_ms).unwrap());
        let unit = UnitOfWork {
            messages: vec![message],
            fired: vec![FiredSchedule {
                key: key.into(),
                id: schedule.id,
                at_ms,
            }],
            ..UnitOfWork::default()
        };
        store.commit(&unit).unwrap();
    }

    #[test]
    fn a_pending_schedule_is_cancelled_and_a_second_cancel_finds_it_cancelled() {
        let store = MemoryStore::default();
        set(&store, "remind-1", NOW + 60_000);
        let Cancel::Cancelled(cancelled) = cancel(&store, "remind-1", NOW).unwrap() else {
            panic!("a pending schedule is cancelled");
        };
        assert_eq!(
            (cancelled.state, cancelled.settled_ms),
            (ScheduleState::Cancelled, Some(NOW))
        );
        let again = cancel(&store, "remind-1", NOW + 5).unwrap();
        assert_eq!(again, Cancel::AlreadyCancelled(cancelled));
        assert_eq!(store.schedules().due(NOW + 120_000, 10).unwrap(), []);
    }

    #[test]
    fn a_fired_schedule_stays_fired_and_a_missing_key_is_not_found() {
        let store = MemoryStore::default();
        set(&store, "remind-2", NOW - 1000);
        fire(&store, "remind-2", NOW - 500);
        let Cancel::AlreadyFired(fired) = cancel(&store, "remind-2", NOW).unwrap() else {
            panic!("a fired schedule cannot be cancelled");
        };
        assert_eq!(fired.settled_ms, Some(NOW - 500));
        assert_eq!(settled_at(&fired), "2027-01-15T07:59:59.500Z");
        assert_eq!(cancel(&store, "nope", NOW).unwrap(), Cancel::NotFound);
    }

    #[test]
    fn the_list_shows_each_schedule_and_the_counts() {
        let store = MemoryStore::default();
        set(&store, "late", NOW - 30_000);
        set(&store, "soon", NOW + 4_000);
        let rows = store
            .schedules()
            .list(&store::ScheduleQuery {
                state: None,
                limit: 10,
            })
            .unwrap();
        let counts = store.schedules().counts(NOW - 10_000).unwrap();
        let text = list_text(&rows, &counts, 10_000, NOW);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].starts_with("late "), "by due time: {text}");
        assert!(lines[1].contains(" pending "), "{text}");
        assert!(lines[1].contains("30.0 s ago"), "{text}");
        assert!(lines[2].contains("in 4.0 s"), "{text}");
        assert!(lines[2].contains("shop::order:command-1"), "{text}");
        assert!(lines[2].ends_with(" Shop.Remind.v1"), "{text}");
        assert_eq!(
            lines[3],
            "2 listed; schedules: 2 pending, 1 overdue (more than 10 s past due)"
        );
    }

    #[test]
    fn inspect_shows_everything_stored_with_data_and_metadata_as_json() {
        let store = MemoryStore::default();
        set(&store, "remind-3", NOW + 3 * 3_600_000);
        let schedule = store.schedules().get("remind-3").unwrap().unwrap();
        let text = inspect_text(&schedule, NOW);
        assert!(text.starts_with("key:      remind-3\n"), "{text}");
        assert!(
            text.contains(&format!("\nid:       {}\n", schedule.id)),
            "{text}"
        );
        assert!(text.contains("(in 3.0 h)\nsettled:  -\n"), "{text}");
        assert!(
            text.contains("data:\n  {\n    \"order\": \"remind-3\"\n  }\n"),
            "{text}"
        );
        let view = serde_json::to_value(ScheduleView::from(&schedule)).unwrap();
        assert_eq!(view["data"]["order"], "remind-3");
        assert_eq!(view["state"], "pending");
        assert_eq!(view["due_ms"], NOW + 3 * 3_600_000);
        assert!(view["metadata"].is_object(), "{view}");
        assert_eq!(view["settled"], Value::Null);
    }

    #[test]
    fn times_read_both_ways_from_now() {
        assert_eq!(relative(NOW + 4_000, NOW), "in 4.0 s");
        assert_eq!(relative(NOW - 12_300, NOW), "12.3 s ago");
        assert_eq!(relative(NOW + 300_000, NOW), "in 5 min");
        assert_eq!(relative(NOW - 9_000_000, NOW), "2.5 h ago");
        assert_eq!(relative(NOW + 3 * 86_400_000, NOW), "in 3.0 d");
        assert_eq!(time(0), "1970-01-01T00:00:00.000Z");
    }
}
