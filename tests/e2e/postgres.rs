//! The PostgreSQL store with a real PostgreSQL: its commands, its errors, and replicas sharing it with no
//! broker, the owner of the subscriptions killed and the database restarted mid-run.

use std::{collections::BTreeMap, io::Write, path::Path, sync::Arc, time::Duration};

use protean_host::store::{PostgresStore, Store};

use crate::support::{
    count_of, each_order_exactly_once, engine, host, place, postgres, sample_domain, send_orders,
    start_replicas, wait_until, PgServer, RedisServer, TEST_CONFIG,
};

fn write_config(dir: &Path, text: &str) {
    std::fs::write(dir.join("protean.toml"), text).unwrap();
}

#[test]
fn send_tries_once_more_when_a_frozen_transaction_holds_the_append_lock_past_the_timeout() {
    // A replica frozen (SIGSTOP) in a transaction holds the store-wide append lock until PostgreSQL
    // ends that transaction, idle for the statement timeout. A `send` that began to wait before the
    // frozen one went idle runs out of the same timeout first: it tries once more, with its key.
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!("{}statement_timeout_ms = 2000\n", pg.config()),
    );
    host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(0);
    let mut frozen = pg.session();
    let mut sql = frozen.stdin.take().unwrap();
    writeln!(
        sql,
        "BEGIN; SELECT pg_advisory_xact_lock(7362836200114529281);"
    )
    .unwrap();
    let held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted";
    wait_until(Duration::from_secs(10), "the append lock held", || {
        pg.psql(held).trim() == "1"
    });
    let lib = sample_domain().display().to_string();
    let mut send = host(dir.path())
        .args(["send", "--domain", &lib, "Fulfilment.PlaceOrder.v1"])
        .args([place(1).to_string()])
        .spawn();
    send.wait_for(
        &["the store timed out", "trying once more"],
        Duration::from_secs(30),
    );
    writeln!(sql, "COMMIT;").unwrap();
    let (code, log) = send.wait();
    assert_eq!(code, Some(0), "{log}");
    drop(sql);
    frozen.wait().unwrap();
    let store = PostgresStore::connect(&pg.store_config()).unwrap();
    let commands = store
        .read_categories(&["fulfilment::order:command".into()], 0, 100)
        .unwrap();
    assert_eq!(commands.len(), 1, "stored once: {commands:?}");
}

#[test]
fn db_setup_applies_each_migration_once_and_status_shows_the_version() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &pg.config());
    let before = host(dir.path())
        .args(["db", "status"])
        .output()
        .expect_code(1)
        .stdout();
    let latest = protean_host::store::postgres::migrate::latest();
    assert!(
        before.starts_with(&format!("schema version 0 of {latest}")),
        "{before}"
    );
    assert!(
        before.contains("pending migration 1: message_store"),
        "{before}"
    );
    assert!(before.contains("run `protean-host db setup`"), "{before}");
    let first = host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(0)
        .stdout();
    assert!(
        first.contains("applied migration 1: message_store"),
        "{first}"
    );
    assert!(first.contains("applied migration 2: protean"), "{first}");
    assert!(first.contains("applied migration 3: fences"), "{first}");
    assert!(
        first.contains("applied migration 4: appends without their category's lock refused"),
        "{first}"
    );
    assert!(
        first.contains("applied migration 6: document versions"),
        "{first}"
    );
    assert!(
        first.contains("applied migration 7: idempotency keys"),
        "{first}"
    );
    assert!(
        first.contains("applied migration 8: processed markers keyed by stream and position"),
        "{first}"
    );
    let second = host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(0)
        .stdout();
    assert!(
        !second.contains("applied migration"),
        "nothing applied twice: {second}"
    );
    assert!(second.contains("0 migration(s) applied now"), "{second}");
    let after = host(dir.path())
        .args(["db", "status"])
        .output()
        .expect_code(0)
        .stdout();
    assert_eq!(after.lines().count(), 1, "{after}");
    assert!(
        after.starts_with(&format!("schema version {latest} of {latest}")),
        "{after}"
    );
    assert_eq!(
        pg.psql("SELECT message_store.message_store_version()"),
        "1.3.0"
    );
}

