//! The outbox with a real Redis and the real binary: a broker outage longer than `max_attempts` loses
//! nothing and keeps each stream's order; held rows are listed and republished by the operator; a
//! killed replica's outbox leases are taken over within the configured lease; a group lag that Redis
//! miscounts is not trusted; rounds on SQLite make no temporary files.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use protean_host::{
    message::Kind,
    store::Store,
    unit_of_work::{NewMessage, UnitOfWork},
};
use serde_json::Value;

use crate::support::{
    count_of, each_order_exactly_once, fixture_domain, host, postgres, sample_domain, send_orders,
    sqlite, start_replicas, start_servers, status_json, wait_until, Created, RedisServer, Server,
    TEST_CONFIG,
};

/// The categories the sample flow writes, each a broker stream the outbox publishes to.
const CATEGORIES: [&str; 5] = [
    "fulfilment::order",
    "fulfilment::order:command",
    "fulfilment::reservation",
    "fulfilment::payment",
    "fulfilment::payment:command",
];

fn shipped(store: &dyn Store) -> usize {
    count_of(store, "fulfilment::order", "Fulfilment.OrderShipped.v1")
}

fn pending(store: &dyn Store) -> u64 {
    store.outbox().unwrap().counts(1).unwrap().pending
}

/// Each category's broker stream holds the category's stored messages exactly once, in store order.
#[track_caller]
fn broker_matches_store(redis: &RedisServer, store: &dyn Store) {
    for category in CATEGORIES {
        let stored = stored_positions(store, category);
        assert!(!stored.is_empty(), "{category} has messages");
        assert_eq!(
            published_positions(redis, category),
            stored,
            "{category}: every stored message on the broker once, in store order"
        );
    }
}

/// The global positions of a category's messages, in store order.
fn stored_positions(store: &dyn Store, category: &str) -> Vec<u64> {
    store
        .read_categories(&[category.into()], 0, usize::MAX)
        .unwrap()
        .iter()
        .map(|m| m.global_position)
        .collect()
}

/// The global positions of the messages on a broker stream, in stream order.
fn published_positions(redis: &RedisServer, stream: &str) -> Vec<u64> {
    redis
        .cli(&["XRANGE", stream, "-", "+"])
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let entry: Value = serde_json::from_str(l).unwrap();
            entry["metadata"]["event_store"]["global_position"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// A Redis server and a directory whose `protean.toml` is `config` plus the broker section for it.
fn with_redis(config: &str) -> (RedisServer, tempfile::TempDir) {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("{config}{}", redis.config());
    std::fs::write(dir.path().join("protean.toml"), toml).unwrap();
    (redis, dir)
}

fn domain() -> String {
    sample_domain().display().to_string()
}

fn spawn(dir: &Path, extra: &[&str]) -> Server {
    let mut server = host(dir).args(["--domain", &domain()]).args(extra).spawn();
    server.wait_for(&["engine started"], Duration::from_secs(60));
    server
}

/// Item 4 of issue 14: with `max_attempts = 3`, a 10 s outage used to abandon the rows committed
/// meanwhile. Now they are held, published once Redis is back, exactly once and in order.
#[test]
fn a_redis_outage_past_max_attempts_loses_no_committed_message_and_keeps_stream_order() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let outbox = "[outbox]\nmax_attempts = 3\nretry_delay_ms = 20\nmax_retry_delay_ms = 200\n";
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("{TEST_CONFIG}{}{outbox}", redis.config()),
    )
    .unwrap();
    let store = sqlite(dir.path());
    let mut server = spawn(dir.path(), &[]);
    send_orders(dir.path(), 0, 5);
    wait_until(Duration::from_secs(60), "the first orders shipped", || {
        shipped(store.as_ref()) == 5
    });
    redis.stop();
    send_orders(dir.path(), 5, 10);
    wait_until(Duration::from_secs(30), "a row failed 3 times", || {
        store.outbox().unwrap().counts(3).unwrap().held > 0
    });
    // The commands are handled from the store meanwhile, so their events wait in the outbox too.
    let counts = store.outbox().unwrap().counts(3).unwrap();
    assert!(
        counts.held >= 1 && counts.pending >= 10,
        "a held row, and the rest waiting behind it: {counts:?}"
    );
    redis.restart();
    wait_until(Duration::from_secs(60), "every order shipped", || {
        shipped(store.as_ref()) == 15
    });
    wait_until(Duration::from_secs(30), "an empty outbox", || {
        pending(store.as_ref()) == 0
    });
    // Which stream's head row reaches max_attempts first (the commands sent, or the events their
    // handling raised meanwhile) is a race; that the held row is logged, naming its stream, is not.
    assert!(
        server.seen_or_wait(&["outbox row held", "target="], Duration::ZERO),
        "the held row was logged: {:?}",
        server
            .seen()
            .iter()
            .filter(|l| l.contains("outbox row"))
            .collect::<Vec<_>>()
    );
    server.stop_cleanly();
    each_order_exactly_once(store.as_ref(), 15);
    broker_matches_store(&redis, store.as_ref());
}

