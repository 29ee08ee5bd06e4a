//! Redis Streams with a real Redis server: the flow, retries, dead letters, poison, and several
//! replicas sharing the work, one of them killed, Redis restarted.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use protean_host::{
    broker::{BrokerConfig, Consumer, GroupStart},
    engine::Outcome,
    message,
    store::Store,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::support::{
    count_of, each_order_exactly_once, engine, fixture_domain, host, idle_runs, place,
    sample_domain, send_orders, sqlite, start_replicas, wait_until, RedisServer, TEST_CONFIG,
};

fn config(redis: &RedisServer) -> String {
    config_with(redis, "")
}

/// [`config`] with more `[server]` settings.
fn config_with(redis: &RedisServer, server: &str) -> String {
    // The probe's commands on Redis: these tests are about stream subscriptions (commands read the
    // store by default).
    format!(
        "{TEST_CONFIG}{server}{}[server.handlers.runner]\nsubscription_type = \"stream\"\n",
        redis.config()
    )
}

/// The sample flow of `orders` orders, run in test mode on `redis` and a fresh SQLite store: the
/// store (with the directory that keeps it) and the run's report.
fn run_flow(
    redis: &RedisServer,
    orders: usize,
) -> (
    tempfile::TempDir,
    Arc<dyn Store>,
    protean_host::engine::RunReport,
) {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    let engine = engine(sample_domain(), "domain", store.clone(), &config(redis));
    for n in 0..orders {
        engine
            .send("Fulfilment.PlaceOrder.v1", &place(n), None)
            .unwrap();
    }
    let report = engine.run().unwrap();
    (dir, store, report)
}

#[test]
fn the_whole_flow_runs_on_streams() {
    let redis = RedisServer::start();
    let (_dir, store, report) = run_flow(&redis, 50);
    assert_eq!(report.outcome, Outcome::Quiescent);
    assert_eq!(
        count_of(
            store.as_ref(),
            "fulfilment::order",
            "Fulfilment.OrderShipped.v1"
        ),
        50
    );
    assert_eq!(
        report.totals.published,
        50 * 7 - 50 + 50,
        "every message, the sent commands included, went through the outbox"
    );
    let outbox = store.outbox().unwrap().counts(1).unwrap();
    assert_eq!((outbox.pending, outbox.failing), (0, 0));
    let pending = redis.cli(&["XPENDING", "fulfilment::order", "inventory"]);
    assert!(
        pending.starts_with("0\n"),
        "nothing left pending: {pending}"
    );
    let entry = redis.cli(&["XRANGE", "fulfilment::order", "-", "+", "COUNT", "1"]);
    assert!(
        entry.contains("data") && entry.contains("\"event_store\""),
        "Protean's entry format: {entry}"
    );
}

