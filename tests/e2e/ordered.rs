//! Ordered subscriptions on a real Redis with real replicas: every key's messages handled once each and
//! in order while replicas die, join and stall, and a poisoned key parked without holding up the rest.

use std::{path::Path, time::Duration};

use protean_host::store::Store;
use serde_json::json;

use crate::support::{
    fixture_domain, host, idle_runs,
    sequencing::{every_key_in_order, numbered, publish, publish_wave, recorded, records, wave},
    sqlite, start_servers, wait_until, RedisServer, Server, TEST_CONFIG,
};

fn domain() -> String {
    format!("{}:sequencing", fixture_domain().display())
}

/// Fast retries, `partitions`, and a short lease (so takeovers are quick).
fn configure(dir: &Path, redis: &RedisServer, partitions: u32) {
    let config = format!(
        "{TEST_CONFIG}messages_per_tick = 20\n{}[server.ordering]\npartitions = {partitions}\nlease_ttl_ms = 1500\n",
        redis.config()
    );
    std::fs::write(dir.join("protean.toml"), config).unwrap();
}

fn start(dir: &Path, n: usize) -> Vec<Server> {
    start_servers(dir, n, &domain())
}

#[test]
fn three_replicas_keep_every_key_in_order_through_a_kill_and_a_join() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), &redis, 16);
    let (keys, per_key) = (100, 100u64);
    let mut replicas = start(dir.path(), 3);
    let store = sqlite(dir.path());
    let mut global = 0;
    // A millisecond per message keeps the replicas busy for seconds: the kill and the join land mid-run.
    let slow = json!({ "stall_ms": 1 });
    publish_wave(&redis, &wave(keys, 1..=40), &slow, &mut global);
    wait_until(Duration::from_secs(60), "the first records", || {
        recorded(store.as_ref(), keys) > 500
    });
    replicas[0].signal(libc::SIGKILL);
    assert!(
        recorded(store.as_ref(), keys) < 4000,
        "the kill came after the first wave was done"
    );
    publish_wave(&redis, &wave(keys, 41..=70), &slow, &mut global);
    wait_until(
        Duration::from_secs(60),
        "more records after the kill",
        || recorded(store.as_ref(), keys) > 4_500,
    );
    let mut joined = start(dir.path(), 1).remove(0);
    joined.wait_for_since_start(&["partitions taken"], Duration::from_secs(30));
    publish_wave(&redis, &wave(keys, 71..=per_key), &slow, &mut global);
    wait_until(Duration::from_secs(120), "every message recorded", || {
        recorded(store.as_ref(), keys) >= keys * per_key as usize
    });
    every_key_in_order(store.as_ref(), keys, per_key);
    // The replica that joined took partitions from the survivors, which gave some back.
    let gave_back = replicas[1..]
        .iter_mut()
        .any(|r| r.seen_or_wait(&["partitions given back"], Duration::from_secs(5)));
    assert!(
        gave_back,
        "no survivor gave partitions back when a replica joined"
    );
}

#[test]
fn a_poisoned_key_parks_while_the_others_finish_and_its_replay_releases_it_in_order() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let poison = dir.path().join("poison");
    std::fs::write(&poison, "").unwrap();
    configure(dir.path(), &redis, 16);
    let (keys, per_key) = (20, 20u64);
    let mut servers: Vec<Server> = (0..2)
        .map(|_| serve_poisoned(dir.path(), &poison))
        .collect();
    // Both serve keys before anything is published: the first to start takes every partition and
    // gives half back when it sees the second.
    for server in &mut servers {
        assert!(server.seen_or_wait(&["partitions taken"], Duration::from_secs(60)));
    }
    let store = sqlite(dir.path());
    publish(&redis, &poisoned_wave(keys, per_key, ("k7", 5)));
    others_finished(store.as_ref(), keys, per_key, "k7");
    let dead = dead_letters(dir.path());
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    assert_eq!(dead[0]["fields"]["key"], "sequencing::sequence-k7");
    assert_eq!(dead[0]["fields"]["parked"], "yes");
    // Parked: nothing after 4, however long the others ran; its later messages wait in its held list.
    assert_eq!(records(store.as_ref(), keys)["k7"], [1, 2, 3, 4]);
    // A partition whose lease lapsed on a loaded machine is between owners for a moment: read the
    // status once every partition is owned again.
    let mut status = recorder_status(dir.path());
    let owned = |status: &serde_json::Value| {
        status["partitions"]["owners"]
            .as_object()
            .map_or(0, |o| o.values().map(|n| n.as_u64().unwrap()).sum::<u64>())
    };
    wait_until(Duration::from_secs(30), "every partition owned", || {
        status = recorder_status(dir.path());
        owned(&status) == 16
    });
    assert_eq!(status["partitions"]["parked"], 1, "{status}");
    assert_eq!(status["partitions"]["held"], 15, "{status}");
    let owners = status["partitions"]["owners"].as_object().unwrap();
    assert_eq!(owners.len(), 2, "both replicas hold partitions: {status}");
    assert_eq!(owned(&status), 16);
    assert_eq!(status["lag"], 0, "{status}");
    std::fs::remove_file(&poison).unwrap();
    replay_until_every_key_finished(dir.path(), &dead[0], store.as_ref(), keys, per_key);
}

