//! The real binary as a server: signals, crashes, exit codes, configuration files and log formats.

use std::{path::Path, time::Duration};

use protean_host::store::{SqliteStore, Store};
use serde_json::{json, Value};

use crate::support::{
    count_of, each_order_exactly_once, fixture_domain, host, orders, sample_domain, send_orders,
    Server,
};

const LIMIT: Duration = Duration::from_secs(60);

/// A server of the sample domain on a store of its own, started.
fn sample_server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = host(dir.path())
        .args(["--domain"])
        .args([sample_domain()])
        .spawn();
    server.wait_for(&["engine started"], LIMIT);
    (dir, server)
}

fn store(dir: &Path) -> SqliteStore {
    SqliteStore::open(&dir.join(".protean/store.db")).unwrap()
}

fn probe(dir: &Path, id: &str, behaviour: &str) {
    let lib = format!("{}:probe", fixture_domain().display());
    let data = json!({ "id": id, "behaviour": behaviour }).to_string();
    host(dir)
        .args(["send", "--domain", &lib, "Probe.Run.v1", &data])
        .output()
        .expect_code(0);
}

#[test]
fn killed_mid_run_then_restarted_every_order_ships_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        "[server]\nmessages_per_tick = 2\n",
    )
    .unwrap();
    let lib = sample_domain().display().to_string();
    let sent = host(dir.path())
        .args(["send", "--domain", &lib, "Fulfilment.PlaceOrder.v1", "-"])
        .output_with_stdin(&orders(0, 300))
        .expect_code(0);
    assert_eq!(sent.stdout().lines().count(), 300);

    let mut server = host(dir.path()).args(["--domain", &lib]).spawn();
    server.wait_for(
        &[
            "batch committed",
            "subscription=commands:fulfilment::payment",
        ],
        LIMIT,
    );
    server.signal(libc::SIGKILL);
    let (code, _) = server.wait();
    assert_eq!(code, None, "killed by a signal");
    let shipped_before = count_of(
        &store(dir.path()),
        "fulfilment::order",
        "Fulfilment.OrderShipped.v1",
    );
    assert!(
        shipped_before < 300,
        "the kill landed mid-run ({shipped_before} shipped)"
    );

    let run = host(dir.path())
        .args(["--domain", &lib, "--test-mode"])
        .output()
        .expect_code(0);
    assert!(run.stdout().contains("completed"), "{}", run.stdout());
    let store = store(dir.path());
    each_order_exactly_once(&store, 300);
    for i in 0..300 {
        let summary: Value = serde_json::from_str(
            &store
                .document("order_summaries", &format!("o{i}"))
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(summary["status"], "shipped");
    }
    assert!(store.dead_letters(None).unwrap().is_empty());
}

#[test]
fn each_signal_stops_the_server_cleanly() {
    for (signal, name) in [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
    ] {
        let (_dir, server) = sample_server();
        server.signal(signal);
        let (code, logs) = server.wait();
        assert_eq!(code, Some(0), "{name}:\n{logs}");
        assert!(
            logs.contains(&format!("shutting down signal=\"{name}\"")),
            "{name}:\n{logs}"
        );
        assert!(logs.contains("engine stopped"), "{name}:\n{logs}");
    }
}

#[test]
fn a_second_signal_is_ignored_and_the_batch_in_flight_commits() {
    let dir = tempfile::tempdir().unwrap();
    probe(dir.path(), "slow", "sleep:1500");
    let lib = format!("{}:probe", fixture_domain().display());
    let mut server = host(dir.path()).args(["--domain", &lib]).spawn();
    server.wait_for(&["probe slow attempt 1"], LIMIT);
    server.signal(libc::SIGTERM);
    server.wait_for(&["shutting down"], LIMIT);
    server.signal(libc::SIGINT);
    let (code, logs) = server.wait();
    assert_eq!(code, Some(0), "{logs}");
    assert!(
        logs.contains("already shutting down; signal ignored signal=\"SIGINT\""),
        "{logs}"
    );
    assert_eq!(
        store(dir.path())
            .read_stream("probe::probe-slow", 0)
            .unwrap()
            .len(),
        1,
        "the in-flight batch committed"
    );
}