/// Redis ends an empty blocking read only when its event loop next wakes (here at most once a second,
/// `--hz 1`), long after the read's `BLOCK`: a subscription whose block is over has found nothing new,
/// so test mode takes it as idle then, without waiting for Redis. Ten runs on an empty stream took
/// 2.9 s before, 0.3 s after.
#[test]
fn test_mode_ends_without_waiting_for_redis_to_end_an_empty_read() {
    let redis = RedisServer::start_with(&["--hz", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    let total = idle_runs("probe", &store, &config(&redis));
    assert!(
        total < Duration::from_millis(1500),
        "ten runs with nothing to do took {total:?}"
    );
}

/// The idle a blocked read reports must not end test mode early. With Redis at `--hz 1`, every hop of
/// the flow finds the subscriptions of the next one idle inside reads Redis holds for up to a second
/// while the outbox publishes to them; the run must still end with every order through the whole
/// flow exactly once, nothing pending in any group, and nothing left in the outbox. (What the outbox
/// publishes is also guarded by the published head an idle subscription reports: this holds even
/// with the broker backlog check removed, which guards entries other writers add.)
#[test]
fn a_cascade_is_not_cut_short_by_subscriptions_idle_inside_blocked_reads() {
    let redis = RedisServer::start_with(&["--hz", "1"]);
    let (_dir, store, report) = run_flow(&redis, 30);
    assert_eq!(report.outcome, Outcome::Quiescent);
    each_order_exactly_once(store.as_ref(), 30);
    let outbox = store.outbox().unwrap().counts(1).unwrap();
    assert_eq!((outbox.pending, outbox.failing), (0, 0));
    assert_eq!(redis.pending(), 0, "nothing pending in any group");
}

fn probe(
    store: &Arc<dyn Store>,
    redis: &RedisServer,
    behaviours: &[(&str, &str)],
) -> protean_host::engine::RunReport {
    probe_with(store, &config(redis), behaviours)
}

/// [`probe`] under `config`.
fn probe_with(
    store: &Arc<dyn Store>,
    config: &str,
    behaviours: &[(&str, &str)],
) -> protean_host::engine::RunReport {
    let engine = engine(fixture_domain(), "probe", store.clone(), config);
    for (id, behaviour) in behaviours {
        engine
            .send(
                "Probe.Run.v1",
                &json!({ "id": id, "behaviour": behaviour }),
                None,
            )
            .unwrap();
    }
    engine.run().unwrap()
}

fn ran(store: &dyn Store, id: &str) -> usize {
    store
        .read_stream(&format!("probe::probe-{id}"), 0)
        .unwrap()
        .len()
}

#[test]
fn a_retry_then_success_and_an_exhausted_message_in_the_dead_letter_stream() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    let report = probe(
        &store,
        &redis,
        &[("flaky", "fail:2"), ("doomed", "always"), ("after", "ok")],
    );
    assert_eq!(report.outcome, Outcome::Quiescent);
    let flaky: Value =
        serde_json::from_str(&store.read_stream("probe::probe-flaky", 0).unwrap()[0].data).unwrap();
    assert_eq!(flaky["attempts"], 3, "handled on the third delivery");
    assert_eq!(
        (ran(store.as_ref(), "doomed"), ran(store.as_ref(), "after")),
        (0, 1)
    );
    let dead = redis.cli(&["XRANGE", "commands:probe::probe:dlq", "-", "+"]);
    for field in [
        "original_stream",
        "probe::probe:command",
        "original_id",
        "group",
        "commands:probe::probe",
        "consumer",
        "error",
        "probe doomed always fails",
        "attempts",
        "failed_at",
    ] {
        assert!(
            dead.contains(field),
            "missing {field} in the dead letter:\n{dead}"
        );
    }
    assert_eq!(
        dead.matches("original_id").count(),
        1,
        "one dead letter:\n{dead}"
    );
    assert!(dead.contains("\n4\n"), "1 try + 3 retries:\n{dead}");
    let pending = redis.cli(&["XPENDING", "probe::probe:command", "commands:probe::probe"]);
    assert!(
        pending.starts_with("0\n"),
        "the dead letter was acknowledged: {pending}"
    );
}

#[test]
fn a_poison_entry_is_dead_lettered_at_once_and_the_rest_goes_on() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    // Groups exist once a first run has created them; then garbage arrives on the stream.
    probe(&store, &redis, &[("first", "ok")]);
    redis.cli(&["XADD", "probe::probe:command", "*", "data", "{not json"]);
    redis.cli(&["XADD", "probe::probe:command", "*", "other", "field"]);
    let report = probe(&store, &redis, &[("after", "ok")]);
    assert_eq!(report.totals.retries, 0);
    assert_eq!(ran(store.as_ref(), "after"), 1);
    let dead = redis.cli(&["XRANGE", "commands:probe::probe:dlq", "-", "+"]);
    assert!(dead.contains("entry data is not a JSON object"), "{dead}");
    assert!(dead.contains("entry has no text field `data`"), "{dead}");
}

