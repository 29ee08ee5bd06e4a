//! The schedules conformance suite: the invariants of [`crate::store::schedules`], for every backend.

use std::collections::HashMap;

use serde_json::json;

use crate::{
    message::Kind,
    store::{
        schedules::{FiredSchedule, ScheduleWrite},
        Error, Schedule, ScheduleCounts, ScheduleQuery, ScheduleState, Store,
    },
    unit_of_work::{NewMessage, PositionUpdate, UnitOfWork},
};

fn message(stream: &str, n: u64) -> NewMessage {
    let data = json!({ "n": n });
    NewMessage::new(
        Kind::Command,
        stream,
        "Shop.Remind.v1",
        &data,
        None,
        None,
        None,
    )
}

fn set(key: &str, due_ms: i64, stream: &str) -> ScheduleWrite {
    ScheduleWrite::Set {
        key: key.into(),
        due_ms,
        message: message(stream, due_ms as u64),
    }
}

fn cancel(key: &str, at_ms: i64) -> ScheduleWrite {
    ScheduleWrite::Cancel {
        key: key.into(),
        at_ms,
    }
}

fn write(store: &dyn Store, schedules: Vec<ScheduleWrite>) {
    store
        .commit(&UnitOfWork {
            schedules,
            ..UnitOfWork::default()
        })
        .unwrap();
}

/// The unit that fires `schedules` at `at_ms`: their messages, and each as fired.
fn firing(schedules: &[&Schedule], at_ms: i64) -> UnitOfWork {
    let now = chrono::DateTime::from_timestamp_millis(at_ms).unwrap();
    UnitOfWork {
        messages: schedules.iter().map(|s| s.message(now)).collect(),
        fired: schedules
            .iter()
            .map(|s| FiredSchedule {
                key: s.key.clone(),
                id: s.id.clone(),
                at_ms,
            })
            .collect(),
        ..UnitOfWork::default()
    }
}

fn fire(store: &dyn Store, schedule: &Schedule, at_ms: i64) -> Result<Option<u64>, Error> {
    store.commit(&firing(&[schedule], at_ms))
}

fn get(store: &dyn Store, key: &str) -> Schedule {
    store.schedules().get(key).unwrap().expect("a schedule")
}

fn keys(schedules: &[Schedule]) -> Vec<&str> {
    schedules.iter().map(|s| s.key.as_str()).collect()
}

/// The ids of the messages of `stream`.
fn ids(store: &dyn Store, stream: &str) -> Vec<String> {
    let messages = store.read_stream(stream, 0).unwrap();
    messages.into_iter().map(|m| m.id).collect()
}

fn is_not_pending(result: &Result<Option<u64>, Error>, key: &str) -> bool {
    matches!(result, Err(Error::NotPending { key: k }) if k == key)
}

/// Pending schedules are due earliest first (then by key), listed by due time, counted, and late ones
/// counted as overdue.
pub(crate) fn schedules_are_due_in_order_and_counted(store: &dyn Store) {
    let schedules = store.schedules();
    assert_eq!(schedules.next_due().unwrap(), None);
    assert_eq!(schedules.counts(0).unwrap(), ScheduleCounts::default());
    write(
        store,
        vec![
            set("c", 300, "shop::order-3"),
            set("b", 100, "shop::order-2"),
            set("a", 100, "shop::order-1"),
            set("d", 400, "shop::order-4"),
        ],
    );
    assert_eq!(keys(&schedules.due(99, 10).unwrap()), Vec::<&str>::new());
    assert_eq!(keys(&schedules.due(100, 10).unwrap()), ["a", "b"]);
    assert_eq!(keys(&schedules.due(300, 10).unwrap()), ["a", "b", "c"]);
    assert_eq!(keys(&schedules.due(1000, 2).unwrap()), ["a", "b"]);
    assert_eq!(schedules.next_due().unwrap(), Some(100));
    let a = get(store, "a");
    assert_eq!(
        (a.due_ms, a.stream.as_str(), a.state, a.settled_ms),
        (100, "shop::order-1", ScheduleState::Pending, None)
    );
    assert_eq!(a.message_type, "Shop.Remind.v1");
    assert_eq!(schedules.get("zz").unwrap(), None);
    write(store, vec![cancel("b", 150)]);
    fire(store, &a, 160).unwrap();
    assert_eq!(schedules.next_due().unwrap(), Some(300));
    assert_eq!(keys(&schedules.due(1000, 10).unwrap()), ["c", "d"]);
    let all = ScheduleQuery {
        state: None,
        limit: 10,
    };
    assert_eq!(keys(&schedules.list(&all).unwrap()), ["a", "b", "c", "d"]);
    let only = |state| ScheduleQuery {
        state: Some(state),
        limit: 10,
    };
    let pending = schedules.list(&only(ScheduleState::Pending)).unwrap();
    assert_eq!(keys(&pending), ["c", "d"]);
    let cancelled = schedules.list(&only(ScheduleState::Cancelled)).unwrap();
    assert_eq!(keys(&cancelled), ["b"]);
    let fired = schedules.list(&only(ScheduleState::Fired)).unwrap();
    assert_eq!(keys(&fired), ["a"]);
    let first = ScheduleQuery {
        state: None,
        limit: 1,
    };
    assert_eq!(keys(&schedules.list(&first).unwrap()), ["a"]);
    let counts = |before| schedules.counts(before).unwrap();
    assert_eq!(
        counts(300),
        ScheduleCounts {
            pending: 2,
            overdue: 0
        },
        "due at 300 is not late before 300"
    );
    assert_eq!(
        counts(301),
        ScheduleCounts {
            pending: 2,
            overdue: 1
        }
    );
    assert_eq!(
        counts(i64::MAX),
        ScheduleCounts {
            pending: 2,
            overdue: 2
        }
    );
}