/// `outbox list` shows what waits and why; `outbox republish` makes a running server publish rows
/// held for a long backoff at once; bad input gets one clear line.
fn list_and_republish(store_config: &str, store: &Arc<dyn Store>) {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    // One failure holds a row, and its next attempt is ten minutes away. The command handler reads its
    // commands from the broker here, so that only the three sent commands wait in the outbox (from the
    // event store, its default, it would handle them and add rows of other streams meanwhile).
    let outbox =
        "[outbox]\nmax_attempts = 1\nretry_delay_ms = 600000\nmax_retry_delay_ms = 600000\n\
                  [server.handlers.orders]\nsubscription_type = \"stream\"\n";
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("{store_config}{TEST_CONFIG}{}{outbox}", redis.config()),
    )
    .unwrap();
    let mut server = spawn(dir.path(), &[]);
    redis.stop();
    send_orders(dir.path(), 0, 3);
    server.wait_for(&["outbox row held"], Duration::from_secs(30));
    let run = |args: &[&str]| host(dir.path()).args(args).output();

    let list = run(&["outbox", "list"]).expect_code(0).stdout();
    let listed = list
        .lines()
        .filter(|l| l.starts_with("fulfilment::order:command "))
        .count();
    assert_eq!(listed, 3, "{list}");
    assert!(list.contains("3 pending (1 failing, 1 held)"), "{list}");
    let rows: Value = serde_json::from_str(
        &run(&[
            "outbox",
            "list",
            "--json",
            "--stream",
            "fulfilment::order:command",
        ])
        .expect_code(0)
        .stdout(),
    )
    .unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 3, "{rows}");
    assert_eq!(rows[0]["attempts"], 1, "{rows}");
    assert!(rows[0]["last_error"].is_string(), "{rows}");
    assert_eq!(rows[1]["attempts"], 0, "the rows behind it wait: {rows}");
    let status = run(&["subscriptions", "status", "--domain", &domain()]).stdout();
    assert!(
        status.contains("outbox: 3 pending (1 failing, 1 held), oldest"),
        "{status}"
    );

    let typo = run(&["outbox", "republish", "--stream", "fulfilment::ordr"]).expect_code(1);
    assert_eq!(
        typo.error_lines(),
        ["error: no outbox rows wait for stream \"fulfilment::ordr\"; streams with rows waiting: fulfilment::order:command"]
    );
    run(&["outbox", "republish"]).expect_code(2);

    redis.restart();
    let republished = run(&[
        "outbox",
        "republish",
        "--stream",
        "fulfilment::order:command",
    ])
    .expect_code(0)
    .stdout();
    assert!(
        republished.starts_with("1 row(s) of stream fulfilment::order:command"),
        "{republished}"
    );
    wait_until(
        Duration::from_secs(30),
        "the held rows published long before their backoff",
        || pending(store.as_ref()) == 0,
    );
    wait_until(Duration::from_secs(60), "every order shipped", || {
        shipped(store.as_ref()) == 3
    });
    wait_until(Duration::from_secs(30), "the last events published", || {
        pending(store.as_ref()) == 0
    });
    server.stop_cleanly();
    let list = run(&["outbox", "list"]).expect_code(0).stdout();
    assert!(list.contains("\n0 pending (0 failing, 0 held)"), "{list}");
    broker_matches_store(&redis, store.as_ref());
}