/// A well-formed entry is read in one pass, its envelope and domain decoded on the way (the engine does
/// not parse its metadata again): it is verified all the same. Data that does not hash to its checksum,
/// and an envelope or a domain the engine refuses, are dead-lettered at once with the reason; the entry
/// beside them that verifies is handled.
#[test]
fn an_entry_that_fails_its_checksum_or_carries_a_bad_envelope_is_dead_lettered_at_once() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    probe(&store, &redis, &[("first", "ok")]);
    let genuine: Value = serde_json::from_str(&entry_data(&redis, "probe::probe:command")).unwrap();
    // Each a new command (its own stream, positions and id), made from the genuine entry.
    let made = |id: &str, n: u64, tamper: &dyn Fn(&mut Value)| {
        let mut entry = genuine.clone();
        entry["data"]["id"] = json!(id);
        entry["metadata"]["envelope"]["checksum"] = json!(message::checksum(&entry["data"]));
        entry["metadata"]["headers"]["id"] = json!(format!("made-{id}"));
        entry["metadata"]["headers"]["stream"] = json!(format!("probe::probe:command-{id}"));
        entry["metadata"]["event_store"] = json!({"global_position": 1000 + n, "position": 0});
        tamper(&mut entry);
        entry.to_string()
    };
    let entries = [
        made("tampered", 1, &|e| e["data"]["behaviour"] = json!("fail:1")),
        made("envelope", 2, &|e| e["metadata"]["envelope"] = json!("v1")),
        made("domain", 3, &|e| {
            e["metadata"]["domain"]["correlation_id"] = json!({"not": "a string"})
        }),
        made("sound", 4, &|_| {}),
    ];
    for entry in &entries {
        redis.cli(&["XADD", "probe::probe:command", "*", "data", entry]);
    }
    let report = probe(&store, &redis, &[]);
    assert_eq!(report.outcome, Outcome::Quiescent);
    assert_eq!(report.totals.retries, 0, "poison is never retried");
    assert_eq!(
        ran(store.as_ref(), "sound"),
        1,
        "the sound entry is handled"
    );
    for id in ["tampered", "envelope", "domain"] {
        assert_eq!(ran(store.as_ref(), id), 0, "{id} is not handled");
    }
    let dead = redis.cli(&["XRANGE", "commands:probe::probe:dlq", "-", "+"]);
    assert_eq!(dead.matches("original_id").count(), 3, "{dead}");
    assert_eq!(dead.matches("checksum mismatch").count(), 1, "{dead}");
    assert_eq!(
        dead.matches("metadata is not valid JSON").count(),
        2,
        "{dead}"
    );
    let pending = redis.cli(&["XPENDING", "probe::probe:command", "commands:probe::probe"]);
    assert!(
        pending.starts_with("0\n"),
        "nothing left pending: {pending}"
    );
}

/// The `data` field of the last entry of `stream`.
fn entry_data(redis: &RedisServer, stream: &str) -> String {
    let entries = redis.cli(&["XREVRANGE", stream, "+", "-", "COUNT", "1"]);
    let lines: Vec<&str> = entries.lines().collect();
    lines
        .iter()
        .position(|l| *l == "data")
        .and_then(|i| lines.get(i + 1))
        .unwrap_or_else(|| panic!("no data field in {entries}"))
        .to_string()
}

/// One entry per batch: every entry after the first is read, and decoded, while the batch before it
/// runs. Poison read that way is dead-lettered like poison read first.
#[test]
fn poison_read_ahead_is_dead_lettered_and_the_rest_goes_on() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    probe(&store, &redis, &[("first", "ok")]);
    for fields in [
        ["data", "{not json"],
        ["other", "field"],
        ["data", "[1, 2]"],
    ] {
        redis.cli(&["XADD", "probe::probe:command", "*", fields[0], fields[1]]);
    }
    let config = config_with(&redis, "messages_per_tick = 1\n");
    let report = probe_with(&store, &config, &[("a", "ok"), ("b", "ok"), ("c", "ok")]);
    assert_eq!(report.outcome, Outcome::Quiescent);
    assert_eq!(report.totals.retries, 0);
    for id in ["a", "b", "c"] {
        assert_eq!(ran(store.as_ref(), id), 1, "{id} ran once");
    }
    let dead = redis.cli(&["XRANGE", "commands:probe::probe:dlq", "-", "+"]);
    assert_eq!(
        dead.matches("entry data is not a JSON object").count(),
        2,
        "{dead}"
    );
    assert!(dead.contains("entry has no text field `data`"), "{dead}");
    let pending = redis.cli(&["XPENDING", "probe::probe:command", "commands:probe::probe"]);
    assert!(
        pending.starts_with("0\n"),
        "nothing left pending: {pending}"
    );
}

/// A message processed before comes back twice as new entries (an outbox that published it again,
/// its record lost), in one batch with a new message. New entries are handled without a marker lookup:
/// the commit refuses the processed message, and the batch runs again checked. Each command's effect
/// exists once in the store, and nothing is left pending or dead-lettered.
#[test]
fn a_processed_message_published_again_as_new_entries_has_its_effect_once() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    probe(&store, &redis, &[("a", "ok")]);
    let data = entry_data(&redis, "probe::probe:command");
    for _ in 0..2 {
        redis.cli(&["XADD", "probe::probe:command", "*", "data", &data]);
    }
    let report = probe(&store, &redis, &[("b", "ok")]);
    assert_eq!(report.outcome, Outcome::Quiescent);
    assert_eq!(ran(store.as_ref(), "a"), 1, "a's effect once");
    assert_eq!(ran(store.as_ref(), "b"), 1, "b's effect once");
    assert!(
        report.totals.skipped >= 2,
        "the copies of a: {:?}",
        report.totals
    );
    let pending = redis.cli(&["XPENDING", "probe::probe:command", "commands:probe::probe"]);
    assert!(pending.starts_with("0\n"), "nothing pending: {pending}");
    let dead = redis.cli(&["XLEN", "commands:probe::probe:dlq"]);
    assert_eq!(dead.trim(), "0", "nothing dead-lettered");
}

