//! Running the Engine API in-process against real plugin libraries, on every embedded backend.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use protean_host::{
    config::Config,
    engine::{Engine, EngineOptions},
    plugin::Library,
    store::{MemoryStore, SqliteStore, Store},
};

/// Fast retries and a generous time limit, so that tests wait only as long as the work.
pub const TEST_CONFIG: &str =
    "[server]\nretry_delay_ms = 5\nmax_retry_delay_ms = 20\ntest_mode_timeout_seconds = 60\n";

/// A store of each embedded kind; the temp dir keeps the SQLite file alive.
pub fn backends() -> Vec<(&'static str, Arc<dyn Store>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    vec![
        ("memory", Arc::new(MemoryStore::default()), None),
        ("sqlite", Arc::new(sqlite), Some(dir)),
    ]
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
        },
    )
    .unwrap()
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