#[test]
fn outbox_list_and_republish_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let config = format!(
        "[store]\nprovider = \"sqlite\"\npath = \"{}\"\n",
        path.display()
    );
    let store: Arc<dyn Store> = Arc::new(protean_host::store::SqliteStore::open(&path).unwrap());
    list_and_republish(&config, &store);
}

#[test]
fn outbox_list_and_republish_on_postgres() {
    let (store, pg) = postgres();
    list_and_republish(&pg.config(), &store);
}

#[test]
fn outbox_commands_say_why_without_a_broker_or_on_the_memory_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("protean.toml");
    std::fs::write(&config, TEST_CONFIG).unwrap();
    let out = host(dir.path())
        .args(["outbox", "list"])
        .output()
        .expect_code(1);
    assert_eq!(out.error_lines().len(), 1, "{}", out.stderr());
    assert!(
        out.error_lines()[0].starts_with("error: no broker is configured ([brokers.default])"),
        "{}",
        out.stderr()
    );
    std::fs::write(
        &config,
        format!("{TEST_CONFIG}[store]\nprovider = \"memory\"\n[brokers.default]\nuri = \"redis://127.0.0.1:1/0\"\n"),
    )
    .unwrap();
    let out = host(dir.path())
        .args(["outbox", "republish", "--all"])
        .output()
        .expect_code(1);
    assert!(
        out.error_lines()[0].starts_with("error: the memory store lives inside the server process"),
        "{}",
        out.stderr()
    );
}

/// Item 6 of issue 14: a replica killed between claiming rows and releasing their streams used to
/// stop their publishing for 30 s. Now another replica takes over once `outbox.lease_ttl_ms` ends,
/// and says so.
#[test]
fn a_killed_replica_holding_outbox_leases_is_taken_over_within_the_lease() {
    let (redis, dir) = with_redis("[server]\nretry_delay_ms = 5\nmax_retry_delay_ms = 20\npoll_interval_ms = 100\nlease_ttl_ms = 1000\n[outbox]\nlease_ttl_ms = 4000\n");
    let store = sqlite(dir.path());
    let mut replicas = start_replicas(dir.path(), 2);
    // A frozen Redis holds whichever replica claims the row inside its round: claimed, leased, waiting.
    redis.pause();
    send_orders(dir.path(), 0, 1);
    let leases = rusqlite::Connection::open(dir.path().join(".protean/store.db")).unwrap();
    let mut holder = String::new();
    wait_until(
        Duration::from_secs(30),
        "a replica leases the stream",
        || {
            holder = leases
                .query_row("SELECT worker FROM outbox_leases", [], |r| r.get(0))
                .unwrap_or_default();
            !holder.is_empty()
        },
    );
    let claimed = Instant::now();
    // Workers are named outbox-{pid}-{random}.
    let pid: i32 = holder.split('-').nth(1).unwrap().parse().unwrap();
    let dead = replicas.iter().position(|r| r.pid() == pid).unwrap();
    let dead = replicas.remove(dead);
    dead.signal(libc::SIGKILL);
    let _ = dead.wait();
    redis.resume();
    let mut other = replicas.pop().unwrap();
    wait_until(
        Duration::from_secs(20),
        "the other replica publishes",
        || pending(store.as_ref()) == 0,
    );
    let took = claimed.elapsed();
    assert!(
        took >= Duration::from_millis(3500) && took < Duration::from_secs(10),
        "published after the 4 s lease, not before and not 30 s later: {took:?}"
    );
    assert!(
        other.seen_or_wait(
            &[
                "outbox stream waits for a lease its holder has neither renewed nor released",
                &holder
            ],
            Duration::ZERO
        ),
        "the wait is logged"
    );
    assert!(
        other.seen_or_wait(
            &["outbox took over a stream whose lease expired", &holder],
            Duration::from_secs(5)
        ),
        "the takeover is logged"
    );
    wait_until(Duration::from_secs(60), "the order shipped", || {
        shipped(store.as_ref()) == 1
    });
    other.stop_cleanly();
    // The frozen Redis may still have run the killed replica's XADD: at least once on the broker,
    // exactly once in effect.
    each_order_exactly_once(store.as_ref(), 1);
}

