//! Schedules fired by real `protean-host` replicas: each exactly once or cancelled, never both, with
//! replicas killed while they fire, a canceller racing them from another process's connection, and
//! schedules that came due while nothing ran. Every verdict is read from the store itself: each
//! schedule's state against the messages that carry its id.

use std::{
    collections::{BTreeMap, HashMap},
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

use crate::support::{
    each_order_exactly_once, host, place, sample_domain, send_orders, start_replicas, wait_until,
    PgServer, RedisServer,
};

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
    // Only the test's own: the sample's process sets a payment timeout for each order it places.
    let all: Vec<_> = all
        .into_iter()
        .filter(|s| s.key.starts_with("order-"))
        .collect();
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
    let line = server.wait_for_since_start(&["schedules fired late"], Duration::from_secs(30));
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

/// Where the virtual runs here start.
const VIRTUAL_START: &str = "virtual@2026-01-01T00:00:00Z";

/// Send 5 orders and 2 over the credit limit (declined, never paid), then run the sample flow in test
/// mode on the virtual clock; the run's summary.
fn run_unpaid_flow(dir: &Path) -> String {
    send_orders(dir, 0, 5);
    let unpaid: String = (5..7)
        .map(|n| {
            let mut order = place(n);
            order["total"] = 2_500_000.0.into();
            order.to_string() + "\n"
        })
        .collect();
    let lib = sample_domain().display().to_string();
    host(dir)
        .args(["send", "--domain", &lib, "Fulfilment.PlaceOrder.v1", "-"])
        .output_with_stdin(&unpaid)
        .expect_code(0);
    host(dir)
        .args(["--test-mode", "--clock", VIRTUAL_START, "--domain", &lib])
        .env("FULFILMENT_CREDIT_LIMIT", "1000000")
        .output()
        .expect_code(0)
        .stdout()
}

/// The flow's outcome, from the store: 5 shipped, 2 declined and cancelled by their timeout, every
/// timeout settled (5 cancelled by the payment, 2 fired), nothing dead-lettered.
#[track_caller]
fn two_cancelled_five_shipped(store: &dyn Store, summary: &str) {
    let count = |category: &str, t: &str| crate::support::count_of(store, category, t);
    assert_eq!(count("fulfilment::order", "Fulfilment.OrderPlaced.v1"), 7);
    assert_eq!(count("fulfilment::order", "Fulfilment.OrderShipped.v1"), 5);
    assert_eq!(
        count("fulfilment::payment", "Fulfilment.PaymentDeclined.v1"),
        2
    );
    assert_eq!(
        count("fulfilment::order", "Fulfilment.OrderCancelled.v1"),
        2
    );
    assert_eq!(
        count("fulfilment::order:command", "Fulfilment.CancelOrder.v1"),
        2
    );
    assert!(store.dead_letters(None).unwrap().is_empty());
    let all = store
        .schedules()
        .list(&ScheduleQuery {
            state: None,
            limit: usize::MAX,
        })
        .unwrap();
    let states: Vec<ScheduleState> = all.iter().map(|s| s.state).collect();
    let fired = states
        .iter()
        .filter(|s| **s == ScheduleState::Fired)
        .count();
    let cancelled = states
        .iter()
        .filter(|s| **s == ScheduleState::Cancelled)
        .count();
    assert_eq!((fired, cancelled, all.len()), (2, 5, 7), "{all:?}");
    assert!(
        summary.contains("virtual clock moved 15m 0s"),
        "the timeouts came 15 virtual minutes in: {summary}"
    );
}

/// Every stream's messages in order: type, data, and (but for what `send` wrote, dated by the
/// system clock) time.
fn streams(store: &dyn Store) -> BTreeMap<String, Vec<(String, String, String)>> {
    let mut by_stream: BTreeMap<String, Vec<(String, String, String)>> = BTreeMap::new();
    for m in store.read_categories(&categories(), 0, usize::MAX).unwrap() {
        let time = match m.message_type.as_str() {
            "Fulfilment.PlaceOrder.v1" => String::new(),
            _ => m.time.clone(),
        };
        let entry = (m.message_type.clone(), m.data.clone(), time);
        by_stream.entry(m.stream.clone()).or_default().push(entry);
    }
    by_stream
}

fn categories() -> Vec<String> {
    [
        "order",
        "order:command",
        "payment",
        "payment:command",
        "reservation",
    ]
    .map(|c| format!("fulfilment::{c}"))
    .to_vec()
}

#[test]
fn on_the_virtual_clock_unpaid_orders_are_cancelled_at_once_and_two_runs_write_the_same_messages() {
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut runs = Vec::new();
    for dir in [&first, &second] {
        write_config(dir.path(), "[server]\npoll_interval_ms = 100\n");
        let began = std::time::Instant::now();
        let summary = run_unpaid_flow(dir.path());
        let real = began.elapsed();
        let store = SqliteStore::open(&dir.path().join(".protean/store.db")).unwrap();
        two_cancelled_five_shipped(&store, &summary);
        assert!(real < Duration::from_secs(120), "{real:?}");
        runs.push(streams(&store));
    }
    assert_eq!(
        runs[0], runs[1],
        "the same messages, per stream, at the same virtual times"
    );
    let cancelled = &runs[0]["fulfilment::order-o5"];
    let (_, _, at) = cancelled.last().unwrap();
    assert!(
        at.starts_with("2026-01-01T00:15:00"),
        "cancelled 15 virtual minutes in: {at}"
    );
}

#[test]
fn on_the_virtual_clock_unpaid_orders_are_cancelled_on_postgres_and_with_redis() {
    let pg = PgServer::start();
    let store = PostgresStore::connect(&pg.store_config()).unwrap();
    store.setup().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!("[server]\npoll_interval_ms = 100\n{}", pg.config()),
    );
    let summary = run_unpaid_flow(dir.path());
    two_cancelled_five_shipped(&store, &summary);

    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!("[server]\npoll_interval_ms = 100\n{}", redis.config()),
    );
    let summary = run_unpaid_flow(dir.path());
    let store = SqliteStore::open(&dir.path().join(".protean/store.db")).unwrap();
    two_cancelled_five_shipped(&store, &summary);
    let outbox = store.outbox().unwrap().counts(1).unwrap();
    assert_eq!(outbox.pending, 0, "the fired commands were published too");
}
