//! The scheduler and the virtual clock, through the whole engine in test mode on the memory store,
//! with a domain linked into this binary. Schedules are set by committing units directly, as a
//! handler's unit would set them.

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use chrono::{TimeZone, Utc};
use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Engine, EngineOptions, Outcome};
use crate::{
    clock::Clock,
    config::Config,
    message::Kind,
    plugin::Plugin,
    store::{schedules::ScheduleWrite, MemoryStore, ScheduleState, Store},
    unit_of_work::{NewMessage, UnitOfWork},
};

const DAY_MS: i64 = 86_400_000;

/// Where the virtual clocks here start.
fn start() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap()
}

#[derive(Debug, Default)]
struct Alarm;

impl Aggregate for Alarm {
    const CATEGORY: &'static str = "alarm";
    fn apply(&mut self, _: &Recorded) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Rings the alarm `id`; fails while `fail` says so.
#[derive(Debug, Serialize, Deserialize)]
struct Ring {
    id: String,
    fail: bool,
}

impl Message for Ring {
    const NAME: &'static str = "Ring";
}

impl Command for Ring {
    type Aggregate = Alarm;
    fn target_id(&self) -> String {
        self.id.clone()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Rang {
    id: String,
}

impl Message for Rang {
    const NAME: &'static str = "Rang";
}

impl Event for Rang {
    type Aggregate = Alarm;
}

fn ring(command: Ring, ctx: &mut Context) -> HandlerResult {
    if command.fail {
        return Err(HandlerError::retry(format!("{} cannot ring", command.id)));
    }
    ctx.raise(&command.id.clone(), &Rang { id: command.id })
}

fn alarms() -> Domain {
    Domain::new("Alarms").command_handler(
        CommandHandler::<Alarm>::new("ringer")
            .on(ring)
            .max_retries(2),
    )
}

fn engine(store: Arc<dyn Store>, clock: Clock, server: &str) -> Engine {
    let domain = Plugin::linked("alarms", alarms).unwrap();
    let toml = format!("[server]\ntest_mode_timeout_seconds = 60\n{server}");
    let config = Config::parse(&toml, Path::new("test.toml"), &BTreeMap::new()).unwrap();
    let options = EngineOptions {
        test_mode: true,
        config,
        clock,
    };
    Engine::with_handlers(Arc::new(domain), store, options).unwrap()
}

/// Schedule a `Ring` of alarm `id` under `key` for `due_ms`.
fn schedule(store: &dyn Store, key: &str, id: &str, due_ms: i64) {
    let ring = json!({ "id": id, "fail": false });
    let stream = format!("alarms::alarm:command-{id}");
    let message = NewMessage::new(
        Kind::Command,
        &stream,
        "Alarms.Ring.v1",
        &ring,
        None,
        None,
        None,
    );
    let set = ScheduleWrite::Set {
        key: key.to_owned(),
        due_ms,
        message,
    };
    commit_schedules(store, vec![set]);
}

fn commit_schedules(store: &dyn Store, schedules: Vec<ScheduleWrite>) {
    let unit = UnitOfWork {
        schedules,
        ..UnitOfWork::default()
    };
    store.commit(&unit).unwrap();
}

fn rang(store: &dyn Store, id: &str) -> usize {
    store
        .read_stream(&format!("alarms::alarm-{id}"), 0)
        .unwrap()
        .len()
}

#[test]
fn a_schedule_three_days_out_fires_once_in_virtual_time_and_the_run_says_how_far_the_clock_moved() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let due = start().timestamp_millis() + 3 * DAY_MS;
    schedule(store.as_ref(), "wake-a1", "a1", due);
    let report = engine(store.clone(), Clock::simulated(start()), "")
        .run()
        .unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    assert_eq!(rang(store.as_ref(), "a1"), 1);
    let fired = store.schedules().get("wake-a1").unwrap().unwrap();
    assert_eq!(
        (fired.state, fired.settled_ms),
        (ScheduleState::Fired, Some(due))
    );
    assert_eq!(
        report.virtual_elapsed,
        Some(Duration::from_millis(3 * DAY_MS as u64))
    );
    assert!(
        report.elapsed < Duration::from_secs(30),
        "{:?}",
        report.elapsed
    );
    let [command] = store
        .read_stream("alarms::alarm:command-a1", 0)
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(command.id, fired.id, "the message keeps the schedule's id");
    assert!(
        command.time.starts_with("2026-03-04T09:00:00"),
        "dated when it fired: {}",
        command.time
    );
}

#[test]
fn schedules_fire_in_due_order_across_days_and_a_cancelled_one_never_fires() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let at = |days: i64| start().timestamp_millis() + days * DAY_MS;
    schedule(store.as_ref(), "k30", "d30", at(30));
    schedule(store.as_ref(), "k2", "d2", at(2));
    schedule(store.as_ref(), "k7", "d7", at(7));
    commit_schedules(
        store.as_ref(),
        vec![ScheduleWrite::Cancel {
            key: "k7".into(),
            at_ms: at(0),
        }],
    );
    let report = engine(store.clone(), Clock::simulated(start()), "")
        .run()
        .unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    assert_eq!(
        (rang(store.as_ref(), "d2"), rang(store.as_ref(), "d30")),
        (1, 1)
    );
    assert_eq!(rang(store.as_ref(), "d7"), 0, "cancelled");
    let commands: Vec<String> = store
        .read_categories(&["alarms::alarm:command".into()], 0, 10)
        .unwrap()
        .into_iter()
        .map(|m| m.stream)
        .collect();
    assert_eq!(
        commands,
        ["alarms::alarm:command-d2", "alarms::alarm:command-d30"]
    );
    let cancelled = store.schedules().get("k7").unwrap().unwrap();
    assert_eq!(cancelled.state, ScheduleState::Cancelled);
    assert_eq!(
        report.virtual_elapsed,
        Some(Duration::from_millis(30 * DAY_MS as u64))
    );
}

#[test]
fn a_retry_waits_on_the_virtual_clock_so_an_hour_of_backoff_takes_no_real_time() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let engine = engine(
        store.clone(),
        Clock::simulated(start()),
        "retry_delay_ms = 3600000\nmax_retry_delay_ms = 3600000\n",
    );
    engine
        .send("Alarms.Ring.v1", &json!({ "id": "r1", "fail": true }), None)
        .unwrap();
    let report = engine.run().unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    let [dead] = store.dead_letters(None).unwrap().try_into().unwrap();
    assert_eq!(dead.attempts, 3, "tried, then retried twice");
    let waited = report.virtual_elapsed.unwrap();
    // Two retries of an hour each, ±20% jitter.
    assert!(
        waited >= Duration::from_secs(2 * 2880) && waited <= Duration::from_secs(2 * 4320),
        "{waited:?}"
    );
    assert!(
        report.elapsed < Duration::from_secs(30),
        "{:?}",
        report.elapsed
    );
}

