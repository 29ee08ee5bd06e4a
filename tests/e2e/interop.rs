//! Sharing a store and a broker with Python Protean (issue 15): what another writer puts in the store or
//! on Redis, written exactly as Protean 0.18 writes it, is handled exactly once.
//!
//! Protean gives a command its aggregate's id as `metadata.headers.id`, so two commands for one
//! aggregate share it; the host must still handle both, and still skip a redelivery of either.

use std::sync::Arc;

use protean_host::{engine::Outcome, message, store::Store};
use serde_json::{json, Value};

use crate::support::{
    engine, fixture_domain, host, postgres, sqlite, status_json, subscription, PgServer,
    RedisServer, TEST_CONFIG,
};

/// A probe `Run` command for aggregate `id` as Protean 0.18 makes it: `headers.id` is the aggregate id.
fn protean_command(id: &str, behaviour: &str) -> (String, Value, Value) {
    let data = json!({ "id": id, "behaviour": behaviour });
    let stream = format!("probe::probe:command-{id}");
    let metadata = json!({
        "headers": {"id": id, "time": "2026-03-01T10:00:00.124956+00:00", "type": "Probe.Run.v1",
                    "stream": stream, "traceparent": null, "idempotency_key": null, "deadline": null},
        "envelope": {"specversion": "1.0", "checksum": message::checksum(&data)},
        "domain": {"fqn": "__main__.Run", "kind": "COMMAND", "origin_stream": null,
                   "stream_category": null, "version": 1, "sequence_id": null, "asynchronous": true,
                   "expected_version": null, "priority": 0,
                   "correlation_id": "ca1e884324b445a4865ad9318438f5f7", "causation_id": null},
        "extensions": {}
    });
    (stream, data, metadata)
}

/// Append as message-db-py does: `message_store.write_message`, with a fresh row uuid.
fn write_message(pg: &PgServer, (stream, data, metadata): &(String, Value, Value)) {
    pg.psql(&format!(
        "SELECT message_store.write_message('{}', '{stream}', 'Probe.Run.v1', $j${data}$j$::jsonb, $j${metadata}$j$::jsonb)",
        uuid::Uuid::new_v4()
    ));
}

fn ran(store: &dyn Store, id: &str) -> usize {
    store
        .read_stream(&format!("probe::probe-{id}"), 0)
        .unwrap()
        .len()
}

fn run_probe(store: &Arc<dyn Store>, config: &str) {
    let report = engine(fixture_domain(), "probe", store.clone(), config)
        .run()
        .unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
}

#[test]
fn two_protean_commands_for_one_aggregate_are_both_handled_and_a_redelivery_is_skipped_on_postgres()
{
    let (store, pg) = postgres();
    for command in [
        protean_command("a", "ok"),
        protean_command("a", "ok"),
        protean_command("b", "reject"),
        protean_command("b", "ok"),
    ] {
        write_message(&pg, &command);
    }
    run_probe(&store, TEST_CONFIG);
    assert_eq!(ran(store.as_ref(), "a"), 2, "both commands for a");
    assert_eq!(ran(store.as_ref(), "b"), 1, "the corrected command for b");
    assert_eq!(
        store.dead_letters(None).unwrap().len(),
        1,
        "the rejected one"
    );
    // A redelivery: the subscription reads everything again from the start.
    pg.psql("DELETE FROM protean.positions");
    run_probe(&store, TEST_CONFIG);
    assert_eq!(
        (ran(store.as_ref(), "a"), ran(store.as_ref(), "b")),
        (2, 1),
        "a re-read of handled commands is skipped"
    );
}

/// What the host's outbox puts on Redis for a stored message: its wire form, with its positions.
fn entry(data: &Value, metadata: &Value, position: u64, global: u64) -> String {
    message::wire_json(&data.to_string(), &metadata.to_string(), position, global).unwrap()
}

/// Two command entries sharing Protean's `headers.id` (stored at positions 0 and 1 of the aggregate's
/// command stream), the first of them twice (the outbox publishes at least once).
fn redis_commands_sharing_an_id(store: &Arc<dyn Store>, redis: &RedisServer) {
    let (_, first, metadata) = protean_command("a", "ok");
    let (_, second, second_metadata) = protean_command("a", "ok");
    for (data, metadata, position) in [
        (&first, &metadata, 0),
        (&second, &second_metadata, 1),
        (&first, &metadata, 0),
    ] {
        let text = entry(data, metadata, position, position + 1);
        redis.cli(&["XADD", "probe::probe:command", "*", "data", &text]);
    }
    let config = format!(
        "{TEST_CONFIG}{}[server.handlers.runner]\nsubscription_type = \"stream\"\n",
        redis.config()
    );
    run_probe(store, &config);
    assert_eq!(
        ran(store.as_ref(), "a"),
        2,
        "both commands, and the redelivered one once"
    );
    assert!(store.dead_letters(None).unwrap().is_empty());
}