/// Migration 17 drops the table servers of older builds write their document fields to: `db setup`
/// will not apply it under such a server, says so in one line naming it, and applies it once it stops.
#[test]
fn db_setup_refuses_migration_17_while_an_older_server_is_connected() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &pg.config());
    host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(0);
    pg.psql(include_str!("../fixtures/postgres/before_migration_17.sql"));
    let mut config: postgres::Config = pg.uri().parse().unwrap();
    let older = config
        .application_name("protean-host")
        .connect(postgres::NoTls)
        .unwrap();
    let refused = host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(1);
    let errors = refused.error_lines();
    assert_eq!(errors.len(), 1, "{}", refused.stderr());
    assert!(
        errors[0].contains("migration 17 needs the servers of older builds stopped first"),
        "{errors:?}"
    );
    assert!(errors[0].contains("process "), "{errors:?}");
    drop(older);
    let gone = "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'protean-host'";
    wait_until(
        Duration::from_secs(10),
        "the older connection to end",
        || pg.psql(gone) == "t",
    );
    let applied = host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(0)
        .stdout();
    assert!(
        applied.contains("applied migration 17: document fields in the document's row"),
        "{applied}"
    );
}

/// (Outside test mode the server waits for the schema instead, with the same reason in its WARN lines.)
#[test]
fn a_test_mode_server_on_a_store_not_set_up_names_db_setup() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &pg.config());
    let lib = sample_domain().display().to_string();
    let run = host(dir.path())
        .args(["--test-mode", "--domain", &lib])
        .output()
        .expect_code(1);
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.stderr());
    assert!(
        errors[0].contains(&format!(
            "is not set up (schema version 0 of {}); run `protean-host db setup`",
            protean_host::store::postgres::migrate::latest()
        )),
        "{errors:?}"
    );
    assert!(!errors[0].contains('\n'));
}

#[test]
fn a_bad_uri_is_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        "[store]\nprovider = \"postgres\"\nuri = \"postgresql://db:port/x\"\n",
    );
    let run = host(dir.path())
        .args(["db", "status"])
        .output()
        .expect_code(1);
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.stderr());
    assert!(
        errors[0].contains("store.uri: invalid connection string"),
        "{errors:?}"
    );
    assert!(
        errors[0].contains("expected a URI like postgresql://"),
        "{errors:?}"
    );
}

#[test]
fn an_unreachable_database_is_one_line_naming_it_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("postgresql://app:secret@127.0.0.1:{port}/shop");
    write_config(
        dir.path(),
        &format!("[store]\nprovider = \"postgres\"\nuri = \"{uri}\"\n"),
    );
    let run = host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(1);
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.stderr());
    assert!(
        errors[0].contains(&format!(
            "cannot reach the PostgreSQL store at postgresql://app:***@127.0.0.1:{port}/shop"
        )),
        "{errors:?}"
    );
    assert!(
        !run.stderr().contains("secret"),
        "the password is never printed"
    );
}

#[test]
fn db_commands_on_another_store_say_they_are_for_postgres_only() {
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(1);
    assert_eq!(
        run.error_lines(),
        ["error: the configured store is not PostgreSQL; only [store] provider = \"postgres\" has migrations (SQLite creates its schema itself)"]
    );
}

