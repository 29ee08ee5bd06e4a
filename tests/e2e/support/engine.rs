//! Running the Engine API in-process against real plugin libraries, on every backend: memory, SQLite
//! and a real PostgreSQL.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use protean_host::{
    config::Config,
    engine::{Engine, EngineOptions},
    message::Kind,
    plugin::Library,
    store::{MemoryStore, PostgresStore, SqliteStore, Store},
    unit_of_work::NewMessage,
};
use serde_json::json;

use super::PgServer;

/// What keeps a backend alive for the test: the SQLite file's directory, or the PostgreSQL cluster.
#[allow(dead_code, reason = "held to be dropped at the end of the test")]
pub enum Keep {
    Dir(tempfile::TempDir),
    Postgres(PgServer),
}

/// Fast retries and a generous time limit, so that tests wait only as long as the work.
pub const TEST_CONFIG: &str =
    "[server]\nretry_delay_ms = 5\nmax_retry_delay_ms = 20\ntest_mode_timeout_seconds = 60\n";

/// Tick `n` on `stream`: the event the fixture's `noop` handler takes.
pub fn ticked(stream: &str, n: u64) -> NewMessage {
    let data = json!({ "n": n, "label": "t" });
    NewMessage::new(
        Kind::Event,
        stream,
        "Probe.Ticked.v1",
        &data,
        None,
        None,
        None,
    )
}

/// A store of each kind, PostgreSQL first (so `backends().pop()` is still SQLite).
pub fn backends() -> Vec<(&'static str, Arc<dyn Store>, Option<Keep>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let (postgres, server) = postgres();
    vec![
        ("postgres", postgres, Some(Keep::Postgres(server))),
        ("memory", Arc::new(MemoryStore::default()), None),
        ("sqlite", Arc::new(sqlite), Some(Keep::Dir(dir))),
    ]
}

/// The SQLite store a server in `dir` uses by default.
pub fn sqlite(dir: &Path) -> Arc<dyn Store> {
    Arc::new(SqliteStore::open(&dir.join(".protean/store.db")).unwrap())
}

/// A fresh PostgreSQL cluster with the store set up in it.
pub fn postgres() -> (Arc<dyn Store>, PgServer) {
    let server = PgServer::start();
    let store = PostgresStore::connect(&server.store_config()).unwrap();
    store.setup().unwrap();
    (Arc::new(store), server)
}

/// A test-mode engine for `instance` of `library` on `store`, configured by `config` (TOML).
pub fn engine(library: &Path, instance: &str, store: Arc<dyn Store>, config: &str) -> Engine {
    let plugin = Library::load(library)
        .unwrap()
        .instantiate(instance, 2)
        .unwrap();
    let config = Config::parse(config, Path::new("test.toml"), &BTreeMap::new()).unwrap();
    Engine::with_store(
        plugin,
        store,
        EngineOptions {
            test_mode: true,
            config,
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

/// Ten test-mode runs of `instance` with nothing to do, each quiescent: how long they took in all.
#[track_caller]
pub fn idle_runs(instance: &str, store: &Arc<dyn Store>, config: &str) -> std::time::Duration {
    (0..10)
        .map(|_| {
            let report = engine(super::fixture_domain(), instance, store.clone(), config)
                .run()
                .unwrap();
            assert_eq!(report.outcome, protean_host::engine::Outcome::Quiescent);
            report.elapsed
        })
        .sum()
}

/// The message types of a stream, in order.
pub fn types(store: &dyn Store, stream: &str) -> Vec<String> {
    store
        .read_stream(stream, 0)
        .unwrap()
        .into_iter()
        .map(|m| m.message_type)
        .collect()
}
