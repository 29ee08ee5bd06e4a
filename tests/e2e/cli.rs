//! The command line itself: help, version, usage errors, inspect output.

use serde_json::Value;

use crate::support::{
    bad_build, fixture_domain, host, sample_domain, BadBuild, Finished, PgServer, RedisServer,
    TEST_CONFIG,
};

#[test]
fn help_and_version_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let help = host(dir.path()).args(["--help"]).output().expect_code(0);
    assert!(help.stdout().contains("--domain"), "{}", help.stdout());
    assert!(help.stdout().contains("inspect"));
    let version = host(dir.path()).args(["--version"]).output().expect_code(0);
    assert!(
        version.stdout().starts_with("protean-host 0.1.0"),
        "{}",
        version.stdout()
    );
}

/// The binary allocates with jemalloc, and its large blocks (768 KiB and more) come from the arena that
/// returns them at once (`docs/performance-journal.md`, the seventh session: without it one 5 MB
/// message peaked at 4.6 times its size; `allocator.rs` says why 768 KiB).
/// jemalloc prints its options at exit when asked to by its environment variable.
#[test]
fn the_binary_allocates_with_jemalloc_returning_large_blocks_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let version = host(dir.path())
        .args(["--version"])
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .expect_code(0);
    assert!(
        version.stderr().contains("opt.oversize_threshold: 786432"),
        "{}",
        version.stderr()
    );
}

#[test]
fn usage_errors_exit_two_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--log-level", "loud"][..],
        &["--no-such-flag"],
        &["inspect", "--test-mode"],
        &["frobnicate"],
    ] {
        let run = host(dir.path()).args(args).output().expect_code(2);
        assert_eq!(run.error_lines().len(), 1, "{args:?}: {}", run.stderr());
    }
}

#[test]
fn inspect_lists_handlers_and_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path())
        .args(["inspect", "--domain"])
        .args([sample_domain()])
        .output()
        .expect_code(0);
    let out = run.stdout();
    assert!(out.contains("instance domain (selected)"), "{out}");
    assert!(out.contains("instance reporting"), "{out}");
    for needle in [
        "orders           command handler  fulfilment::order:command",
        "Fulfilment.PlaceOrder.v1",
        "fulfilment       process manager",
        "commands:fulfilment::order",
        "order_summary-fulfilment::payment",
        "totals-fulfilment::order",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
}

#[test]
fn inspect_json_is_machine_readable() {
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path())
        .args(["inspect", "--json", "--domain"])
        .args([sample_domain()])
        .output()
        .expect_code(0);
    let report: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    assert_eq!(report["selected"], "domain");
    let domain = &report["instances"][0];
    assert_eq!(domain["name"], "domain");
    let kinds: Vec<&str> = domain["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "command_handler",
            "command_handler",
            "event_handler",
            "event_handler",
            "process_manager",
            "projector"
        ]
    );
    let subscriptions = domain["subscriptions"].as_array().unwrap();
    let commands = subscriptions
        .iter()
        .find(|s| s["name"] == "commands:fulfilment::order")
        .unwrap();
    assert_eq!(commands["routes"]["Fulfilment.ShipOrder.v1"], "orders");
    assert_eq!(report["build_id"].as_str().unwrap().len(), 12);
}

/// The probe domain in a directory configured with `config`, and the real binary run in it with
/// global flags before the subcommand.
struct Probe {
    dir: tempfile::TempDir,
    domain: String,
}

impl Probe {
    fn new(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("protean.toml"), config).unwrap();
        let domain = format!("{}:probe", fixture_domain().display());
        Self { dir, domain }
    }

    fn run(&self, args: &[&str]) -> Finished {
        host(self.dir.path())
            .args(["--log-level", "warn", "--domain", &self.domain])
            .args(args)
            .output()
    }

    /// Send a command the probe rejects, and run the server in test mode.
    fn reject_one(&self) {
        let sent = self.run(&[
            "send",
            "Probe.Run.v1",
            r#"{"id": "bad", "behaviour": "reject"}"#,
        ]);
        assert_eq!(
            sent.expect_code(0).stdout().lines().count(),
            1,
            "the command's id"
        );
        self.run(&["--test-mode"]).expect_code(0);
    }

    /// The rows `dlq list --json` prints.
    fn dead_letters(&self) -> Vec<Value> {
        let listed = self.run(&["dlq", "list", "--json"]).expect_code(0);
        serde_json::from_str::<Value>(&listed.stdout())
            .unwrap_or_else(|e| panic!("{e}: {}", listed.stdout()))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

const COMMANDS: &str = "commands:probe::probe";

/// `inspect` loads a build in a probe process first: one that aborts or hangs while loading is one
/// error line and exit 1, not a crash of `inspect` itself (exit 134).
#[test]
fn inspect_of_a_build_that_crashes_or_hangs_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        "[server]\nprobe_timeout_seconds = 3\n",
    )
    .unwrap();
    for which in BadBuild::ALL {
        let lib = bad_build(which);
        for json in [&[][..], &["--json"]] {
            let run = host(dir.path())
                .args(["inspect", "--domain"])
                .args([lib])
                .args(json)
                .output()
                .expect_code(1);
            assert_eq!(run.stdout(), "", "{which:?}: nothing is described");
            assert_eq!(
                run.stderr().lines().count(),
                1,
                "{which:?}: {}",
                run.stderr()
            );
            assert!(
                run.stderr()
                    .starts_with(&format!("error: {}: {}", lib.display(), which.refusal())),
                "{which:?}: {}",
                run.stderr()
            );
        }
    }
}