#[test]
fn three_replicas_share_the_work_survive_a_kill_and_a_redis_restart() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("[server]\nmessages_per_tick = 20\n{}", redis.config()),
    )
    .unwrap();
    let total = 10_000;
    send_orders(dir.path(), 0, total);
    let mut replicas = start_replicas(dir.path(), 3);
    let store = sqlite(dir.path());
    let shipped =
        |store: &dyn Store| count_of(store, "fulfilment::order", "Fulfilment.OrderShipped.v1");
    let placed =
        |store: &dyn Store| count_of(store, "fulfilment::order", "Fulfilment.OrderPlaced.v1");
    // Shipments come only once the commands subscription has read past every PlaceOrder (it reads the
    // store in order), so the kill and the restart are timed on placements: mid-work either way.
    wait_until(Duration::from_secs(60), "the first placements", || {
        placed(store.as_ref()) > 0
    });
    replicas[0].signal(libc::SIGKILL);
    wait_until(Duration::from_secs(180), "more placements", || {
        placed(store.as_ref()) > total / 3
    });
    redis.restart();
    wait_until(Duration::from_secs(300), "every order shipped", || {
        shipped(store.as_ref()) >= total
    });
    // Let the last entries settle (acknowledged, summaries written) before counting every effect.
    wait_until(Duration::from_secs(60), "an empty outbox", || {
        store.outbox().unwrap().counts(1).unwrap().pending == 0
    });
    for replica in replicas.drain(1..) {
        replica.signal(libc::SIGTERM);
        let (code, logs) = replica.wait();
        assert_eq!(code, Some(0), "{logs}");
    }
    each_order_exactly_once(store.as_ref(), total);
    let handled_by: Vec<String> = redis
        .cli(&["XINFO", "GROUPS", "fulfilment::order"])
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(
        handled_by.iter().any(|l| l == "inventory"),
        "{handled_by:?}"
    );
}

/// A stop mid-run finishes what the replica has read (including the batch it read ahead) and leaves
/// nothing pending on its consumers for another replica to wait for.
#[test]
fn a_stop_mid_run_leaves_nothing_pending_and_a_restart_finishes_exactly_once() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("[server]\nmessages_per_tick = 20\n{}", redis.config()),
    )
    .unwrap();
    let lib = sample_domain().display().to_string();
    let total = 2_000;
    send_orders(dir.path(), 0, total);
    stop_after_the_first_batch(dir.path(), &lib, &redis);
    let store = sqlite(dir.path());
    assert!(
        count_of(
            store.as_ref(),
            "fulfilment::order",
            "Fulfilment.OrderShipped.v1"
        ) < total,
        "the stop came after the work was done: nothing tested"
    );
    host(dir.path())
        .args(["--test-mode", "--domain", &lib])
        .output()
        .expect_code(0);
    each_order_exactly_once(store.as_ref(), total);
}

