//! Read models under concurrency: documents that several subscriptions or replicas read-modify-write
//! at once lose no update (a write is conditional on the version its handler read; a conflict re-runs
//! the batch).

use std::{
    collections::HashSet,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use protean_host::{
    engine::Outcome,
    message::Kind,
    store::{self, DeadLetter, MemoryStore, Store, StoredDocument, StoredMessage},
    unit_of_work::{DocumentWrite, NewMessage, UnitOfWork},
};
use serde_json::{json, Value};

use crate::support::{
    engine, sample_domain, sqlite, start_servers, wait_until, RedisServer, TEST_CONFIG,
};

const LIMIT: Duration = Duration::from_secs(120);

/// `n` OrderPlaced events, committed by another writer with outbox rows (so the replicas' outbox
/// processors publish them to the broker).
fn place_orders(store: &dyn Store, n: usize) -> Vec<String> {
    let messages: Vec<NewMessage> = (0..n)
        .map(|i| {
            let data = json!({ "order_id": format!("o{i}"), "customer": "ada", "sku": "book", "quantity": 1, "total": 1.0 });
            NewMessage::new(
                Kind::Event,
                &format!("fulfilment::order-o{i}"),
                "Fulfilment.OrderPlaced.v1",
                &data,
                None,
                None,
                None,
            )
        })
        .collect();
    // Each event opens its own stream, so its identity (what markers name) is `{stream}@0`.
    let ids = messages.iter().map(|m| format!("{}@0", m.stream)).collect();
    for chunk in messages.chunks(50) {
        store
            .commit(&UnitOfWork {
                messages: chunk.to_vec(),
                publish: true,
                ..UnitOfWork::default()
            })
            .unwrap();
    }
    ids
}

/// Three replicas of the `totals` projector share the orders stream through one consumer group, so
/// all three read-modify-write the one `totals/all` document at the same time. Every order is counted
/// exactly once: before document versions, replicas overwrote each other's counts (lost updates with
/// no fault injected).
#[test]
fn replicas_counting_into_one_document_lose_no_update() {
    const ORDERS: usize = 300;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("{}[server]\nmessages_per_tick = 5\n", redis.config()),
    )
    .unwrap();
    let store = sqlite(dir.path());
    let ids = place_orders(store.as_ref(), ORDERS);
    let domain = format!("{}:reporting", sample_domain().display());
    let _replicas = start_servers(dir.path(), 3, &domain);
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    wait_until(LIMIT, "every order handled", || {
        store
            .processed("totals-fulfilment::order", &ids)
            .unwrap()
            .len()
            == ORDERS
    });
    let totals: Value =
        serde_json::from_str(&store.document("totals", "all").unwrap().unwrap()).unwrap();
    assert_eq!(
        totals["placed"].as_u64(),
        Some(ORDERS as u64),
        "every handled order is counted once: {totals}"
    );
    assert!(store.dead_letters(None).unwrap().is_empty());
}

/// A memory store where another writer updates `totals/all` between the moment the engine's batch
/// read it and the moment the batch commits (once): the interleaving two replicas produce.
#[derive(Default)]
struct WriterInBetween {
    inner: MemoryStore,
    wrote: AtomicBool,
}

impl Store for WriterInBetween {
    fn schedules(&self) -> &dyn store::Schedules {
        self.inner.schedules()
    }
    fn read_categories(
        &self,
        c: &[String],
        after: u64,
        limit: usize,
    ) -> store::Result<Vec<StoredMessage>> {
        self.inner.read_categories(c, after, limit)
    }
    fn read_stream(&self, stream: &str, from: u64) -> store::Result<Vec<StoredMessage>> {
        self.inner.read_stream(stream, from)
    }
    fn commit(&self, unit: &UnitOfWork) -> store::Result<Option<u64>> {
        let writes_totals = unit.documents.iter().any(|d| d.key() == ("totals", "all"));
        if writes_totals && !self.wrote.swap(true, Ordering::SeqCst) {
            let other = DocumentWrite::Put {
                collection: "totals".into(),
                id: "all".into(),
                data: json!({"id": "all", "placed": 1000, "shipped": 0, "revenue": 0.0})
                    .to_string(),
                expected: None,
            };
            self.inner.commit(&UnitOfWork {
                documents: vec![other],
                ..UnitOfWork::default()
            })?;
        }
        self.inner.commit(unit)
    }
    fn position(&self, s: &str) -> store::Result<Option<u64>> {
        self.inner.position(s)
    }
    fn read_document(&self, c: &str, id: &str) -> store::Result<Option<StoredDocument>> {
        self.inner.read_document(c, id)
    }
    fn find_documents(&self, c: &str, f: &str, v: &Value) -> store::Result<Vec<StoredDocument>> {
        self.inner.find_documents(c, f, v)
    }
    fn head(&self, c: &[String]) -> store::Result<u64> {
        self.inner.head(c)
    }
    fn record_calls(&self, calls: &[protean_host::unit_of_work::CallRecord]) -> store::Result<()> {
        self.inner.record_calls(calls)
    }
    fn recorded_calls(
        &self,
        s: &str,
        ids: Option<&[&str]>,
    ) -> store::Result<std::collections::HashMap<String, u32>> {
        self.inner.recorded_calls(s, ids)
    }
    fn processed(&self, s: &str, ids: &[&str]) -> store::Result<HashSet<String>> {
        self.inner.processed(s, ids)
    }
    fn idempotency_key(&self, key: &str) -> store::Result<Option<String>> {
        self.inner.idempotency_key(key)
    }
    fn dead_letters(&self, s: Option<&str>) -> store::Result<Vec<DeadLetter>> {
        self.inner.dead_letters(s)
    }
    fn resolve_dead_letter(&self, s: &str, position: u64, by: &str) -> store::Result<bool> {
        self.inner.resolve_dead_letter(s, position, by)
    }
    fn purge_dead_letters(&self, s: &str) -> store::Result<u64> {
        self.inner.purge_dead_letters(s)
    }
    fn parked_keys(&self, s: &str) -> store::Result<Vec<store::ParkedKey>> {
        self.inner.parked_keys(s)
    }
    fn held_messages(&self, s: &str, key: &str, n: usize) -> store::Result<Vec<StoredMessage>> {
        self.inner.held_messages(s, key, n)
    }
}

/// A document written by someone else after the batch read it makes the commit conflict; the batch
/// runs again on the new document, so both updates count. Before document versions the batch's write
/// replaced the other writer's (1000 lost).
#[test]
fn a_document_changed_after_the_batch_read_it_re_runs_the_batch() {
    let store: std::sync::Arc<WriterInBetween> = std::sync::Arc::default();
    place_orders(store.as_ref(), 10);
    let engine = engine(sample_domain(), "reporting", store.clone(), TEST_CONFIG);
    let report = engine.run().unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    assert!(store.wrote.load(Ordering::SeqCst), "the other writer wrote");
    let totals: Value =
        serde_json::from_str(&store.document("totals", "all").unwrap().unwrap()).unwrap();
    assert_eq!(totals["placed"], 1010, "{totals}");
    assert_eq!((report.totals.retries, report.totals.dead_lettered), (0, 0));
}