#[test]
fn a_stalled_replica_whose_lease_expired_is_fenced_out() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    // One partition: one replica serves every key, the other stands by.
    configure(dir.path(), &redis, 1);
    let mut servers = start(dir.path(), 2);
    let owner = (0..2)
        .find(|&i| servers[i].seen_or_wait(&["partitions taken"], Duration::from_secs(10)))
        .expect("one replica takes the partition");
    let standby = 1 - owner;
    let store = sqlite(dir.path());
    publish(&redis, &[numbered("k0", 1, 1, json!({ "stall_ms": 3000 }))]);
    servers[owner].wait_for(&["stalling in k0 #1"], Duration::from_secs(30));
    servers[owner].signal(libc::SIGSTOP);
    servers[standby].wait_for(&["partitions taken"], Duration::from_secs(30));
    publish(&redis, &[numbered("k0", 2, 2, json!({}))]);
    wait_until(Duration::from_secs(30), "the standby handled both", || {
        records(store.as_ref(), 1)["k0"].len() == 2
    });
    servers[owner].signal(libc::SIGCONT);
    // Its handler returns and it commits what it did before the stall: refused by the store's fence.
    servers[owner].wait_for(&["fencing token"], Duration::from_secs(30));
    assert_eq!(records(store.as_ref(), 1)["k0"], [1, 2]);
}

#[test]
fn a_dead_letter_the_broker_refuses_waits_for_it_and_nothing_passes_it() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let poison = dir.path().join("poison");
    std::fs::write(&poison, "").unwrap();
    configure(dir.path(), &redis, 4);
    // The dead-letter stream's key holds a string: the broker refuses every dead letter (WRONGTYPE)
    // until it is gone. The store has committed the batch by then.
    redis.cli(&["SET", "recorder:dlq", "not a stream"]);
    let serve = || serve_poisoned(dir.path(), &poison);
    let mut server = serve();
    let store = sqlite(dir.path());
    let (keys, per_key) = (8, 10u64);
    publish(&redis, &poisoned_wave(keys, per_key, ("k3", 4)));
    let refused = ["broker unavailable", "XADD dead letter", "WRONGTYPE"];
    server.wait_for(&refused, Duration::from_secs(60));
    // Killed while it owes the dead letter: its successor reads k3 again from before #4.
    server.signal(libc::SIGKILL);
    server.wait();
    let mut server = serve();
    server.wait_for(&refused, Duration::from_secs(60));
    others_finished(store.as_ref(), keys, per_key, "k3");
    assert_eq!(records(store.as_ref(), keys)["k3"], [1, 2, 3]);
    assert_eq!(redis.cli(&["TYPE", "recorder:dlq"]).trim(), "string");
    redis.cli(&["DEL", "recorder:dlq"]);
    wait_until(Duration::from_secs(60), "the dead letter written", || {
        !dead_letters(dir.path()).is_empty()
    });
    let dead = dead_letters(dir.path());
    assert_eq!(dead.len(), 1, "written once: {dead:#?}");
    assert_eq!(dead[0]["fields"]["key"], "sequencing::sequence-k3");
    assert_eq!(dead[0]["fields"]["parked"], "yes");
    // Parked: k3's later messages wait behind it, none handled, none lost.
    std::fs::remove_file(&poison).unwrap();
    replay_until_every_key_finished(dir.path(), &dead[0], store.as_ref(), keys, per_key);
    server.stop_cleanly();
}

/// A replica whose handler fails the messages marked poisoned while the file `poison` exists.
fn serve_poisoned(dir: &Path, poison: &Path) -> Server {
    host(dir)
        .env("SEQUENCING_POISON_FILE", poison)
        .args(["--domain", &domain()])
        .spawn()
}

/// `keys` keys with `per_key` messages each, one of them (key, seq) poisoned: its handler fails
/// while the poison file exists.
fn poisoned_wave(keys: usize, per_key: u64, poisoned: (&str, u64)) -> Vec<String> {
    wave(keys, 1..=per_key)
        .iter()
        .enumerate()
        .map(|(i, (key, seq))| {
            let poison = (key.as_str(), *seq) == poisoned;
            numbered(key, *seq, i as u64 + 1, json!({ "poison": poison }))
        })
        .collect()
}

/// Waits until every key but `parked` has all its messages recorded.
fn others_finished(store: &dyn Store, keys: usize, per_key: u64, parked: &str) {
    wait_until(Duration::from_secs(60), "every other key finished", || {
        records(store, keys)
            .iter()
            .filter(|(k, _)| *k != parked)
            .all(|(_, s)| s.len() == per_key as usize)
    });
}