/// An existing MessageDB install (here: the first migration's schema, one function redefined with the
/// parameter names of another MessageDB release, and a message) is adopted by `db setup`: its functions
/// are kept (`CREATE OR REPLACE` could not rename a parameter), its messages read.
#[test]
fn db_setup_adopts_an_existing_message_store_and_its_messages() {
    let pg = PgServer::start();
    let migration =
        include_str!("../../host/src/store/sql/postgres/migrations/001_message_store.sql");
    pg.psql(migration);
    pg.psql("DROP FUNCTION message_store.get_category_messages(varchar, bigint, bigint, varchar, bigint, bigint, varchar)");
    pg.psql("CREATE FUNCTION message_store.get_category_messages(category_name varchar, \"position\" bigint DEFAULT 1, batch_size bigint DEFAULT 1000, correlation varchar DEFAULT NULL, consumer_group_member bigint DEFAULT NULL, consumer_group_size bigint DEFAULT NULL, condition varchar DEFAULT NULL) RETURNS SETOF message_store.message LANGUAGE sql AS 'SELECT NULL::message_store.message WHERE false'");
    pg.psql("SELECT message_store.write_message('5f1a3a4e-8a2c-4a8e-9d7e-2f4f1d7c9b10', 'shop::order-1', 'Placed', '{\"n\": 1}', '{}')");
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &pg.config());
    let out = host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(0)
        .stdout();
    assert!(out.contains("applied migration 2: protean"), "{out}");
    assert!(out.contains("applied migration 3: fences"), "{out}");
    let kept =
        pg.psql("SELECT proargnames[1] FROM pg_proc WHERE proname = 'get_category_messages'");
    assert_eq!(kept, "category_name", "the install's own function is kept");
    let store = PostgresStore::open(&pg.store_config()).unwrap();
    let stored = store.read_stream("shop::order-1", 0).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].id, "5f1a3a4e-8a2c-4a8e-9d7e-2f4f1d7c9b10",
        "no headers.id: the row's id"
    );
}

/// Shipments so far; 0 while the database is away (the test's own pool reconnects like the host's).
fn shipped(store: &dyn Store) -> usize {
    store
        .read_categories(&["fulfilment::order".into()], 0, usize::MAX)
        .map(|all| {
            all.iter()
                .filter(|m| m.message_type == "Fulfilment.OrderShipped.v1")
                .count()
        })
        .unwrap_or(0)
}

/// Each event-store subscription's lease owner, as `pid-suffix`.
fn owners(pg: &PgServer) -> BTreeMap<String, String> {
    pg.psql("SELECT name || '=' || owner FROM protean.leases WHERE expires_at > clock_timestamp()")
        .lines()
        .filter_map(|l| l.split_once('=').map(|(a, b)| (a.to_owned(), b.to_owned())))
        .collect()
}

/// Every order was placed once: as many `OrderPlaced` events as orders.
fn placed_once(store: &dyn Store, total: usize) {
    let placed = count_of(store, "fulfilment::order", "Fulfilment.OrderPlaced.v1");
    assert_eq!(placed, total, "one OrderPlaced per order");
}

/// Two replicas sharing one PostgreSQL store (no broker), with their leases and the database.
struct Running {
    pg: PgServer,
    store: Arc<PostgresStore>,
    dir: tempfile::TempDir,
    replicas: Vec<crate::support::Server>,
}

/// `orders` sent, two replicas started with leases of `lease_ttl_ms`, and the first order shipped.
fn two_replicas_shipping(lease_ttl_ms: u64, orders: usize) -> Running {
    let pg = PgServer::start();
    let store = Arc::new(PostgresStore::connect(&pg.store_config()).unwrap());
    store.setup().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!(
            "[server]\nmessages_per_tick = 20\nlease_ttl_ms = {lease_ttl_ms}\npoll_interval_ms = 100\n{}",
            pg.config()
        ),
    );
    send_orders(dir.path(), 0, orders);
    let replicas = start_replicas(dir.path(), 2);
    wait_until(Duration::from_secs(60), "the first shipments", || {
        shipped(store.as_ref()) > 0
    });
    Running {
        pg,
        store,
        dir,
        replicas,
    }
}

