//! Schedules fired by real `protean-host` replicas: each exactly once or cancelled, never both, with
//! replicas killed while they fire, a canceller racing them from another process's connection, and
//! schedules that came due while nothing ran. Every verdict is read from the store itself: each
//! schedule's state against the messages that carry its id.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use protean_host::{
    message::Kind,
    store::{
        schedules::ScheduleWrite, PostgresStore, ScheduleQuery, ScheduleState, SqliteStore, Store,
    },
    unit_of_work::{NewMessage, UnitOfWork},
};

use crate::support::{each_order_exactly_once, place, start_replicas, wait_until, PgServer};

fn write_config(dir: &Path, text: &str) {
    std::fs::write(dir.join("protean.toml"), text).unwrap();
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Schedule order `n` to be placed at `due_ms`, under key `order-{n}`.
fn place_at(n: usize, due_ms: i64) -> ScheduleWrite {
    let stream = format!("fulfilment::order:command-o{n}");
    let message = NewMessage::new(
        Kind::Command,
        &stream,
        "Fulfilment.PlaceOrder.v1",
        &place(n),
        None,
        None,
        None,
    );
    ScheduleWrite::Set {
        key: format!("order-{n}"),
        due_ms,
        message,
    }
}

fn commit(store: &dyn Store, schedules: Vec<ScheduleWrite>) {
    let unit = UnitOfWork {
        schedules,
        ..UnitOfWork::default()
    };
    store.commit(&unit).unwrap();
}

fn pending(store: &dyn Store) -> u64 {
    store
        .schedules()
        .counts(i64::MAX)
        .map_or(u64::MAX, |c| c.pending)
}

/// Every schedule is fired or cancelled, never both: a fired one has exactly one message with its
/// id in the store, a cancelled one none. Returns how many fired.
#[track_caller]
fn each_fired_once_or_cancelled(store: &dyn Store, total: usize) -> usize {
    let all = store
        .schedules()
        .list(&ScheduleQuery {
            state: None,
            limit: usize::MAX,
        })
        .unwrap();
    assert_eq!(all.len(), total);
    let messages = store
        .read_categories(&["fulfilment::order:command".into()], 0, usize::MAX)
        .unwrap();
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    for m in &messages {
        *by_id.entry(m.id.as_str()).or_default() += 1;
    }
    let mut fired = 0;
    for s in &all {
        let appended = by_id.get(s.id.as_str()).copied().unwrap_or(0);
        match s.state {
            ScheduleState::Fired => {
                assert_eq!(appended, 1, "{} fired: exactly one message", s.key);
                fired += 1;
            }
            ScheduleState::Cancelled => assert_eq!(appended, 0, "{} cancelled: none", s.key),
            ScheduleState::Pending => panic!("{} is still pending", s.key),
        }
    }
    fired
}

#[test]
fn three_replicas_fire_each_schedule_exactly_once_while_killed_and_raced_by_a_canceller() {
    let pg = PgServer::start();
    let store = Arc::new(PostgresStore::connect(&pg.store_config()).unwrap());
    store.setup().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!(
            "[server]\nlease_ttl_ms = 1500\npoll_interval_ms = 100\n[server.scheduler]\npoll_interval_ms = 50\nbatch = 20\n{}",
            pg.config()
        ),
    );
    // Due over the next few seconds, so that firing goes on while replicas die.
    let total = 400;
    let start = now_ms() + 2_000;
    let schedules = (0..total)
        .map(|n| place_at(n, start + n as i64 * 10))
        .collect();
    commit(store.as_ref(), schedules);
    let mut replicas = start_replicas(dir.path(), 3);
    // A canceller in this process, with its own connection, races the replicas for every 7th order.
    let stop = Arc::new(AtomicBool::new(false));
    let canceller = {
        let (stop, config) = (stop.clone(), pg.store_config());
        std::thread::spawn(move || {
            let own = PostgresStore::connect(&config).unwrap();
            let keys: Vec<String> = (0..total)
                .step_by(7)
                .map(|n| format!("order-{n}"))
                .collect();
            for key in keys.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let cancel = ScheduleWrite::Cancel {
                    key: key.clone(),
                    at_ms: now_ms(),
                };
                commit(&own, vec![cancel]);
            }
        })
    };
    for round in 0..3u64 {
        wait_until(Duration::from_secs(60), "firing under way", || {
            pending(store.as_ref()) < (total as u64) * (3 - round) / 4
        });
        let victim = round as usize % replicas.len();
        replicas[victim].signal(libc::SIGKILL);
        let _ = replicas.remove(victim).wait();
        replicas.extend(start_replicas(dir.path(), 1));
    }
    wait_until(Duration::from_secs(120), "every schedule settled", || {
        pending(store.as_ref()) == 0
    });
    stop.store(true, Ordering::Relaxed);
    canceller.join().unwrap();
    let fired = each_fired_once_or_cancelled(store.as_ref(), total);
    assert!(fired > total / 2, "most fired before their cancel: {fired}");
    wait_until(
        Duration::from_secs(120),
        "every placed order shipped",
        || count_of_shipped(store.as_ref()) >= fired,
    );
    for replica in replicas {
        replica.stop_cleanly();
    }
    each_order_exactly_once(store.as_ref(), fired);
}

fn count_of_shipped(store: &dyn Store) -> usize {
    crate::support::count_of(store, "fulfilment::order", "Fulfilment.OrderShipped.v1")
}

#[test]
fn schedules_due_while_nothing_ran_fire_on_start_late_but_once_and_say_how_late() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "[server]\npoll_interval_ms = 100\n");
    let path = dir.path().join(".protean/store.db");
    let store = SqliteStore::open(&path).unwrap();
    let due = now_ms() - 90_000;
    commit(
        &store,
        (0..5).map(|n| place_at(n, due + n as i64)).collect(),
    );
    let mut server = start_replicas(dir.path(), 1).remove(0);
    let line = server.wait_for(&["schedules fired late"], Duration::from_secs(30));
    let late: u64 = field(&line, "most_late_ms").parse().unwrap();
    assert!(late >= 90_000, "{line}");
    wait_until(
        Duration::from_secs(60),
        "the overdue orders shipped",
        || count_of_shipped(&store) == 5,
    );
    server.stop_cleanly();
    // Started again, nothing fires twice.
    let again = start_replicas(dir.path(), 1).remove(0);
    let log = again.stop_cleanly();
    assert!(!log.contains("schedules fired"), "{log}");
    assert_eq!(each_fired_once_or_cancelled(&store, 5), 5);
    each_order_exactly_once(&store, 5);
}

/// The value of `key=value` in a console log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let from = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("{key} in {line}"))
        + key.len()
        + 1;
    line[from..].split_whitespace().next().unwrap()
}