/// Every subcommand, with global flags before it, on one store configuration (`store`: a `[store]`
/// section, or none for SQLite), with or without Redis. Returns the rows `dlq list --json` printed.
fn every_command(store: &str, redis: Option<&RedisServer>, postgres: bool) -> Vec<Value> {
    let broker = redis.map(RedisServer::config).unwrap_or_default();
    let probe = Probe::new(&format!("{TEST_CONFIG}{store}{broker}"));
    let run = |args: &[&str]| probe.run(args);
    if postgres {
        run(&["db", "setup"]).expect_code(0);
        run(&["db", "status"]).expect_code(0);
    } else {
        let db = run(&["db", "status"]).expect_code(1);
        assert!(db.stderr().contains("not PostgreSQL"), "{}", db.stderr());
    }
    run(&["inspect"]).expect_code(0);
    probe.reject_one();
    run(&["subscriptions", "status"]).expect_code(0);
    let rows = probe.dead_letters();
    let Some(id) = rows.first().map(|r| r["id"].as_str().unwrap().to_owned()) else {
        let missing = run(&["dlq", "inspect", "1", "--subscription", COMMANDS]).expect_code(1);
        assert_eq!(missing.error_lines().len(), 1, "{}", missing.stderr());
        run(&["dlq", "purge", "--subscription", COMMANDS, "--yes"]).expect_code(0);
        return rows;
    };
    run(&["dlq", "inspect", &id, "--subscription", COMMANDS]).expect_code(0);
    // The probe rejects it again: exit 1, one line, and a new dead letter in its place.
    let again = run(&["dlq", "replay", &id, "--subscription", COMMANDS]).expect_code(1);
    assert_eq!(again.error_lines().len(), 1, "{}", again.stderr());
    assert_eq!(probe.dead_letters().len(), 1, "dead-lettered anew");
    run(&["dlq", "replay-all", "--subscription", COMMANDS]).expect_code(1);
    run(&["dlq", "purge", "--subscription", COMMANDS, "--yes"]).expect_code(0);
    assert!(probe.dead_letters().is_empty(), "purged");
    rows
}

/// The dead-letter commands on a broker's dead-letter stream (the probe's runner reads Redis), with
/// the store `store` beside it: a replay goes back to the group, whose next run rejects it again.
fn broker_dead_letters(store: &str, postgres: bool) {
    let redis = RedisServer::start();
    let probe = Probe::new(&format!(
        "{TEST_CONFIG}{store}{}[server.handlers.runner]\nsubscription_type = \"stream\"\n",
        redis.config()
    ));
    if postgres {
        probe.run(&["db", "setup"]).expect_code(0);
    }
    probe.reject_one();
    let rows = probe.dead_letters();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let id = rows[0]["id"].as_str().unwrap().to_owned();
    let inspected = probe
        .run(&["dlq", "inspect", &id, "--subscription", COMMANDS])
        .expect_code(0);
    assert!(inspected.stdout().contains(&id), "{}", inspected.stdout());
    probe
        .run(&["dlq", "replay", &id, "--subscription", COMMANDS])
        .expect_code(0);
    assert!(probe.dead_letters().is_empty(), "back to its group");
    probe.run(&["--test-mode"]).expect_code(0);
    assert_eq!(probe.dead_letters().len(), 1, "rejected again");
    let unconfirmed = probe
        .run(&["dlq", "replay-all", "--subscription", COMMANDS])
        .expect_code(1);
    assert_eq!(
        unconfirmed.error_lines().len(),
        1,
        "{}",
        unconfirmed.stderr()
    );
    probe
        .run(&["dlq", "replay-all", "--subscription", COMMANDS, "--yes"])
        .expect_code(0);
    probe.run(&["--test-mode"]).expect_code(0);
    assert_eq!(probe.dead_letters().len(), 1, "rejected once more");
    probe
        .run(&["dlq", "purge", "--subscription", COMMANDS, "--yes"])
        .expect_code(0);
    assert!(probe.dead_letters().is_empty(), "purged");
}

#[test]
fn every_command_works_on_every_store_with_and_without_redis() {
    let pg = PgServer::start();
    let memory = "[store]\nprovider = \"memory\"\n";
    for redis in [None, Some(RedisServer::start())] {
        let with = if redis.is_some() {
            "with Redis"
        } else {
            "alone"
        };
        let rows = every_command(memory, redis.as_ref(), false);
        assert!(rows.is_empty(), "memory {with}: nothing survives a process");
        let rows = every_command("", redis.as_ref(), false);
        assert_eq!(rows.len(), 1, "sqlite {with}: {rows:?}");
        pg.psql(
            "DROP SCHEMA IF EXISTS protean CASCADE; DROP SCHEMA IF EXISTS message_store CASCADE;",
        );
        let rows = every_command(&pg.config(), redis.as_ref(), true);
        assert_eq!(rows.len(), 1, "postgres {with}: {rows:?}");
    }
}

/// With Redis, a handler that reads a stream keeps its dead letters in the broker: the same commands
/// work on them beside every store that keeps what `send` wrote (a memory store does not outlive the
/// `send` process, so nothing reaches the broker from it).
#[test]
fn dead_letter_commands_work_on_broker_dead_letters_beside_every_store() {
    broker_dead_letters("", false);
    let pg = PgServer::start();
    broker_dead_letters(&pg.config(), true);
}