/// Replays the parked key's dead letter and waits until every key has all its messages, in order,
/// with no dead letter left.
fn replay_until_every_key_finished(
    dir: &Path,
    dead: &serde_json::Value,
    store: &dyn Store,
    keys: usize,
    per_key: u64,
) {
    let id = dead["id"].as_str().unwrap();
    host(dir)
        .args([
            "dlq",
            "replay",
            id,
            "--subscription",
            "recorder",
            "--domain",
            &domain(),
        ])
        .output()
        .expect_code(0);
    wait_until(Duration::from_secs(60), "every key finished", || {
        recorded(store, keys) >= keys * per_key as usize
    });
    every_key_in_order(store, keys, per_key);
    assert!(dead_letters(dir).is_empty());
}

/// The recorder's row of `subscriptions status --json`.
fn recorder_status(dir: &Path) -> serde_json::Value {
    let out = host(dir)
        .args(["subscriptions", "status", "--json", "--domain", &domain()])
        .output()
        .expect_code(0)
        .stdout();
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    value["subscriptions"][0].clone()
}

#[test]
fn test_mode_ends_once_an_ordered_subscription_has_handled_everything() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), &redis, 4);
    let mut global = 0;
    publish_wave(&redis, &wave(10, 1..=10), &json!({}), &mut global);
    host(dir.path())
        .args(["server", "--test-mode", "--domain", &domain()])
        .output()
        .expect_code(0);
    every_key_in_order(sqlite(dir.path()).as_ref(), 10, 10);
    assert_eq!(recorder_status(dir.path())["lag"], 0);
}

/// As `redis::test_mode_ends_without_waiting_for_redis_to_end_an_empty_read`, for an ordered
/// subscription, whose `XREAD BLOCK` Redis also answers only when its event loop next wakes (at most
/// once a second here). Ten runs with nothing to do took 9.2 s before, 0.3 s after.
#[test]
fn test_mode_ends_without_waiting_for_redis_to_end_an_empty_ordered_read() {
    let redis = RedisServer::start_with(&["--hz", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    let config = format!(
        "{TEST_CONFIG}{}[server.ordering]\npartitions = 4\n",
        redis.config()
    );
    let total = idle_runs("sequencing", &store, &config);
    assert!(
        total < Duration::from_millis(1500),
        "ten runs with nothing to do took {total:?}"
    );
}

#[test]
fn a_replica_configured_with_another_partition_count_refuses_to_start() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), &redis, 4);
    let mut global = 0;
    publish_wave(&redis, &wave(2, 1..=2), &json!({}), &mut global);
    let run = || {
        host(dir.path())
            .args(["server", "--test-mode", "--domain", &domain()])
            .output()
    };
    run().expect_code(0);
    configure(dir.path(), &redis, 8);
    let refused = run().expect_code(1);
    let errors = refused.error_lines();
    assert!(
        errors.iter().any(|l| l.contains(
            "ordered subscription recorder runs with 4 partitions but this replica is configured with 8; set [server.ordering] partitions = 4"
        )),
        "{errors:?}"
    );
    // Nothing was handled twice or lost by the refused replica.
    every_key_in_order(sqlite(dir.path()).as_ref(), 2, 2);
}

#[test]
fn with_group_start_new_a_new_ordered_subscription_skips_the_history() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), &redis, 4);
    let config = std::fs::read_to_string(dir.path().join("protean.toml")).unwrap();
    let config = config.replace(
        "[brokers.default]\n",
        "[brokers.default]\ngroup_start = \"new\"\n",
    );
    std::fs::write(dir.path().join("protean.toml"), config).unwrap();
    let mut global = 0;
    publish_wave(&redis, &wave(1, 1..=5), &json!({}), &mut global);
    let mut server = start(dir.path(), 1).remove(0);
    server.wait_for_since_start(&["partitions taken"], Duration::from_secs(30));
    publish_wave(&redis, &wave(1, 6..=10), &json!({}), &mut global);
    let store = sqlite(dir.path());
    wait_until(Duration::from_secs(30), "five records", || {
        records(store.as_ref(), 1)["k0"].len() >= 5
    });
    assert_eq!(records(store.as_ref(), 1)["k0"], [6, 7, 8, 9, 10]);
    assert_eq!(recorder_status(dir.path())["lag"], 0);
}

/// The recorder's dead letters as JSON.
fn dead_letters(dir: &Path) -> Vec<serde_json::Value> {
    let out = host(dir)
        .args([
            "dlq",
            "list",
            "--subscription",
            "recorder",
            "--json",
            "--domain",
            &domain(),
        ])
        .output()
        .expect_code(0)
        .stdout();
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    value.as_array().cloned().unwrap_or_default()
}
