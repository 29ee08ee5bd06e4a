//! The live interop suite: the real Python `protean` 0.18 (from PyPI, in the venv `scripts/protean-venv`
//! makes) and the real binary against one PostgreSQL (MessageDB) store and one Redis. It fails, never
//! skips, when the venv cannot be made.
//!
//! Protean appends commands the way a Python service does (two for o-1 sharing its id: a rejected one
//! and the corrected one; o-2 with a total of 1e16 and a customer beyond ASCII) and raises an event
//! itself (o-4), which its own outbox processor publishes into the Redis stream the host's groups read;
//! the host, with Redis configured, handles each exactly once; then Protean reads every message back
//! with its checksum verified and rehydrates every order as shipped.
//!
//! The dead-letter commands, from Protean's side: Protean sends `ShipOrder(o-5)` before anyone placed
//! o-5; the host's handler rejects it (a dead letter that `dlq list` and `dlq inspect` show); Protean
//! then places o-5 itself (the cause fixed), and `dlq replay` handles the shipment once.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use protean_host::store::{PostgresStore, Store};
use serde_json::Value;

use crate::support::{count_of, host, sample_domain, PgServer, RedisServer, TEST_CONFIG};

/// The venv's python, made by the script on first use.
fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/protean-venv"))
        .output()
        .expect("scripts/protean-venv runs");
    assert!(
        out.status.success(),
        "the live suite needs its venv: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// `protean_live.py ACTION --uri URI --redis URI`: its JSON answer, after checking it exited 0.
fn protean(python: &PathBuf, action: &str, pg: &PgServer, redis: &RedisServer) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("live/protean_live.py");
    let out = Command::new(python)
        .arg(script)
        .args([action, "--uri", &pg.uri(), "--redis", &redis.uri()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "protean {action} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn count_in(store: &dyn Store, stream: &str, message_type: &str) -> usize {
    store
        .read_stream(stream, 0)
        .unwrap()
        .iter()
        .filter(|m| m.message_type == message_type)
        .count()
}

#[test]
fn protean_and_protean_host_share_one_postgres_store_and_one_redis() {
    let python = python();
    let pg = PgServer::start();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("{TEST_CONFIG}{}{}", pg.config(), redis.config()),
    )
    .unwrap();
    host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(0);
    protean(&python, "write", &pg, &redis);
    protean(&python, "publish", &pg, &redis);
    let run = || {
        host(dir.path())
            .args(["--test-mode", "--domain"])
            .args([sample_domain()])
            .output()
            .expect_code(0)
    };
    run();
    let store = PostgresStore::connect(&pg.store_config()).unwrap();
    replay_a_shipment_once_its_order_is_placed(&python, (&pg, &redis), dir.path(), &store);
    // o-5's OrderPlaced (Protean's) reaches Redis; its fulfilment runs, and finds it shipped.
    protean(&python, "publish", &pg, &redis);
    run();
    for order in ["o-1", "o-2", "o-4", "o-5"] {
        let stream = format!("fulfilment::order-{order}");
        for event in ["Fulfilment.OrderPlaced.v1", "Fulfilment.OrderShipped.v1"] {
            assert_eq!(count_in(&store, &stream, event), 1, "{order}: {event} once");
        }
    }
    assert_eq!(
        count_of(
            &store,
            "fulfilment::reservation",
            "Fulfilment.StockReserved.v1"
        ),
        4,
        "one reservation per order"
    );
    let dead = store.dead_letters(None).unwrap();
    assert_eq!(dead.len(), 1, "the rejected o-1 only: {dead:?}");
    assert!(dead[0].error.contains("no items"), "{dead:?}");
    let read = protean(&python, "read", &pg, &redis);
    for order in ["o-1", "o-2", "o-4", "o-5"] {
        assert_eq!(read["orders"][order], "shipped", "{read}");
    }
    // Protean cannot verify one message: its own o-2 command. It hashed `"total":1e+16` and jsonb gave
    // back 10000000000000000 (an int to Python). The host verifies it (and everything it wrote verifies
    // in Protean: its checksum covers the data as jsonb keeps it).
    let failures: Vec<&str> = read["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert!(
        failures[0].starts_with("fulfilment::order:command-o-2@0 Fulfilment.PlaceOrder.v1")
            && failures[0].contains("checksum mismatch"),
        "{failures:#?}"
    );
}

/// `dlq` on Protean's rejected `ShipOrder(o-5)`: listed and inspected as a dead letter of the host's
/// command subscription; once Protean has placed o-5, `dlq replay` handles it: o-5 is shipped once, the
/// command has its processed marker, the dead letter is gone, and a second replay is refused.
fn replay_a_shipment_once_its_order_is_placed(
    python: &PathBuf,
    (pg, redis): (&PgServer, &RedisServer),
    dir: &Path,
    store: &dyn Store,
) {
    let dlq = |args: &[&str]| {
        host(dir)
            .args(["dlq"])
            .args(args)
            .args(["--domain"])
            .args([sample_domain()])
            .output()
    };
    let listed = dlq(&["list", "--json"]).expect_code(0);
    let rows: Value = serde_json::from_str(&listed.stdout()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "the rejected o-1 and o-5: {rows:#?}");
    let shipment = rows
        .iter()
        .find(|r| r["fields"]["message_type"] == "Fulfilment.ShipOrder.v1")
        .unwrap_or_else(|| panic!("no ShipOrder dead letter: {rows:#?}"));
    let (subscription, id) = (
        shipment["subscription"].as_str().unwrap(),
        shipment["id"].as_str().unwrap(),
    );
    assert_eq!(subscription, "commands:fulfilment::order");
    let inspected = dlq(&["inspect", id, "--subscription", subscription]).expect_code(0);
    let letter: Value = serde_json::from_str(&inspected.stdout()).unwrap();
    assert_eq!(
        letter["stream"], "fulfilment::order:command-o-5",
        "{letter}"
    );
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("cannot ship unknown order o-5"),
        "{letter}"
    );

    protean(python, "place", pg, redis);
    let replayed = dlq(&["replay", id, "--subscription", subscription]).expect_code(0);
    assert!(
        replayed.stdout().contains("handled by build"),
        "{}",
        replayed.stdout()
    );
    assert_eq!(
        count_in(store, "fulfilment::order-o-5", "Fulfilment.OrderShipped.v1"),
        1
    );
    let command = store
        .read_stream("fulfilment::order:command-o-5", 0)
        .unwrap()
        .into_iter()
        .find(|m| m.message_type == "Fulfilment.ShipOrder.v1")
        .unwrap();
    let marked = store
        .processed(subscription, &[command.identity().as_str()])
        .unwrap();
    assert_eq!(marked.len(), 1, "the replayed command has its marker");
    let left = store.dead_letters(Some(subscription)).unwrap();
    assert_eq!(left.len(), 1, "only o-1 waits: {left:?}");
    let again = dlq(&["replay", id, "--subscription", subscription]).expect_code(1);
    assert_eq!(again.error_lines().len(), 1, "{}", again.stderr());
}