/// A dead letter the broker refuses, after its batch committed, stops nothing and loses nothing: the
/// batch's entries stay pending and come back, the handled ones acknowledged by their markers, the
/// failed one failing again, until the broker takes its dead letter. (It was a fatal error that
/// stopped the server.) An undecodable entry's dead letter, refused, comes back too.
#[test]
fn a_dead_letter_the_broker_refuses_is_written_once_it_takes_it_and_the_server_goes_on() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("protean.toml"), config(&redis)).unwrap();
    let lib = format!("{}:probe", fixture_domain().display());
    // The dead-letter stream's key holds a string: the broker refuses every dead letter (WRONGTYPE).
    let dlq = "commands:probe::probe:dlq";
    redis.cli(&["SET", dlq, "not a stream"]);
    let mut server = host(dir.path()).args(["--domain", &lib]).spawn();
    let commands: String = [("before", "ok"), ("doomed", "always"), ("after", "ok")]
        .iter()
        .map(|(id, behaviour)| json!({ "id": id, "behaviour": behaviour }).to_string() + "\n")
        .collect();
    host(dir.path())
        .args(["send", "--domain", &lib, "Probe.Run.v1", "-"])
        .output_with_stdin(&commands)
        .expect_code(0);
    let refused = ["broker unavailable", "XADD dead letter", "WRONGTYPE"];
    server.wait_for(&refused, Duration::from_secs(60));
    redis.cli(&["XADD", "probe::probe:command", "*", "data", "{not json"]);
    server.wait_for(&refused, Duration::from_secs(60));
    assert!(server.exited().is_none(), "the server goes on");
    let store = sqlite(dir.path());
    redis.cli(&["DEL", dlq]);
    wait_until(Duration::from_secs(60), "both dead letters written", || {
        redis.cli(&["XLEN", dlq]).trim() == "2"
    });
    wait_until(Duration::from_secs(30), "nothing pending", || {
        redis
            .cli(&["XPENDING", "probe::probe:command", "commands:probe::probe"])
            .starts_with("0\n")
    });
    let dead = redis.cli(&["XRANGE", dlq, "-", "+"]);
    assert_eq!(
        dead.matches("probe doomed always fails").count(),
        1,
        "{dead}"
    );
    assert_eq!(dead.matches("{not json").count(), 1, "{dead}");
    for (id, times) in [("before", 1), ("doomed", 0), ("after", 1)] {
        assert_eq!(ran(store.as_ref(), id), times, "{id}");
    }
    server.stop_cleanly();
}

/// A stop handles every batch a consumer read ahead while another ran, and what a read ended by the
/// stop was given, and leaves nothing pending: the commands are on the stream before the server
/// starts, read five at a time, and the signal comes once the first batch committed (the probe's
/// event handler, on a stream too, is then in a blocking read its events reach). A restart then runs
/// every command exactly once.
#[test]
fn a_stop_handles_every_batch_read_ahead_and_leaves_nothing_pending() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(&redis, "messages_per_tick = 5\n");
    std::fs::write(dir.path().join("protean.toml"), config).unwrap();
    let lib = format!("{}:probe", fixture_domain().display());
    let total = 1_000;
    let id = |i: usize| format!("c{i}");
    let commands: String = (0..total)
        .map(|i| json!({ "id": id(i), "behaviour": "ok" }).to_string() + "\n")
        .collect();
    host(dir.path())
        .args(["send", "--domain", &lib, "Probe.Run.v1", "-"])
        .output_with_stdin(&commands)
        .expect_code(0);
    // Published by a run without handlers: the consumer starts with all of them to read ahead.
    let publisher = format!("{}:empty", fixture_domain().display());
    host(dir.path())
        .args(["--test-mode", "--domain", &publisher])
        .output()
        .expect_code(0);
    let queued = redis.cli(&["XLEN", "probe::probe:command"]);
    assert_eq!(queued.trim(), total.to_string());
    stop_after_the_first_batch(dir.path(), &lib, &redis);
    let store = sqlite(dir.path());
    let handled = (0..total).filter(|i| ran(store.as_ref(), &id(*i)) > 0);
    assert!(
        handled.count() < total,
        "the stop came after the work was done: nothing tested"
    );
    host(dir.path())
        .args(["--test-mode", "--domain", &lib])
        .output()
        .expect_code(0);
    for i in 0..total {
        assert_eq!(ran(store.as_ref(), &id(i)), 1, "command {}", id(i));
    }
}