#[test]
fn redis_entries_sharing_a_headers_id_are_each_handled_once_on_every_store() {
    let redis = RedisServer::start();
    let memory: Arc<dyn Store> = Arc::new(protean_host::store::MemoryStore::default());
    redis_commands_sharing_an_id(&memory, &redis);
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    redis_commands_sharing_an_id(&sqlite(dir.path()), &redis);
    let redis = RedisServer::start();
    let (store, _pg) = postgres();
    redis_commands_sharing_an_id(&store, &redis);
}

#[test]
fn a_marker_an_older_build_wrote_still_prevents_a_re_handle() {
    // SQLite: a store file of a build from before schema version 2 (user_version 0), its markers keyed
    // by identity alone and this one naming headers.id: upgraded at open to the message's identity,
    // then rekeyed by its global position.
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    let config = TEST_CONFIG;
    let sent = engine(fixture_domain(), "probe", store.clone(), config)
        .send(
            "Probe.Run.v1",
            &json!({"id": "old", "behaviour": "ok"}),
            None,
        )
        .unwrap();
    drop(store);
    let file = dir.path().join(".protean/store.db");
    let db = rusqlite::Connection::open(&file).unwrap();
    db.execute_batch(&format!(
        "DROP TABLE processed;
         CREATE TABLE processed (subscription TEXT NOT NULL, message_id TEXT NOT NULL,
             build_id TEXT NOT NULL, processed_at TEXT NOT NULL,
             PRIMARY KEY (subscription, message_id)) WITHOUT ROWID;
         INSERT INTO processed VALUES ('commands:probe::probe', '{sent}', 'old-build', 'then');
         PRAGMA user_version = 0;"
    ))
    .unwrap();
    drop(db);
    let store = sqlite(dir.path());
    run_probe(&store, config);
    assert_eq!(ran(store.as_ref(), "old"), 0, "handled before the upgrade");

    // PostgreSQL: the marker is written before migration 8 runs.
    let (store, pg) = postgres();
    let sent = engine(fixture_domain(), "probe", store.clone(), config)
        .send(
            "Probe.Run.v1",
            &json!({"id": "old", "behaviour": "ok"}),
            None,
        )
        .unwrap();
    pg.psql(&format!(
        "INSERT INTO protean.processed (subscription, message_id, build_id) VALUES ('commands:probe::probe', '{sent}', 'old-build'); DELETE FROM protean.schema_version WHERE version = 8;"
    ));
    protean_host::store::PostgresStore::connect(&pg.store_config())
        .unwrap()
        .setup()
        .unwrap();
    run_probe(&store, config);
    assert_eq!(ran(store.as_ref(), "old"), 0, "handled before the upgrade");
}

fn probe_lib() -> String {
    format!("{}:probe", fixture_domain().display())
}

/// `subscriptions status --json`, whatever its exit code (1 while something is behind).
fn status(dir: &std::path::Path) -> Value {
    let out = host(dir)
        .args([
            "subscriptions",
            "status",
            "--json",
            "--domain",
            &probe_lib(),
        ])
        .output();
    serde_json::from_str(&out.stdout()).unwrap_or_else(|e| panic!("{e}: {}", out.stderr()))
}

#[test]
fn commands_a_message_db_client_appends_are_handled_with_redis_configured_and_shown_waiting() {
    let (store, pg) = postgres();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("{TEST_CONFIG}{}{}", pg.config(), redis.config()),
    )
    .unwrap();
    write_message(&pg, &protean_command("a", "ok"));
    write_message(&pg, &protean_command("b", "ok"));
    let before = status(dir.path());
    let commands = subscription(&before, "commands:probe::probe");
    assert_eq!(commands["type"], "event_store", "{commands}");
    assert_eq!(commands["lag"], 2, "both commands wait: {commands}");
    host(dir.path())
        .args(["--domain", &probe_lib(), "--test-mode"])
        .output()
        .expect_code(0);
    assert_eq!(
        (ran(store.as_ref(), "a"), ran(store.as_ref(), "b")),
        (1, 1),
        "each command handled once"
    );
    let after = status_json(dir.path(), &probe_lib());
    assert_eq!(subscription(&after, "commands:probe::probe")["lag"], 0);
}

/// Data with numbers jsonb rewrites (large floats, exponents, a negative zero), small ones and text
/// beyond ASCII; the probe's `Run` ignores the fields it does not know.
fn numbers(id: &str) -> Value {
    serde_json::from_str(&format!(
        r#"{{"id": "{id}", "behaviour": "ok", "big": 1e16, "huge": 1.2345e20, "negative": -2.5e17,
            "small": 1.5e-7, "tiny": 1e-5, "plain": 30.5, "whole": 12.0, "zero": -0.0, "count": 7,
            "text": "bücher-📚 Zoë"}}"#
    ))
    .unwrap()
}