#[test]
fn the_grace_period_bounds_the_wait_and_nothing_half_done_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        "[server]\nshutdown_grace_seconds = 1\n",
    )
    .unwrap();
    probe(dir.path(), "stuck", "sleep:20000");
    let lib = format!("{}:probe", fixture_domain().display());
    let mut server = host(dir.path()).args(["--domain", &lib]).spawn();
    server.wait_for(&["probe stuck attempt 1"], LIMIT);
    server.signal(libc::SIGTERM);
    let (code, logs) = server.wait();
    assert_eq!(code, Some(0), "{logs}");
    assert!(logs.contains("shutdown grace period over"), "{logs}");
    assert!(
        logs.contains("commands:probe::probe (handling a batch)"),
        "names what was busy:\n{logs}"
    );
    let store = store(dir.path());
    assert!(
        store
            .read_stream("probe::probe-stuck", 0)
            .unwrap()
            .is_empty(),
        "the unfinished batch committed nothing"
    );
    assert_eq!(
        store.position("commands:probe::probe").unwrap(),
        None,
        "so it is redelivered on the next start"
    );
}

#[test]
fn test_mode_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let lib = sample_domain().display().to_string();
    send_orders(dir.path(), 0, 3);
    let done = host(dir.path())
        .args(["--domain", &lib, "--test-mode"])
        .output()
        .expect_code(0);
    assert!(
        done.stdout()
            .contains("written        3  Fulfilment.OrderShipped.v1"),
        "{}",
        done.stdout()
    );

    let empty = host(dir.path())
        .args(["--test-mode", "--domain"])
        .args([format!("{}:empty", fixture_domain().display())])
        .output()
        .expect_code(0);
    assert!(
        empty
            .stderr()
            .contains("the domain has no handlers; nothing to run"),
        "{}",
        empty.stderr()
    );

    let slow = tempfile::tempdir().unwrap();
    std::fs::write(
        slow.path().join("protean.toml"),
        "[server]\ntest_mode_timeout_seconds = 1\n",
    )
    .unwrap();
    probe(slow.path(), "slow", "sleep:3000");
    let lib = format!("{}:probe", fixture_domain().display());
    let timed_out = host(slow.path())
        .args(["--domain", &lib, "--test-mode"])
        .output()
        .expect_code(1);
    assert!(
        timed_out
            .stdout()
            .contains("timed out; still busy: commands:probe::probe (handling a batch)"),
        "{}",
        timed_out.stdout()
    );
}

#[test]
fn timings_say_where_each_subscriptions_time_went() {
    let dir = tempfile::tempdir().unwrap();
    probe(dir.path(), "slow", "sleep:400");
    probe(dir.path(), "quick", "ok");
    let lib = format!("{}:probe", fixture_domain().display());
    let run = host(dir.path())
        .args(["--domain", &lib, "--test-mode", "--timings"])
        .output()
        .expect_code(0);
    let out = run.stdout();
    let table = out
        .split_once("time by subscription (ms, share):\n")
        .map(|(_, table)| table)
        .unwrap_or_else(|| panic!("no timings after the summary:\n{out}"));
    let line = table
        .lines()
        .find(|l| l.starts_with("  commands:probe::probe: "))
        .unwrap_or_else(|| panic!("no line for the probe's subscription:\n{out}"));
    // The handler slept 400 ms: that time is the handler call's, and the busiest phase.
    let (phase, ms) = line
        .split_once(": ")
        .and_then(|(_, phases)| phases.split(", ").next())
        .and_then(|first| {
            let mut words = first.split_whitespace();
            Some((words.next()?, words.next()?.parse::<u64>().ok()?))
        })
        .unwrap_or_else(|| panic!("unreadable line {line:?}"));
    assert_eq!(phase, "handle", "{line}");
    assert!(ms >= 400, "{line}");
    assert!(line.contains("commit "), "{line}");

    let without = host(dir.path())
        .args(["--domain", &lib, "--test-mode"])
        .output()
        .expect_code(0);
    assert!(!without.stdout().contains("time by subscription"));
}