/// A consumer's blocking read ended by a stop: one Redis holds ends at once and empty, not at its
/// 30 s block, and one Redis has already given an entry returns that entry instead of leaving it
/// pending on a consumer that is going away.
#[test]
fn a_read_ended_by_a_stop_returns_what_redis_gave_it() {
    let redis = RedisServer::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let block = Duration::from_secs(30);
        let mut consumer = consumer(redis.uri(), block).await;

        {
            let stop = CancellationToken::new();
            let read = consumer.read(10, block, &stop);
            tokio::pin!(read);
            held(&redis, &mut read).await;
            stop.cancel();
            let stopped = Instant::now();
            let entries = read.await.expect("a held read ended by the stop");
            assert!(entries.is_empty(), "{entries:?}");
            assert!(
                stopped.elapsed() < Duration::from_secs(5),
                "waited out the block"
            );
        }

        let stop = CancellationToken::new();
        let id = {
            let read = consumer.read(10, block, &stop);
            tokio::pin!(read);
            held(&redis, &mut read).await;
            redis.cli(&["XADD", "s", "*", "data", "{}"]);
            // Given to the held read: pending on the consumer before the read's answer is taken.
            while !redis.cli(&["XPENDING", "s", "g"]).starts_with("1\n") {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop.cancel();
            let entries = read.await.expect("the answer Redis gave before the stop");
            assert_eq!(entries.len(), 1, "the entry given to the read comes back");
            entries[0].id.clone()
        };
        consumer.ack(&[("s".into(), id)]).await.unwrap();

        // A read asked for after the stop waits for nothing: there is no read to end.
        let unblocks = || {
            let stats = redis.cli(&["INFO", "commandstats"]);
            let line = stats
                .lines()
                .find(|l| l.starts_with("cmdstat_client|unblock:"));
            line.map(str::to_owned)
        };
        let before = unblocks();
        redis.cli(&["XADD", "s", "*", "data", "{}"]);
        let entries = consumer.read(10, block, &stop).await.unwrap();
        assert_eq!(entries.len(), 1, "what is there is read");
        assert_eq!(unblocks(), before, "nothing to unblock");
    });
}

/// A Redis user without the right to `CLIENT UNBLOCK` (or to `CLIENT` at all) cannot end a held read
/// early: a stop then takes the read's own answer at its block, so that nothing the read was given is
/// left pending. A user that may not ask its connection's id is not asked again before every read.
#[test]
fn without_the_right_to_unblock_a_stop_takes_the_reads_answer_at_its_block() {
    let redis = RedisServer::start();
    let rights: [&[&str]; 2] = [&["-client", "+client|id"], &["-client"]];
    for (user, rights) in ["may-ask-its-id", "may-not"].into_iter().zip(rights) {
        let grant = ["ACL", "SETUSER", user, "on", ">secret", "~*", "&*", "+@all"];
        redis.cli(&[&grant[..], rights].concat());
        let as_user = ["--user", user, "--pass", "secret", "CLIENT"];
        let refused = redis.cli(&[&as_user[..], &["UNBLOCK", "1"]].concat());
        assert!(refused.contains("NOPERM"), "{user} may unblock: {refused}");
        let uri = redis
            .uri()
            .replace("redis://", &format!("redis://{user}:secret@"));
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let block = Duration::from_millis(300);
            let mut consumer = consumer(uri, block).await;
            for _ in 0..2 {
                let stop = CancellationToken::new();
                let read = consumer.read(10, block, &stop);
                tokio::pin!(read);
                held(&redis, &mut read).await;
                stop.cancel();
                let entries = read.await.expect("the read's own answer, at its block");
                assert!(entries.is_empty(), "{user}: {entries:?}");
            }
        });
    }
    let stats = redis.cli(&["INFO", "commandstats"]);
    let asked = stats.lines().find(|l| l.starts_with("cmdstat_client|id:"));
    assert!(
        asked.is_some_and(|l| l.contains("rejected_calls=1,")),
        "the refused id asked once: {asked:?}"
    );
}

/// Consumer `c` of group `g` on stream `s` of the Redis at `uri`, reading with `block`.
async fn consumer(uri: String, block: Duration) -> Box<dyn Consumer> {
    let config = BrokerConfig {
        uri: uri.into(),
        group_start: GroupStart::Beginning,
        block,
        claim_idle: Duration::from_secs(60),
        reclaim_interval: Duration::from_secs(60),
        tls: Default::default(),
    };
    let broker = protean_host::broker::open(&config).await.unwrap();
    broker.consumer(vec!["s".into()], "g", "c").await.unwrap()
}