#[test]
fn messages_with_large_small_exponent_and_unicode_numbers_verify_after_jsonb_on_postgres() {
    let (store, pg) = postgres();
    // Written by the host.
    let ours = protean_host::unit_of_work::NewMessage::new(
        message::Kind::Command,
        "probe::probe:command-ours",
        "Probe.Run.v1",
        &numbers("ours"),
        None,
        None,
        None,
    );
    store
        .commit(&protean_host::unit_of_work::UnitOfWork {
            messages: vec![ours],
            ..Default::default()
        })
        .unwrap();
    // Written as Protean writes it: its checksum is Python's json.dumps of the data before jsonb.
    // (A Python -0.0 cannot verify after jsonb, which has no negative zero; Protean fails it too.)
    let (stream, _, mut metadata) = protean_command("theirs", "ok");
    let mut data = numbers("theirs");
    data.as_object_mut().unwrap().remove("zero");
    metadata["envelope"]["checksum"] = json!(sha256_hex(&message::canonical_json(&data)));
    write_message(&pg, &(stream, data, metadata));
    // And one with a large integer (a Python int, which jsonb keeps as it is).
    let (stream, _, mut metadata) = protean_command("int", "ok");
    let data = json!({"id": "int", "behaviour": "ok", "big": 12_345_678_901_234_567_u64});
    metadata["envelope"]["checksum"] = json!(sha256_hex(&message::canonical_json(&data)));
    write_message(&pg, &(stream, data, metadata));
    run_probe(&store, TEST_CONFIG);
    assert_eq!(
        store.dead_letters(None).unwrap(),
        vec![],
        "nothing failed its checksum"
    );
    for id in ["ours", "theirs", "int"] {
        assert_eq!(ran(store.as_ref(), id), 1, "{id} handled");
    }
}

fn sha256_hex(text: &str) -> String {
    use std::fmt::Write;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes());
    digest.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// A probe that fails its first 4 attempts in this process is dead-lettered (1 try + 3 retries), then
/// replayed by the engine in the same process (its 5th attempt succeeds).
fn replay_on(store: &Arc<dyn Store>, builds: impl Fn() -> Vec<(String, Option<String>)>) {
    let engine = engine(fixture_domain(), "probe", store.clone(), TEST_CONFIG);
    engine
        .send(
            "Probe.Run.v1",
            &json!({"id": "late", "behaviour": "fail:4"}),
            None,
        )
        .unwrap();
    engine
        .send(
            "Probe.Run.v1",
            &json!({"id": "fine", "behaviour": "ok"}),
            None,
        )
        .unwrap();
    engine.run().unwrap();
    let dead = store.dead_letters(None).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(ran(store.as_ref(), "late"), 0);
    let (subscription, position) = (dead[0].subscription.clone(), dead[0].global_position);
    assert_eq!(
        engine.replay_dead_letter(&subscription, position).unwrap(),
        protean_host::engine::Replay::Handled
    );
    assert_eq!(ran(store.as_ref(), "late"), 1, "handled by the replay");
    assert_eq!(ran(store.as_ref(), "fine"), 1, "nothing else handled again");
    assert!(
        store.dead_letters(None).unwrap().is_empty(),
        "no longer waiting"
    );
    let build = engine.build_id();
    assert_eq!(
        builds(),
        vec![(build.clone(), Some(build))],
        "the failed attempt's build and the replay's"
    );
    assert!(
        engine.replay_dead_letter(&subscription, position).is_err(),
        "a dead letter is replayed once"
    );
    // A new run finds nothing left to do: the replay did not move or rewind the position.
    engine.run().unwrap();
    assert_eq!(ran(store.as_ref(), "late"), 1);
}

#[test]
fn an_event_store_dead_letter_is_replayed_once_to_its_subscription_on_sqlite_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    let file = dir.path().join(".protean/store.db");
    replay_on(&store, || {
        let db = rusqlite::Connection::open(&file).unwrap();
        let mut rows = db
            .prepare("SELECT build_id, replayed_by FROM dead_letters")
            .unwrap();
        rows.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    });
    let (store, pg) = postgres();
    replay_on(&store, || {
        pg.psql("SELECT build_id || ' ' || coalesce(replayed_by, '-') FROM protean.dead_letters")
            .lines()
            .map(|l| {
                let (failed, replayed) = l.split_once(' ').unwrap();
                (
                    failed.to_owned(),
                    Some(replayed.to_owned()).filter(|r| r != "-"),
                )
            })
            .collect()
    });
}