/// A processor keeps its streams while it has work (no lease write per round, issue #21) and gives them
/// back after an eighth of its lease with nothing to claim, while it runs: a lease that ends unreleased
/// then still means a processor that died or stalled, as the takeover WARN says.
#[test]
fn an_idle_replica_gives_its_outbox_streams_back_long_before_its_lease_ends() {
    let (_redis, dir) =
        with_redis("[server]\npoll_interval_ms = 100\n[outbox]\nlease_ttl_ms = 8000\n");
    let store = sqlite(dir.path());
    let server = spawn(dir.path(), &[]);
    let leases = rusqlite::Connection::open(dir.path().join(".protean/store.db")).unwrap();
    let held = || -> i64 {
        leases
            .query_row("SELECT count(*) FROM outbox_leases", [], |r| r.get(0))
            .unwrap()
    };
    send_orders(dir.path(), 0, 1);
    wait_until(Duration::from_secs(60), "the order shipped", || {
        shipped(store.as_ref()) == 1
    });
    let shipped_at = Instant::now();
    wait_until(
        Duration::from_secs(8),
        "the idle processor releases",
        || held() == 0,
    );
    assert!(
        shipped_at.elapsed() < Duration::from_secs(4),
        "released after an eighth of the 8 s lease idle, not when it ended: {:?}",
        shipped_at.elapsed()
    );
    assert_eq!(pending(store.as_ref()), 0);
    send_orders(dir.path(), 1, 1);
    wait_until(Duration::from_secs(60), "the next order shipped", || {
        shipped(store.as_ref()) == 2
    });
    let log = server.stop_cleanly();
    assert!(
        !log.contains("outbox took over") && !log.contains("outbox stream waits for a lease"),
        "no lease was taken for a dead processor's:\n{log}"
    );
    each_order_exactly_once(store.as_ref(), 2);
}

/// Item 6 of issue 14: Redis 7.0 can leave a group's `lag` wrong (entries-added minus entries-read,
/// after an AOF rewrite). Forced here with XSETID ENTRIESADDED: Redis then reports unread entries
/// that do not exist. Status, metrics and test mode count from the group's last-delivered-id instead.
#[test]
fn a_group_lag_that_redis_miscounts_is_not_trusted() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config =
        "[server]\nretry_delay_ms = 5\nmax_retry_delay_ms = 20\ntest_mode_timeout_seconds = 15\n";
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("{config}{}", redis.config()),
    )
    .unwrap();
    send_orders(dir.path(), 0, 5);
    let test_mode = || {
        host(dir.path())
            .args(["--domain", &domain(), "--test-mode"])
            .output()
    };
    test_mode().expect_code(0);
    let stream = "fulfilment::order";
    let last = redis.cli(&["XREVRANGE", stream, "+", "-", "COUNT", "1"]);
    let last = last.lines().next().unwrap();
    let length: u64 = redis.cli(&["XLEN", stream]).trim().parse().unwrap();
    let added = (length + 50).to_string();
    redis.cli(&["XSETID", stream, last, "ENTRIESADDED", &added]);
    let groups = redis.cli(&["XINFO", "GROUPS", stream]);
    assert!(
        groups.contains("\nlag\n50\n"),
        "Redis now reports 50 unread entries: {groups}"
    );
    let status = status_json(dir.path(), &domain());
    let streams: Vec<&Value> = status["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["type"] == "stream"
                && s["categories"]
                    .to_string()
                    .contains("\"fulfilment::order\"")
        })
        .collect();
    assert!(!streams.is_empty(), "{status}");
    for s in streams {
        assert_eq!(
            (&s["lag"], &s["pending"]),
            (&Value::from(0), &Value::from(0)),
            "{s}"
        );
        assert_eq!(s["state"], "caught up", "{s}");
    }
    let again = test_mode().expect_code(0).stdout();
    assert!(again.contains("completed"), "{again}");
}

/// Small rounds, short retries, and a lease whose half (a round's deadline) a pause of Redis outlasts.
const OVERLAPPING: &str =
    "[outbox]\nmessages_per_tick = 20\nretry_delay_ms = 10\nmax_retry_delay_ms = 50\nlease_ttl_ms = 1000\n";