/// Until Redis holds `read` (blocked, nothing to give it); it must not be answered meanwhile.
async fn held<T: std::fmt::Debug>(
    redis: &RedisServer,
    read: &mut (impl std::future::Future<Output = T> + Unpin),
) {
    loop {
        tokio::select! {
            answer = &mut *read => panic!("answered with nothing to read: {answer:?}"),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        let clients = redis.cli(&["CLIENT", "LIST"]);
        if clients
            .lines()
            .any(|l| l.contains("cmd=xreadgroup") && l.contains("flags=b"))
        {
            return;
        }
    }
}

/// Serve `lib` in `dir` and stop it (SIGTERM) once its first batch committed: it must exit cleanly and
/// leave nothing pending on `redis`.
#[track_caller]
fn stop_after_the_first_batch(dir: &std::path::Path, lib: &str, redis: &RedisServer) {
    let mut server = host(dir).args(["--domain", lib]).spawn();
    server.wait_for(&["batch committed"], Duration::from_secs(60));
    server.signal(libc::SIGTERM);
    let (code, logs) = server.wait();
    assert_eq!(code, Some(0), "{logs}");
    assert_eq!(
        redis.pending(),
        0,
        "entries left pending after the stop:\n{logs}"
    );
}

/// A stop sends a consumer's last acknowledgements without queueing them behind the read Redis holds
/// on that consumer's connection: Redis answers nothing else there until the read ends, at its block
/// (here 30 s) or, at `--hz 1`, up to a second after it. The probe's command subscription, on a
/// stream, sits in such a read with its batch's acknowledgements not yet confirmed when the signal
/// comes; nothing else is published, so nothing can be delivered meanwhile.
#[test]
fn a_stop_does_not_wait_for_redis_to_end_a_blocked_read() {
    let redis = RedisServer::start_with(&["--hz", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let config = redis.config().replace("block_ms = 200", "block_ms = 30000");
    let config = format!("{config}[server.handlers.runner]\nsubscription_type = \"stream\"\n");
    std::fs::write(dir.path().join("protean.toml"), config).unwrap();
    let lib = format!("{}:probe", fixture_domain().display());
    let data = json!({ "id": "one", "behaviour": "ok" }).to_string();
    host(dir.path())
        .args(["send", "--domain", &lib, "Probe.Run.v1", &data])
        .output()
        .expect_code(0);
    let server = host(dir.path()).args(["--domain", &lib]).spawn();
    let store = sqlite(dir.path());
    wait_until(Duration::from_secs(60), "the command handled", || {
        ran(store.as_ref(), "one") == 1
    });
    wait_until(Duration::from_secs(60), "its read held by Redis", || {
        let clients = redis.cli(&["CLIENT", "LIST"]);
        let held = |line: &&str| line.contains("cmd=xreadgroup") && line.contains("flags=b");
        redis.pending() == 0 && clients.lines().any(|line| held(&line))
    });
    let signalled = std::time::Instant::now();
    server.signal(libc::SIGTERM);
    let (code, logs) = server.wait();
    assert_eq!(code, Some(0), "{logs}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "the stop took {:?}, waiting for a read blocked for 30 s:\n{logs}",
        signalled.elapsed()
    );
    assert_eq!(redis.pending(), 0, "acknowledgements lost at the stop");
    assert_eq!(ran(store.as_ref(), "one"), 1);
}

#[test]
fn a_dead_letter_is_listed_replayed_to_its_group_and_then_succeeds() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("protean.toml"), config(&redis)).unwrap();
    let store = sqlite(dir.path());
    // One plugin instance for both runs: its attempt counter says the fifth attempt succeeds.
    let engine = engine(fixture_domain(), "probe", store.clone(), &config(&redis));
    engine
        .send(
            "Probe.Run.v1",
            &json!({"id": "later", "behaviour": "fail:4"}),
            None,
        )
        .unwrap();
    engine.run().unwrap();
    assert_eq!(ran(store.as_ref(), "later"), 0);

    let lib = format!("{}:probe", fixture_domain().display());
    let dlq = |args: &[&str]| {
        host(dir.path())
            .args(["dlq"])
            .args(args)
            .args(["--domain", &lib])
    };
    let listed = dlq(&["list", "--json"]).output().expect_code(0);
    let rows: Vec<Value> = serde_json::from_str(&listed.stdout()).unwrap();
    assert_eq!(rows.len(), 1, "{}", listed.stdout());
    assert_eq!(rows[0]["subscription"], "commands:probe::probe");
    assert_eq!(rows[0]["fields"]["attempts"], "4");
    let build = protean_host::plugin::Library::load(fixture_domain()).unwrap();
    assert_eq!(
        rows[0]["fields"]["build_id"],
        build.build_id(),
        "the dead letter names the build that failed it"
    );
    let id = rows[0]["id"].as_str().unwrap().to_owned();
    let text = dlq(&["list"]).output().expect_code(0).stdout();
    assert!(
        text.contains("Probe.Run.v1") && text.contains("probe later failing attempt 4"),
        "{text}"
    );

    let unconfirmed = dlq(&["replay-all", "--subscription", "commands:probe::probe"])
        .output()
        .expect_code(1);
    assert!(
        unconfirmed.error_lines()[0]
            .contains("this replays 1 dead letters of commands:probe::probe; add --yes to confirm"),
        "{}",
        unconfirmed.stderr()
    );
    let unknown = dlq(&["replay", &id, "--subscription", "nope"])
        .output()
        .expect_code(1);
    assert!(
        unknown.error_lines()[0].contains(
            "no subscription \"nope\" in this domain; subscriptions: chain, commands:probe::probe"
        ),
        "{}",
        unknown.stderr()
    );
    dlq(&["replay", &id, "--subscription", "commands:probe::probe"])
        .output()
        .expect_code(0);
    let missing = dlq(&["replay", &id, "--subscription", "commands:probe::probe"])
        .output()
        .expect_code(1);
    assert!(
        missing.error_lines()[0].contains(&format!("no dead letter {id} in commands:probe::probe")),
        "{}",
        missing.stderr()
    );

    engine.run().unwrap();
    let done: Value =
        serde_json::from_str(&store.read_stream("probe::probe-later", 0).unwrap()[0].data).unwrap();
    assert_eq!(
        done["attempts"], 5,
        "the replayed message succeeded on its fifth attempt"
    );
    assert!(redis
        .cli(&["XLEN", "commands:probe::probe:dlq"])
        .starts_with('0'));
    assert!(
        redis.cli(&["XLEN", "chain:replay"]).starts_with('0'),
        "the replay went to its own group only"
    );
    dlq(&["purge", "--subscription", "commands:probe::probe", "--yes"])
        .output()
        .expect_code(0);
}

/// Entries that the real Python Protean 0.18 Redis broker published (tests/fixtures/protean-redis, with
/// the script that captured them) are consumed by a Rust domain through our stream subscriptions.
#[test]
fn entries_published_by_python_protean_are_consumed() {
    let redis = RedisServer::start();
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/protean-redis/python-to-rust");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "entries.json")
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "fixtures in {}", dir.display());
    for file in &files {
        let data = std::fs::read_to_string(file).unwrap();
        redis.cli(&["XADD", "fulfilment::order", "*", "data", &data]);
    }
    let store_dir = tempfile::tempdir().unwrap();
    let store = sqlite(store_dir.path());
    let report = engine(sample_domain(), "reporting", store.clone(), &config(&redis))
        .run()
        .unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    let totals: Value =
        serde_json::from_str(&store.document("totals", "all").unwrap().unwrap()).unwrap();
    assert_eq!(
        (totals["placed"].as_u64(), totals["revenue"].as_f64()),
        (Some(2), Some(42.5))
    );
    assert!(
        redis
            .cli(&["XLEN", "totals-fulfilment::order:dlq"])
            .starts_with('0'),
        "nothing was dead-lettered"
    );
}