/// Setting a key again replaces its schedule with a new one: the old id can no longer be fired, and
/// the unit that tries writes nothing.
pub(crate) fn setting_a_key_again_replaces_its_schedule(store: &dyn Store) {
    write(store, vec![set("k", 100, "shop::order-1")]);
    let old = get(store, "k");
    write(store, vec![set("k", 200, "shop::order-2")]);
    let new = get(store, "k");
    assert_ne!(new.id, old.id);
    assert_eq!(
        (new.due_ms, new.stream.as_str(), new.state),
        (200, "shop::order-2", ScheduleState::Pending)
    );
    let mut stale = firing(&[&old], 250);
    stale.messages.push(message("shop::other-1", 0));
    stale.position = Some(PositionUpdate {
        subscription: "timers".into(),
        position: 7,
    });
    let refused = store.commit(&stale);
    assert!(is_not_pending(&refused, "k"), "{refused:?}");
    assert!(ids(store, "shop::order-1").is_empty());
    assert!(ids(store, "shop::other-1").is_empty());
    assert_eq!(store.position("timers").unwrap(), None);
    assert_eq!(get(store, "k"), new, "the refused unit changed nothing");
    // A fired schedule set again is pending again, as new.
    fire(store, &new, 260).unwrap();
    write(store, vec![set("k", 300, "shop::order-3")]);
    let again = get(store, "k");
    assert_ne!(again.id, new.id);
    assert_eq!(
        (again.state, again.settled_ms),
        (ScheduleState::Pending, None)
    );
    assert_eq!(ids(store, "shop::order-2"), [new.id]);
}

/// A cancel settles a pending schedule; a fired one stays fired, and a key with none stays without.
pub(crate) fn a_cancel_settles_only_a_pending_schedule(store: &dyn Store) {
    write(
        store,
        vec![
            set("p", 100, "shop::order-1"),
            set("f", 100, "shop::order-2"),
        ],
    );
    fire(store, &get(store, "f"), 110).unwrap();
    write(
        store,
        vec![cancel("p", 120), cancel("f", 130), cancel("none", 140)],
    );
    let p = get(store, "p");
    assert_eq!(
        (p.state, p.settled_ms),
        (ScheduleState::Cancelled, Some(120))
    );
    let f = get(store, "f");
    assert_eq!((f.state, f.settled_ms), (ScheduleState::Fired, Some(110)));
    assert_eq!(store.schedules().get("none").unwrap(), None);
    write(store, vec![cancel("p", 150)]);
    assert_eq!(get(store, "p").settled_ms, Some(120), "cancelled once");
    assert_eq!(store.schedules().due(i64::MAX, 10).unwrap(), []);
}