#[test]
fn a_schedule_due_while_nothing_ran_fires_on_start_late_but_once() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let due = Utc::now().timestamp_millis() - 60_000;
    schedule(store.as_ref(), "overdue", "o1", due);
    let report = engine(store.clone(), Clock::system(), "").run().unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    assert_eq!(report.virtual_elapsed, None);
    let fired = store.schedules().get("overdue").unwrap().unwrap();
    assert_eq!(fired.state, ScheduleState::Fired);
    assert!(
        fired.settled_ms.unwrap() - due >= 60_000,
        "fired a minute late"
    );
    let again = engine(store.clone(), Clock::system(), "").run().unwrap();
    assert_eq!(again.outcome, Outcome::Quiescent);
    assert_eq!(
        rang(store.as_ref(), "o1"),
        1,
        "a second start fires nothing again"
    );
}

#[test]
fn on_the_system_clock_test_mode_leaves_a_future_schedule_pending() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    schedule(
        store.as_ref(),
        "later",
        "l1",
        Utc::now().timestamp_millis() + DAY_MS,
    );
    let report = engine(store.clone(), Clock::system(), "").run().unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    let pending = store.schedules().get("later").unwrap().unwrap();
    assert_eq!(pending.state, ScheduleState::Pending);
    assert_eq!(rang(store.as_ref(), "l1"), 0);
}

#[test]
fn settled_schedules_past_their_keeping_are_pruned_and_recent_ones_kept() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let now = start().timestamp_millis();
    for (key, settled) in [("old", now - 8 * DAY_MS), ("recent", now - DAY_MS)] {
        schedule(store.as_ref(), key, key, now + DAY_MS);
        let cancel = ScheduleWrite::Cancel {
            key: key.into(),
            at_ms: settled,
        };
        commit_schedules(store.as_ref(), vec![cancel]);
    }
    let report = engine(store.clone(), Clock::simulated(start()), "")
        .run()
        .unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    assert_eq!(
        store.schedules().get("old").unwrap(),
        None,
        "kept 7 days by default"
    );
    let recent = store.schedules().get("recent").unwrap().unwrap();
    assert_eq!(recent.state, ScheduleState::Cancelled);
}