#[test]
fn two_replicas_share_one_store_without_a_broker_survive_a_kill_and_a_database_restart() {
    let total = 300;
    let Running {
        mut pg,
        store,
        dir,
        mut replicas,
    } = two_replicas_shipping(1500, total);
    let leased = owners(&pg);
    assert!(
        leased.len() >= 4,
        "every event-store subscription has one owner: {leased:?}"
    );
    let pids: Vec<String> = replicas.iter().map(|r| r.pid().to_string()).collect();
    for owner in leased.values() {
        assert!(
            pids.iter().any(|p| owner.starts_with(&format!("{p}-"))),
            "{owner} is a live replica"
        );
    }
    // Kill the replica that owns the most subscriptions: the other must take them over.
    let victim = (0..2)
        .max_by_key(|i| {
            leased
                .values()
                .filter(|o| o.starts_with(&format!("{}-", pids[*i])))
                .count()
        })
        .unwrap();
    let taken_over: Vec<&String> = leased
        .iter()
        .filter(|(_, o)| o.starts_with(&format!("{}-", pids[victim])))
        .map(|(n, _)| n)
        .collect();
    assert!(
        !taken_over.is_empty(),
        "the victim owns subscriptions: {leased:?}"
    );
    replicas[victim].signal(libc::SIGKILL);
    let survivor = replicas.remove(1 - victim);
    drop(replicas);
    wait_until(
        Duration::from_secs(60),
        "a third of the orders shipped",
        || shipped(store.as_ref()) > total / 3,
    );
    pg.restart();
    // Orders sent after the restart must be handled too: the host carried on, whatever was in flight.
    let late = 100;
    send_orders(dir.path(), total, late);
    let total = total + late;
    wait_until(Duration::from_secs(120), "every order shipped", || {
        shipped(store.as_ref()) >= total
    });
    survivor.signal(libc::SIGTERM);
    let (code, logs) = survivor.wait();
    assert_eq!(code, Some(0), "{logs}");
    each_order_exactly_once(store.as_ref(), total);
    for name in taken_over {
        // Field formats of the two log lines: `subscription="NAME"` (lease) and `subscription=NAME ` (batch).
        let lines: Vec<&str> = logs.lines().collect();
        let taken = lines.iter().position(|l| {
            l.contains("lease taken") && l.contains(&format!("subscription=\"{name}\""))
        });
        let first_batch = lines.iter().position(|l| {
            l.contains("batch committed") && l.contains(&format!("subscription={name} "))
        });
        let taken = taken.unwrap_or_else(|| panic!("the survivor took over {name}:\n{logs}"));
        assert!(
            first_batch.is_none_or(|b| b > taken),
            "{name} ran on the survivor only after it took the lease"
        );
    }
    placed_once(store.as_ref(), total);
}

/// The fencing token recorded for each leased name (see `host/src/ownership.rs`).
fn fences(pg: &PgServer) -> BTreeMap<String, u64> {
    pg.psql("SELECT name || '=' || token FROM protean.fences")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(name, token)| (name.to_owned(), token.trim().parse().unwrap()))
        .collect()
}

/// A lease owner frozen (SIGSTOP) under load, most likely with a batch between its read and its commit,
/// wakes after the other replica took its subscriptions over: whatever it had in flight must not commit
/// (the takeover raised the store's fence above its token), and every order is shipped exactly once.
#[test]
fn a_frozen_lease_owner_that_wakes_after_a_takeover_commits_nothing_stale() {
    let total = 400;
    let Running {
        pg,
        store,
        dir,
        mut replicas,
    } = two_replicas_shipping(1000, total);
    let leased = owners(&pg);
    let pids: Vec<String> = replicas.iter().map(|r| format!("{}-", r.pid())).collect();
    let victim = (0..2)
        .max_by_key(|i| leased.values().filter(|o| o.starts_with(&pids[*i])).count())
        .unwrap();
    let frozen: Vec<String> = leased
        .iter()
        .filter(|(_, o)| o.starts_with(&pids[victim]))
        .map(|(n, _)| n.clone())
        .collect();
    let before = fences(&pg);
    replicas[victim].signal(libc::SIGSTOP);
    // Orders sent while it is frozen: only the survivor can ship them, once it took every lease over.
    let late = 100;
    send_orders(dir.path(), total, late);
    let total = total + late;
    wait_until(
        Duration::from_secs(120),
        "the survivor shipped every order",
        || shipped(store.as_ref()) >= total,
    );
    // Shipping may not need all of them: wait for the takeover of the rest too.
    wait_until(
        Duration::from_secs(30),
        "the survivor took every lease over",
        || {
            let now = owners(&pg);
            frozen
                .iter()
                .all(|n| now.get(n).is_some_and(|o| o.starts_with(&pids[1 - victim])))
        },
    );
    // A new owner raises the fence with its first commit, which can come after it took the lease: wait
    // for it (the late orders give every subscription something to commit).
    wait_until(
        Duration::from_secs(30),
        &format!("every takeover to raise its fence (before: {before:?})"),
        || {
            let after = fences(&pg);
            frozen.iter().all(|n| after.get(n) > before.get(n))
        },
    );
    replicas[victim].signal(libc::SIGCONT);
    replicas[victim].wait_for(&["lease lost"], Duration::from_secs(30));
    let survivor = replicas.remove(1 - victim);
    let victim = replicas.remove(0);
    survivor.stop_cleanly();
    victim.stop_cleanly();
    each_order_exactly_once(store.as_ref(), total);
    placed_once(store.as_ref(), total);
}