/// Prune deletes settled schedules older than asked, at most as many as asked, never a pending one.
pub(crate) fn settled_schedules_are_pruned_once_kept_long_enough(store: &dyn Store) {
    write(
        store,
        vec![
            set("fired", 100, "shop::order-1"),
            set("cancelled", 100, "shop::order-2"),
            set("also-cancelled", 100, "shop::order-3"),
            set("pending", 50, "shop::order-4"),
        ],
    );
    fire(store, &get(store, "fired"), 110).unwrap();
    write(
        store,
        vec![cancel("cancelled", 200), cancel("also-cancelled", 300)],
    );
    let prune = |before, limit| store.schedules().prune(before, limit).unwrap();
    assert_eq!(prune(110, 10), 0, "settled at 110 is not before 110");
    assert_eq!(prune(150, 10), 1);
    assert_eq!(store.schedules().get("fired").unwrap(), None);
    assert_eq!(prune(i64::MAX, 1), 1, "at most the limit");
    assert_eq!(prune(i64::MAX, 10), 1);
    let left: Vec<String> = store
        .schedules()
        .list(&ScheduleQuery {
            state: None,
            limit: 10,
        })
        .unwrap()
        .into_iter()
        .map(|s| s.key)
        .collect();
    assert_eq!(left, ["pending"], "a pending schedule is never pruned");
    assert_eq!(
        store.read_stream("shop::order-1", 0).unwrap().len(),
        1,
        "its message stays"
    );
}

/// A firing appends the schedule's message with its id and marks it fired, in one unit; a second
/// firing, or a firing of a cancelled schedule, is refused and appends nothing.
pub(crate) fn a_schedule_fires_once(store: &dyn Store) {
    write(
        store,
        vec![
            set("k", 100, "shop::order-1"),
            set("c", 100, "shop::order-2"),
        ],
    );
    let k = get(store, "k");
    let last = fire(store, &k, 150).unwrap();
    assert!(last.is_some(), "the firing appended its message");
    let appended = store.read_stream("shop::order-1", 0).unwrap();
    assert_eq!(appended.len(), 1);
    assert_eq!(appended[0].id, k.id);
    assert_eq!(appended[0].message_type, k.message_type);
    let fired = get(store, "k");
    assert_eq!(
        (fired.state, fired.settled_ms),
        (ScheduleState::Fired, Some(150))
    );
    assert_eq!(keys(&store.schedules().due(i64::MAX, 10).unwrap()), ["c"]);
    let again = fire(store, &k, 160);
    assert!(is_not_pending(&again, "k"), "{again:?}");
    assert_eq!(ids(store, "shop::order-1"), std::slice::from_ref(&k.id));
    assert_eq!(get(store, "k").settled_ms, Some(150));
    let c = get(store, "c");
    write(store, vec![cancel("c", 170)]);
    let cancelled = fire(store, &c, 180);
    assert!(is_not_pending(&cancelled, "c"), "{cancelled:?}");
    assert!(ids(store, "shop::order-2").is_empty());
    assert_eq!(get(store, "c").state, ScheduleState::Cancelled);
}

/// A unit firing several schedules is refused whole when one of them is not pending.
pub(crate) fn a_firing_with_one_stale_schedule_is_refused_whole(store: &dyn Store) {
    write(
        store,
        vec![
            set("a", 100, "shop::order-1"),
            set("b", 100, "shop::order-2"),
        ],
    );
    let (a, b) = (get(store, "a"), get(store, "b"));
    write(store, vec![cancel("b", 110)]);
    let refused = store.commit(&firing(&[&a, &b], 120));
    assert!(is_not_pending(&refused, "b"), "{refused:?}");
    assert!(ids(store, "shop::order-1").is_empty());
    assert_eq!(get(store, "a").state, ScheduleState::Pending);
    store.commit(&firing(&[&a], 130)).unwrap();
    assert_eq!(ids(store, "shop::order-1"), [a.id]);
}

/// A unit's writes apply in order: set then cancel ends cancelled, cancel then set ends pending.
pub(crate) fn writes_of_one_key_apply_in_order(store: &dyn Store) {
    write(store, vec![set("old", 50, "shop::order-0")]);
    write(
        store,
        vec![
            set("sc", 100, "shop::order-1"),
            cancel("sc", 110),
            cancel("cs", 120),
            set("cs", 130, "shop::order-2"),
            cancel("old", 140),
            set("old", 150, "shop::order-3"),
            cancel("old", 160),
            set("scs", 100, "shop::order-4"),
            cancel("scs", 170),
            set("scs", 180, "shop::order-5"),
        ],
    );
    let sc = get(store, "sc");
    assert_eq!(
        (sc.state, sc.settled_ms),
        (ScheduleState::Cancelled, Some(110))
    );
    assert_eq!(sc.due_ms, 100);
    let cs = get(store, "cs");
    assert_eq!(
        (cs.state, cs.settled_ms, cs.due_ms),
        (ScheduleState::Pending, None, 130)
    );
    let old = get(store, "old");
    assert_eq!(
        (old.state, old.settled_ms, old.stream.as_str()),
        (ScheduleState::Cancelled, Some(160), "shop::order-3")
    );
    let scs = get(store, "scs");
    assert_eq!(
        (scs.state, scs.settled_ms, scs.due_ms, scs.stream.as_str()),
        (ScheduleState::Pending, None, 180, "shop::order-5")
    );
}