/// Rounds overlap: the next claim is read while the broker takes the last round, and published only if
/// every row of that round was. This breaks the broker (restarts, outages and pauses past the round's
/// deadline) at points spread over a long flow of three interleaved streams, small rounds, so that
/// rounds fail while the next claim waits. Checked from the broker and the store at the end: every
/// stored message is on its stream, and the first time each appears is in commit order. (A round cut
/// off mid-pipeline is published again, so an entry may repeat, as a replay of what came before it.)
#[test]
fn overlapping_rounds_keep_each_stream_in_commit_order_through_broker_faults() {
    let (redis, dir) = with_redis(OVERLAPPING);
    let store = sqlite(dir.path());
    overlapping_rounds_through_broker_faults(redis, dir.path(), store.as_ref(), 1);
}

/// The same on PostgreSQL, with two replicas whose processors overlap their rounds and compete for the
/// streams (each holds a stream by its lease, and gives it back once idle for an eighth of it).
#[test]
fn two_replicas_overlapping_rounds_on_postgres_keep_each_stream_in_commit_order_through_broker_faults(
) {
    let (store, pg) = postgres();
    let (redis, dir) = with_redis(&format!("{}{OVERLAPPING}", pg.config()));
    overlapping_rounds_through_broker_faults(redis, dir.path(), store.as_ref(), 2);
}

fn overlapping_rounds_through_broker_faults(
    mut redis: RedisServer,
    dir: &Path,
    store: &dyn Store,
    replicas: usize,
) {
    const EVENTS: u64 = 12_000;
    const STREAMS: [&str; 3] = ["shop::a", "shop::b", "shop::c"];
    commit_events(store, &STREAMS, EVENTS);
    let empty = format!("{}:empty", fixture_domain().display());
    let servers = start_servers(dir, replicas, &empty);
    let on_broker = |redis: &RedisServer| -> u64 {
        STREAMS
            .iter()
            .map(|s| redis.cli(&["XLEN", s]).trim().parse::<u64>().unwrap_or(0))
            .sum()
    };
    let mut mid_flow = 0;
    for (n, share) in [10, 25, 40, 55, 70, 85].into_iter().enumerate() {
        wait_until(Duration::from_secs(120), "the outbox to go on", || {
            on_broker(&redis) >= EVENTS * share / 100
        });
        mid_flow += usize::from(pending(store) > 0);
        match n % 3 {
            0 => redis.restart(),
            1 => redis.outage(Duration::from_millis(200)),
            // Longer than half the lease: the rounds in flight time out.
            _ => {
                redis.pause();
                std::thread::sleep(Duration::from_millis(700));
                redis.resume();
            }
        }
    }
    wait_until(Duration::from_secs(120), "an empty outbox", || {
        pending(store) == 0
    });
    let log: String = servers.into_iter().map(Server::stop_cleanly).collect();
    assert!(
        mid_flow >= 3,
        "the faults came after the flow: nothing tested"
    );
    let failed = log.matches("outbox publish failed").count();
    assert!(failed > 0, "no round failed: nothing tested");
    for stream in STREAMS {
        let stored = stored_positions(store, stream);
        let published = published_positions(&redis, stream);
        let mut seen = std::collections::HashSet::new();
        let first: Vec<u64> = published
            .iter()
            .copied()
            .filter(|p| seen.insert(*p))
            .collect();
        eprintln!(
            "{stream}: {} stored, {} entries ({} repeated), {failed} failed rounds in all",
            stored.len(),
            published.len(),
            published.len() - first.len()
        );
        let apart = first.iter().zip(&stored).position(|(f, s)| f != s);
        let around =
            |list: &[u64], at: usize| list[at.saturating_sub(3)..(at + 4).min(list.len())].to_vec();
        assert!(
            apart.is_none() && first.len() == stored.len(),
            "{stream}: every stored message on the broker, first seen in commit order; {} stored, {} \
             seen; first difference at {apart:?}: broker {:?}, store {:?}",
            stored.len(),
            first.len(),
            apart.map(|at| around(&first, at)),
            apart.map(|at| around(&stored, at)),
        );
    }
}