#[test]
fn with_redis_the_outbox_publishes_from_postgres_and_the_flow_runs_on_streams() {
    let redis = RedisServer::start();
    let (store, _pg) = postgres();
    let config = format!("{TEST_CONFIG}{}", redis.config());
    let engine = engine(sample_domain(), "domain", store.clone(), &config);
    for n in 0..20 {
        engine
            .send("Fulfilment.PlaceOrder.v1", &place(n), None)
            .unwrap();
    }
    let report = engine.run().unwrap();
    assert_eq!(report.outcome, protean_host::engine::Outcome::Quiescent);
    each_order_exactly_once(store.as_ref(), 20);
    let outbox = store.outbox().unwrap().counts(1).unwrap();
    assert_eq!(
        (outbox.pending, outbox.failing),
        (0, 0),
        "everything published"
    );
    let pending = redis.cli(&["XPENDING", "fulfilment::order", "inventory"]);
    assert!(
        pending.starts_with("0\n"),
        "nothing left pending: {pending}"
    );
}

/// A replica killed while it holds the subscriptions' leases leaves them held until they expire. Test
/// mode started meanwhile must wait and finish the work, not call a subscription that a dead replica
/// "runs" done (it did, and exited 0 with nothing handled).
#[test]
fn test_mode_waits_out_a_dead_replicas_leases_and_finishes_the_work() {
    let pg = PgServer::start();
    PostgresStore::connect(&pg.store_config())
        .unwrap()
        .setup()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!("[server]\nlease_ttl_ms = 3000\n{}", pg.config()),
    );
    let replica = start_replicas(dir.path(), 1).remove(0);
    wait_until(Duration::from_secs(30), "the replica's leases", || {
        owners(&pg).len() >= 4
    });
    replica.signal(libc::SIGKILL);
    replica.wait();
    send_orders(dir.path(), 0, 20);
    assert!(
        !owners(&pg).is_empty(),
        "the dead replica's leases still hold"
    );
    let lib = sample_domain().display().to_string();
    host(dir.path())
        .args(["--domain", &lib, "--test-mode"])
        .output()
        .expect_code(0);
    let store = PostgresStore::open(&pg.store_config()).unwrap();
    each_order_exactly_once(&store, 20);
}

/// A server learns of messages another process appends as they commit, not at its next poll: with a
/// poll of ten minutes, orders sent by `send` (another process) while it idles ship in seconds. The
/// first order ships before the rest are sent, so the server has read and gone idle by then.
#[test]
fn appends_by_another_process_wake_an_idle_server_at_once() {
    let (store, pg) = postgres();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!("[server]\npoll_interval_ms = 600000\n{}", pg.config()),
    );
    let _server = start_replicas(dir.path(), 1);
    send_orders(dir.path(), 0, 1);
    wait_until(Duration::from_secs(60), "the first order shipped", || {
        shipped(store.as_ref()) == 1
    });
    send_orders(dir.path(), 1, 5);
    wait_until(Duration::from_secs(60), "every order shipped", || {
        shipped(store.as_ref()) == 6
    });
    each_order_exactly_once(store.as_ref(), 6);
}