/// The data and metadata of a schedule come back as written, byte for byte.
pub(crate) fn scheduled_data_and_metadata_round_trip_exactly(store: &dyn Store) {
    let data = r#"{"z": 1,  "a":[1, 2.50 ,"\u00e9"],"é":{"y":null, "x":true}}"#;
    let metadata = r#"{ "headers" : {"time":"t","id":"i"},"b":1,"a":"2"}"#;
    let mut scheduled = message("shop::order-1", 0);
    scheduled.data = data.into();
    scheduled.metadata = metadata.into();
    let schedule = ScheduleWrite::Set {
        key: "k".into(),
        due_ms: 100,
        message: scheduled,
    };
    write(store, vec![schedule]);
    let stored = get(store, "k");
    assert_eq!(
        (stored.data.as_str(), stored.metadata.as_str()),
        (data, metadata)
    );
    let due = &store.schedules().due(100, 1).unwrap()[0];
    assert_eq!((due.data.as_str(), due.metadata.as_str()), (data, metadata));
}

/// Replicas (each its own store handle) fire what is due while another cancels keys at random: every
/// schedule ends fired or cancelled, and each fired one (only those) has exactly one message.
pub(crate) fn racing_firings_and_cancels_settle_each_schedule_once(replicas: &[&dyn Store]) {
    const SCHEDULES: usize = 120;
    let (canceller, firers) = replicas.split_first().expect("replicas");
    let sets = (0..SCHEDULES)
        .map(|i| set(&format!("k{i:03}"), i as i64, &format!("shop::timer-{i}")))
        .collect();
    write(*canceller, sets);
    let fired_commits = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for (t, firer) in firers.iter().enumerate() {
            let fired_commits = &fired_commits;
            scope.spawn(move || {
                let mut round = 0;
                loop {
                    let due = firer.schedules().due(i64::MAX, 8).unwrap();
                    if due.is_empty() {
                        break;
                    }
                    // Replicas start at different places and fire one to three at once.
                    let start = (t + round) % due.len();
                    let take = 1 + (t + round) % 3;
                    let batch: Vec<&Schedule> = due.iter().cycle().skip(start).take(take).collect();
                    let mut batch = batch;
                    batch.sort_by(|a, b| a.key.cmp(&b.key));
                    batch.dedup_by(|a, b| a.key == b.key);
                    match firer.commit(&firing(&batch, 1_000 + round as i64)) {
                        Ok(_) => {
                            fired_commits
                                .fetch_add(batch.len(), std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(Error::NotPending { .. }) => {}
                        Err(other) => panic!("replica {t}: {other}"),
                    }
                    round += 1;
                }
            });
        }
        scope.spawn(|| {
            // A fixed pseudo-random sequence of keys (xorshift): the race differs, the keys do not.
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for _ in 0..SCHEDULES / 2 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let key = format!("k{:03}", x % SCHEDULES as u64);
                write(*canceller, vec![cancel(&key, 2_000)]);
            }
        });
    });
    let all = ScheduleQuery {
        state: None,
        limit: SCHEDULES * 2,
    };
    let schedules = canceller.schedules().list(&all).unwrap();
    assert_eq!(schedules.len(), SCHEDULES);
    let categories = ["shop::timer".to_owned()];
    let messages = canceller
        .read_categories(&categories, 0, SCHEDULES * 4)
        .unwrap();
    let mut appended: HashMap<&str, usize> = HashMap::new();
    for m in &messages {
        *appended.entry(m.id.as_str()).or_default() += 1;
    }
    let mut fired = 0;
    for s in &schedules {
        let count = appended.get(s.id.as_str()).copied().unwrap_or(0);
        match s.state {
            ScheduleState::Fired => {
                fired += 1;
                assert_eq!(count, 1, "{} fired with {count} messages", s.key);
                assert!(s.settled_ms.is_some_and(|at| (1_000..2_000).contains(&at)));
            }
            ScheduleState::Cancelled => {
                assert_eq!(count, 0, "{} cancelled with {count} messages", s.key);
                assert_eq!(s.settled_ms, Some(2_000));
            }
            ScheduleState::Pending => panic!("{} is still pending", s.key),
        }
    }
    assert_eq!(messages.len(), fired, "no message besides the fired ones");
    assert_eq!(
        fired_commits.into_inner(),
        fired,
        "each firing committed once"
    );
}