/// `events` events over `streams` in turn (three entities each), committed 100 to a unit with outbox
/// rows, as a domain's handlers would.
fn commit_events(store: &dyn Store, streams: &[&str], events: u64) {
    let messages: Vec<NewMessage> = (0..events)
        .map(|n| {
            let category = streams[n as usize % streams.len()];
            NewMessage::new(
                Kind::Event,
                &format!("{category}-{}", n % 9),
                "Shop.Happened.v1",
                &serde_json::json!({ "n": n }),
                None,
                None,
                None,
            )
        })
        .collect();
    for unit in messages.chunks(100) {
        store
            .commit(&UnitOfWork {
                messages: unit.to_vec(),
                publish: true,
                ..UnitOfWork::default()
            })
            .unwrap();
    }
}

/// Marking a round of 500 rows published is one multi-row UPDATE. SQLite journals such a statement on
/// its own (the original of every page it changes) unless it cannot fail halfway; that journal
/// spilled to a temporary file every round, created, written and unlinked. The rounds now make no
/// file: watched in the directory SQLite is told to make them in.
#[test]
fn outbox_rounds_on_sqlite_make_no_temporary_files() {
    let (redis, dir) = with_redis(TEST_CONFIG);
    let store = sqlite(dir.path());
    commit_events(store.as_ref(), &["shop::cart", "shop::order"], 3000);
    drop(store);
    let temp = tempfile::tempdir().unwrap();
    let created = Created::watch(temp.path());
    let run = host(dir.path())
        .args(["--test-mode", "--domain"])
        .args([format!("{}:empty", fixture_domain().display())])
        .env("SQLITE_TMPDIR", temp.path())
        .output();
    assert_eq!(run.code(), Some(0), "{}", run.stderr());
    assert_eq!(
        pending(sqlite(dir.path()).as_ref()),
        0,
        "every row was published"
    );
    let published = ["shop::cart", "shop::order"].map(|s| published_positions(&redis, s).len());
    assert_eq!(published.iter().sum::<usize>(), 3000);
    assert_eq!(
        created.since(),
        Vec::<PathBuf>::new(),
        "files made in SQLite's temporary directory"
    );
}

/// A stored message that no longer reads as JSON (damaged, or written by hand) is neither published as
/// garbage nor skipped: its row fails with the reason and holds its stream back, in order, while the
/// other streams are published. The envelope is made on the store's thread, right after the claim;
/// this is the path a failure there takes.
#[test]
fn an_unreadable_stored_message_holds_back_its_stream_and_says_why() {
    let (redis, dir) = with_redis(&format!(
        "{TEST_CONFIG}[outbox]\nretry_delay_ms = 20\nmax_retry_delay_ms = 100\n"
    ));
    let store = sqlite(dir.path());
    commit_events(store.as_ref(), &["shop::cart", "shop::order"], 20);
    let db = rusqlite::Connection::open(dir.path().join(".protean/store.db")).unwrap();
    let damaged: u64 = db
        .query_row(
            "SELECT min(global_position) FROM messages WHERE stream_name LIKE 'shop::cart-%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    db.execute(
        "UPDATE messages SET data = '{not json' WHERE global_position = ?1",
        [damaged],
    )
    .unwrap();
    let empty = format!("{}:empty", fixture_domain().display());
    let mut server = host(dir.path()).args(["--domain", &empty]).spawn();
    server.wait_for(&["stored message is unreadable"], Duration::from_secs(30));
    wait_until(
        Duration::from_secs(30),
        "the other stream is published",
        || published_positions(&redis, "shop::order").len() == 10,
    );
    server.signal(libc::SIGTERM);
    let (code, log) = server.wait();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(
        published_positions(&redis, "shop::cart"),
        Vec::<u64>::new(),
        "nothing of the damaged row's stream is published past it"
    );
    let (attempts, error): (u32, String) = db
        .query_row(
            "SELECT attempts, last_error FROM outbox WHERE global_position = ?1 AND status = 'pending'",
            [damaged],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(attempts >= 1, "the failure is counted");
    assert!(error.contains("stored message is unreadable"), "{error}");
    assert_eq!(
        pending(store.as_ref()),
        10,
        "the damaged stream's rows wait"
    );
}