#[test]
fn bad_configuration_files_name_the_key_and_exit_one() {
    let lib = sample_domain().display().to_string();
    let cases = [
        ("[server]\nmax_retrys = 3\n", "error: config file protean.toml: server.max_retrys: unknown field `max_retrys`, expected one of"),
        ("[server]\nmessages_per_tick = 0\n", "error: config file protean.toml: server.messages_per_tick: must be at least 1"),
        ("[store]\npath = \"${NO_SUCH_VAR}\"\n", "error: config file protean.toml: store.path: environment variable NO_SUCH_VAR is not set; set it or write ${NO_SUCH_VAR|default}"),
        ("[server\n", "error: config file protean.toml, line 1: "),
    ];
    for (text, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("protean.toml"), text).unwrap();
        let run = host(dir.path())
            .args(["--test-mode", "--domain", &lib])
            .output()
            .expect_code(1);
        let lines = run.error_lines();
        assert_eq!(lines.len(), 1, "{text:?}: {}", run.stderr());
        assert!(
            lines[0].starts_with(expected),
            "{text:?}:\n  got      {}\n  expected {expected}",
            lines[0]
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = host(dir.path())
        .args(["--test-mode", "--config", "nope.toml", "--domain", &lib])
        .output()
        .expect_code(1);
    assert!(
        missing.error_lines()[0].starts_with("error: cannot read config file nope.toml:"),
        "{}",
        missing.stderr()
    );
}

#[test]
fn json_logs_are_one_object_per_line_and_debug_shows_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let lib = sample_domain().display().to_string();
    send_orders(dir.path(), 0, 1);
    let run = host(dir.path())
        .args([
            "--domain",
            &lib,
            "--test-mode",
            "--debug",
            "--log-format",
            "json",
        ])
        .output()
        .expect_code(0);
    let records: Vec<Value> = run
        .stderr()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let message = |r: &Value| r["message"].as_str().unwrap_or_default().to_owned();
    assert!(records
        .iter()
        .any(|r| message(r) == "resolved configuration"
            && r["config"]
                .as_str()
                .unwrap()
                .contains("sqlite:.protean/store.db")));
    assert!(records
        .iter()
        .any(|r| message(r) == "handled" && r["level"] == "DEBUG"));
    assert!(records
        .iter()
        .any(|r| message(r) == "batch committed" && r["level"] == "INFO"));
    assert!(records
        .iter()
        .any(|r| r["target"] == "plugin" && message(r) == "order o0 shipped"));
}

#[test]
fn send_reports_bad_input_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let lib = sample_domain().display().to_string();
    let not_json = host(dir.path())
        .args([
            "send",
            "--domain",
            &lib,
            "Fulfilment.PlaceOrder.v1",
            "{nope",
        ])
        .output()
        .expect_code(1);
    assert!(
        not_json.error_lines()[0]
            .starts_with("error: the command data is not JSON; pass an object like"),
        "{}",
        not_json.stderr()
    );
    let unknown = host(dir.path())
        .args(["send", "--domain", &lib, "Fulfilment.Nope.v1", "{}"])
        .output()
        .expect_code(1);
    assert!(unknown.error_lines()[0].contains("no command handler handles Fulfilment.Nope.v1; commands of this domain: Fulfilment.CancelOrder.v1, Fulfilment.PlaceOrder.v1"), "{}", unknown.stderr());
    let bad_line = host(dir.path())
        .args(["send", "--domain", &lib, "Fulfilment.ShipOrder.v1", "-"])
        .output_with_stdin("{\"order_id\": \"a\"}\n[1]\n")
        .expect_code(1);
    assert_eq!(
        bad_line.stdout().lines().count(),
        1,
        "the line before the bad one was sent"
    );
    assert!(
        bad_line.error_lines()[0].contains("(stdin line 2)"),
        "{}",
        bad_line.stderr()
    );
    let deadline = host(dir.path())
        .args([
            "send",
            "--domain",
            &lib,
            "--deadline",
            "tomorrow",
            "Fulfilment.ShipOrder.v1",
            "{}",
        ])
        .output()
        .expect_code(1);
    assert!(
        deadline.error_lines()[0].contains("--deadline \"tomorrow\" is not an RFC 3339 time"),
        "{}",
        deadline.stderr()
    );
}

/// CPU time (user + system) of a process so far, from /proc, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th of them.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The allocator gives memory back on a thread of its own (`host/src/allocator.rs`), not inside a
/// call that handles a message; and it took its options without a word (jemalloc says
/// `<jemalloc>: Invalid conf` on stderr, and goes on without, when it cannot read them). The idle test
/// below keeps that thread honest.
#[test]
fn the_allocator_returns_memory_on_a_thread_of_its_own() {
    let (_dir, server) = sample_server();
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect();
    server.signal(libc::SIGTERM);
    let (code, output) = server.wait();
    assert_eq!(code, Some(0), "{output}");
    assert!(
        names.iter().any(|n| n == "jemalloc_bg_thd"),
        "no allocator thread among {names:?}"
    );
    assert!(!output.contains("<jemalloc>"), "{output}");
}

#[test]
fn an_idle_server_does_not_spin() {
    let (_dir, server) = sample_server();
    let before = cpu_ticks(server.pid());
    // The observation window itself: eight subscriptions sit idle for three poll intervals.
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(server.pid()) - before;
    assert!(
        used <= 5,
        "an idle server used {used} ticks (1/100 s) of CPU in 3 s"
    );
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait().0, Some(0));
}