/// `XGROUP DELCONSUMER` drops a consumer's pending entries with it. A look at the consumers followed by
/// a separate removal lost a batch when a stalled replica woke up and read in between (the loss hunter
/// found 10 entries of one group in nobody's pending list). The host removes gone consumers in one
/// script, atomically, and never one that holds entries, nor itself.
#[test]
fn only_idle_consumers_holding_nothing_are_removed_and_atomically() {
    let redis = RedisServer::start();
    redis.cli(&["XADD", "s", "*", "f", "v"]);
    redis.cli(&["XGROUP", "CREATE", "s", "g", "0"]);
    redis.cli(&[
        "XREADGROUP",
        "GROUP",
        "g",
        "holder",
        "COUNT",
        "1",
        "STREAMS",
        "s",
        ">",
    ]);
    redis.cli(&["XGROUP", "CREATECONSUMER", "s", "g", "gone"]);
    redis.cli(&["XGROUP", "CREATECONSUMER", "s", "g", "caller"]);
    // Idle time is a clock: let every consumer pass the 20 ms threshold.
    std::thread::sleep(Duration::from_millis(60));
    let script = include_str!("../../host/src/broker/lua/drop_gone_consumers.lua");
    let removed = redis.cli(&["EVAL", script, "1", "s", "g", "20", "caller"]);
    assert_eq!(
        removed.trim(),
        "1",
        "only the idle consumer holding nothing"
    );
    let consumers = redis.cli(&["XINFO", "CONSUMERS", "s", "g"]);
    assert!(
        consumers.contains("holder") && consumers.contains("caller"),
        "{consumers}"
    );
    assert!(!consumers.contains("gone"), "{consumers}");
}
