//! The engine through its Rust API, with real plugin libraries, on the memory and SQLite stores.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use protean_host::{
    engine::Outcome,
    message::Kind,
    store::{self, DeadLetter, MemoryStore, Store, StoredDocument, StoredMessage},
    unit_of_work::{NewMessage, UnitOfWork},
};
use serde_json::{json, Value};

use crate::support::{backends, engine, fixture_domain, sample_domain, types, TEST_CONFIG};

fn place(order: &str) -> Value {
    json!({ "order_id": order, "customer": "ada", "sku": "book", "quantity": 2, "total": 30.0 })
}

fn doc(store: &dyn Store, collection: &str, id: &str) -> Value {
    let text = store
        .document(collection, id)
        .unwrap()
        .unwrap_or_else(|| panic!("no document {collection}/{id}"));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn an_order_reserves_stock() {
    for (backend, store, _dir) in backends() {
        let engine = engine(sample_domain(), "domain", store.clone(), TEST_CONFIG);
        engine
            .send("Fulfilment.PlaceOrder.v1", &place("o1"), None)
            .unwrap();
        assert_eq!(
            engine.run().unwrap().outcome,
            Outcome::Quiescent,
            "{backend}"
        );
        let found = store
            .find_documents("reservations", "order_id", &json!("o1"))
            .unwrap();
        assert_eq!(found.len(), 1, "{backend}");
        let reservation: Value = serde_json::from_str(&found[0].data).unwrap();
        assert_eq!(
            (
                reservation["sku"].as_str(),
                reservation["quantity"].as_u64()
            ),
            (Some("book"), Some(2)),
            "{backend}"
        );
        assert_eq!(
            types(store.as_ref(), "fulfilment::reservation-o1"),
            ["Fulfilment.StockReserved.v1"],
            "{backend}"
        );
    }
}

/// The scheduler waits for a time, not for messages: the commits of a flow that come after it last
/// looked leave it idle, not behind the head. Before, test mode waited for its next poll (a second
/// by default, a run in three or so of the sample flow's benches); here that poll is ten minutes
/// away, so a run that waited for it would hit the time limit.
#[test]
fn test_mode_does_not_wait_for_the_schedulers_poll() {
    let config = TEST_CONFIG.replace(
        "test_mode_timeout_seconds = 60",
        "test_mode_timeout_seconds = 20",
    ) + "[server.scheduler]\npoll_interval_ms = 600000\n";
    for (backend, store, _dir) in backends() {
        let engine = engine(sample_domain(), "domain", store.clone(), &config);
        for n in 0..10 {
            engine
                .send("Fulfilment.PlaceOrder.v1", &place(&format!("o{n}")), None)
                .unwrap();
        }
        assert_eq!(
            engine.run().unwrap().outcome,
            Outcome::Quiescent,
            "{backend}"
        );
    }
}

#[test]
fn the_whole_flow_ends_shipped() {
    for (backend, store, _dir) in backends() {
        let engine = engine(sample_domain(), "domain", store.clone(), TEST_CONFIG);
        for n in 0..20 {
            engine
                .send("Fulfilment.PlaceOrder.v1", &place(&format!("o{n}")), None)
                .unwrap();
        }
        let report = engine.run().unwrap();
        assert_eq!(report.outcome, Outcome::Quiescent, "{backend}");
        for n in 0..20 {
            let order = format!("o{n}");
            assert_eq!(
                doc(store.as_ref(), "order_summaries", &order)["status"],
                "shipped",
                "{backend} {order}"
            );
            assert_eq!(
                types(store.as_ref(), &format!("fulfilment::order-{order}")),
                ["Fulfilment.OrderPlaced.v1", "Fulfilment.OrderShipped.v1"],
                "{backend}"
            );
            assert_eq!(
                types(store.as_ref(), &format!("fulfilment::payment-{order}")),
                ["Fulfilment.PaymentProcessed.v1"]
            );
        }
        assert_eq!(
            report.totals.written["Fulfilment.OrderShipped.v1"], 20,
            "{backend}"
        );
        assert_eq!(report.totals.dead_lettered, 0, "{backend}");
    }
}

#[test]
fn a_second_run_finds_nothing_to_do_and_changes_nothing() {
    let (_, store, _dir) = backends().pop().unwrap();
    let first = engine(sample_domain(), "domain", store.clone(), TEST_CONFIG);
    first
        .send("Fulfilment.PlaceOrder.v1", &place("o1"), None)
        .unwrap();
    first.run().unwrap();
    let head = store.head(&[]).unwrap();
    let second = engine(sample_domain(), "domain", store.clone(), TEST_CONFIG)
        .run()
        .unwrap();
    assert_eq!(second.outcome, Outcome::Quiescent);
    assert!(
        second.totals.handled.is_empty(),
        "{:?}",
        second.totals.handled
    );
    assert_eq!(store.head(&[]).unwrap(), head);
}

#[test]
fn the_reporting_instance_keeps_its_own_read_model() {
    let (_, store, _dir) = backends().pop().unwrap();
    let domain = engine(sample_domain(), "domain", store.clone(), TEST_CONFIG);
    domain
        .send("Fulfilment.PlaceOrder.v1", &place("o1"), None)
        .unwrap();
    domain
        .send("Fulfilment.PlaceOrder.v1", &place("o2"), None)
        .unwrap();
    domain.run().unwrap();
    assert_eq!(
        store.document("totals", "all").unwrap(),
        None,
        "the domain instance has no totals projector"
    );
    let reporting = engine(sample_domain(), "reporting", store.clone(), TEST_CONFIG);
    assert_eq!(reporting.run().unwrap().outcome, Outcome::Quiescent);
    let totals = doc(store.as_ref(), "totals", "all");
    assert_eq!(
        (
            totals["placed"].as_u64(),
            totals["shipped"].as_u64(),
            totals["revenue"].as_f64()
        ),
        (Some(2), Some(2), Some(60.0))
    );
}

#[test]
fn a_cascade_of_twelve_hops_completes() {
    for (backend, store, _dir) in backends() {
        let engine = engine(fixture_domain(), "probe", store.clone(), TEST_CONFIG);
        engine
            .send(
                "Probe.Step.v1",
                &json!({ "chain": "c", "n": 0, "depth": 12 }),
                None,
            )
            .unwrap();
        let report = engine.run().unwrap();
        assert_eq!(report.outcome, Outcome::Quiescent, "{backend}");
        assert_eq!(report.totals.written["Probe.Hopped.v1"], 12, "{backend}");
        assert_eq!(
            types(store.as_ref(), "probe::probe-c-11"),
            ["Probe.Hopped.v1"],
            "{backend}: the last hop ran"
        );
        let last: Value =
            serde_json::from_str(&store.read_stream("probe::probe-c-11", 0).unwrap()[0].metadata)
                .unwrap();
        let first: Value = serde_json::from_str(
            &store.read_stream("probe::probe:command-c-0", 0).unwrap()[0].metadata,
        )
        .unwrap();
        assert_eq!(
            last["domain"]["correlation_id"], first["domain"]["correlation_id"],
            "{backend}: the correlation id flows down the cascade"
        );
    }
}

/// Another consumer committed one of the messages first (a reclaimed entry of a slow replica, a
/// stalled lease owner): the commit is refused whole, the batch runs again without that message, and
/// its effects are not doubled.
#[test]
fn a_message_another_consumer_committed_first_is_not_handled_twice() {
    for (backend, store, _keep) in backends() {
        let hop = |chain: &str| {
            NewMessage::new(
                Kind::Event,
                &format!("probe::probe-{chain}-0"),
                "Probe.Hopped.v1",
                &json!({ "chain": chain, "n": 0, "depth": 2 }),
                None,
                None,
                None,
            )
        };
        let (taken, free) = (hop("taken"), hop("free"));
        let marker = protean_host::unit_of_work::ProcessedMarker {
            subscription: "chain".into(),
            // The message's identity: its stream and position (the first of its stream).
            message_id: format!("{}@0", taken.stream),
            // The first message of a new store.
            global_position: 1,
            build_id: "another replica".into(),
        };
        store
            .commit(&UnitOfWork {
                messages: vec![taken, free],
                processed: vec![marker],
                ..UnitOfWork::default()
            })
            .unwrap();
        let report = engine(fixture_domain(), "probe", store.clone(), TEST_CONFIG)
            .run()
            .unwrap();
        assert_eq!(report.outcome, Outcome::Quiescent, "{backend}");
        assert!(
            store
                .read_stream("probe::probe:command-taken-1", 0)
                .unwrap()
                .is_empty(),
            "{backend}: the message committed elsewhere is not handled again"
        );
        assert_eq!(
            types(store.as_ref(), "probe::probe:command-free-1"),
            ["Probe.Step.v1"],
            "{backend}: the rest of the batch is handled"
        );
        assert!(store.dead_letters(None).unwrap().is_empty(), "{backend}");
    }
}

fn run_probe(
    store: &Arc<dyn Store>,
    behaviours: &[(&str, &str)],
) -> protean_host::engine::RunReport {
    let engine = engine(fixture_domain(), "probe", store.clone(), TEST_CONFIG);
    for (id, behaviour) in behaviours {
        engine
            .send(
                "Probe.Run.v1",
                &json!({ "id": id, "behaviour": behaviour }),
                None,
            )
            .unwrap();
    }
    let report = engine.run().unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    report
}

fn ran(store: &dyn Store, id: &str) -> Vec<Value> {
    store
        .read_stream(&format!("probe::probe-{id}"), 0)
        .unwrap()
        .iter()
        .map(|m| serde_json::from_str(&m.data).unwrap())
        .collect()
}

#[test]
fn a_handler_that_fails_twice_then_succeeds() {
    for (backend, store, _dir) in backends() {
        let report = run_probe(&store, &[("flaky", "fail:2"), ("after", "ok")]);
        assert_eq!(
            ran(store.as_ref(), "flaky"),
            [json!({ "id": "flaky", "attempts": 3 })],
            "{backend}"
        );
        assert_eq!(
            ran(store.as_ref(), "after").len(),
            1,
            "{backend}: the next message waited and then ran"
        );
        assert_eq!(
            (report.totals.retries, report.totals.dead_lettered),
            (2, 0),
            "{backend}"
        );
        assert!(store.dead_letters(None).unwrap().is_empty(), "{backend}");
    }
}

#[test]
fn a_handler_that_always_fails_is_dead_lettered_and_the_subscription_moves_on() {
    for (backend, store, _dir) in backends() {
        let report = run_probe(&store, &[("doomed", "always"), ("after", "ok")]);
        let dead = store.dead_letters(Some("commands:probe::probe")).unwrap();
        assert_eq!(dead.len(), 1, "{backend}");
        let DeadLetter {
            handler,
            attempts,
            error,
            message_type,
            stream,
            build_id,
            ..
        } = &dead[0];
        assert_eq!(
            (handler.as_str(), *attempts, message_type.as_str()),
            ("runner", 4, "Probe.Run.v1"),
            "{backend}: 1 try + 3 retries"
        );
        assert_eq!(error, "probe doomed always fails");
        assert_eq!(stream, "probe::probe:command-doomed");
        assert_eq!(build_id.len(), 12);
        assert!(ran(store.as_ref(), "doomed").is_empty());
        assert_eq!(ran(store.as_ref(), "after").len(), 1, "{backend}");
        assert_eq!(
            (report.totals.retries, report.totals.dead_lettered),
            (3, 1),
            "{backend}"
        );
        let position = store.position("commands:probe::probe").unwrap().unwrap();
        assert_eq!(
            position,
            store.head(&["probe::probe:command".into()]).unwrap(),
            "{backend}: position past both"
        );
    }
}

#[test]
fn a_rejection_or_a_panic_is_handled_as_the_error_says() {
    let (_, store, _dir) = backends().pop().unwrap();
    run_probe(&store, &[("no", "reject"), ("boom", "panic")]);
    let dead = store.dead_letters(None).unwrap();
    let summary: Vec<(&str, u32)> = dead
        .iter()
        .map(|d| (d.message_id.as_str(), d.attempts))
        .collect();
    assert_eq!(summary.len(), 2);
    assert_eq!(dead[0].attempts, 1, "a rejection is dead-lettered at once");
    assert_eq!(dead[1].attempts, 4, "a panic is retried like any failure");
    assert!(
        dead[1].error.contains("handler panicked"),
        "{}",
        dead[1].error
    );
}

fn raw_command(stream: &str, message_type: &str, data: &str, metadata: &str) -> NewMessage {
    let mut message = NewMessage::new(
        Kind::Command,
        stream,
        message_type,
        &json!({}),
        None,
        None,
        None,
    );
    (message.data, message.metadata) = (data.into(), metadata.into());
    message
}

#[test]
fn poison_messages_are_dead_lettered_at_once() {
    for (backend, store, _dir) in backends() {
        let good = NewMessage::new(
            Kind::Command,
            "probe::probe:command-ok",
            "Probe.Run.v1",
            &json!({"id": "ok", "behaviour": "ok"}),
            None,
            None,
            None,
        );
        let tampered = raw_command(
            "probe::probe:command-t",
            "Probe.Run.v1",
            r#"{"id": "t", "behaviour": "ok"}"#,
            r#"{"headers": {"id": "t"}, "envelope": {"specversion": "1.0", "checksum": "0000"}}"#,
        );
        let unreadable = raw_command(
            "probe::probe:command-u",
            "Probe.Run.v1",
            r#"{"id": "u", "behaviour": "ok"}"#,
            "{not json",
        );
        let unknown = raw_command("probe::probe:command-x", "Probe.Explode.v1", "{}", "{}");
        let bad_data = raw_command(
            "probe::probe:command-d",
            "Probe.Run.v1",
            r#"{"id": 5}"#,
            "{}",
        );
        // PostgreSQL keeps data and metadata in MessageDB's jsonb columns: text that is not JSON is
        // refused when written, so it can never reach a subscription there.
        let refuses_non_json = backend == "postgres";
        let mut messages = vec![tampered, unreadable, unknown, bad_data, good];
        if refuses_non_json {
            let unreadable = messages.remove(1);
            let refused = store.commit(&UnitOfWork {
                messages: vec![unreadable],
                ..UnitOfWork::default()
            });
            assert!(
                refused.is_err(),
                "{backend}: metadata that is not JSON is refused"
            );
        }
        store
            .commit(&UnitOfWork {
                messages,
                ..UnitOfWork::default()
            })
            .unwrap();
        let report = engine(fixture_domain(), "probe", store.clone(), TEST_CONFIG)
            .run()
            .unwrap();
        assert_eq!(
            report.totals.retries, 0,
            "{backend}: nothing poison is retried"
        );
        let dead = store.dead_letters(None).unwrap();
        let mut errors: Vec<&str> = dead.iter().map(|d| d.error.as_str()).collect();
        assert_eq!(
            dead.len(),
            4 - usize::from(refuses_non_json),
            "{backend}: {errors:?}"
        );
        if !refuses_non_json {
            let unreadable = errors.remove(1);
            assert!(
                unreadable.starts_with("metadata is not valid JSON"),
                "{unreadable}"
            );
        }
        assert!(errors[0].starts_with("checksum mismatch"), "{}", errors[0]);
        assert_eq!(
            errors[1],
            "no handler for command type Probe.Explode.v1; is the right domain loaded?"
        );
        assert!(errors[2].starts_with("cannot decode Run"), "{}", errors[2]);
        assert!(dead.iter().all(|d| d.attempts == 1));
        assert_eq!(
            ran(store.as_ref(), "ok").len(),
            1,
            "{backend}: the good message after them ran"
        );
        assert!(ran(store.as_ref(), "t").is_empty());
    }
}

#[test]
fn a_command_past_its_deadline_is_acknowledged_without_a_call() {
    let (_, store, _dir) = backends().pop().unwrap();
    let engine = engine(fixture_domain(), "probe", store.clone(), TEST_CONFIG);
    engine
        .send(
            "Probe.Run.v1",
            &json!({"id": "late", "behaviour": "ok"}),
            Some("2001-01-01T00:00:00+00:00"),
        )
        .unwrap();
    engine
        .send(
            "Probe.Run.v1",
            &json!({"id": "timely", "behaviour": "ok"}),
            Some("2999-01-01T00:00:00+00:00"),
        )
        .unwrap();
    let report = engine.run().unwrap();
    assert!(ran(store.as_ref(), "late").is_empty());
    assert_eq!(ran(store.as_ref(), "timely").len(), 1);
    assert_eq!(
        report.totals.handled["Probe.Run.v1"], 1,
        "only the timely command reached its handler"
    );
    assert!(store.dead_letters(None).unwrap().is_empty());
}

#[test]
fn sending_checks_the_command_against_the_domain() {
    let (_, store, _dir) = backends().pop().unwrap();
    let engine = engine(sample_domain(), "domain", store.clone(), TEST_CONFIG);
    let unknown = engine
        .send("Fulfilment.Explode.v1", &json!({}), None)
        .unwrap_err()
        .to_string();
    assert_eq!(unknown, "cannot send Fulfilment.Explode.v1: no command handler handles Fulfilment.Explode.v1; commands of this domain: Fulfilment.CancelOrder.v1, Fulfilment.PlaceOrder.v1, Fulfilment.ProcessPayment.v1, Fulfilment.ShipOrder.v1");
    let missing = engine
        .send("Fulfilment.ShipOrder.v1", &json!({"id": 1}), None)
        .unwrap_err()
        .to_string();
    assert!(missing.starts_with("cannot send Fulfilment.ShipOrder.v1: cannot decode ShipOrder: missing field `order_id`"), "{missing}");
    assert_eq!(store.head(&[]).unwrap(), 0, "nothing was written");
}

#[test]
fn test_mode_stops_at_its_time_limit_and_names_the_busy_subscription() {
    let (_, store, _dir) = backends().pop().unwrap();
    let config = "[server]\ntest_mode_timeout_seconds = 1\nshutdown_grace_seconds = 5\n";
    let engine = engine(fixture_domain(), "probe", store.clone(), config);
    engine
        .send(
            "Probe.Run.v1",
            &json!({"id": "slow", "behaviour": "sleep:1500"}),
            None,
        )
        .unwrap();
    let report = engine.run().unwrap();
    assert_eq!(report.exit_code(), 1);
    let Outcome::TimedOut { busy } = report.outcome else {
        panic!("{:?}", report.outcome)
    };
    assert_eq!(busy, ["commands:probe::probe (handling a batch)"]);
    assert_eq!(
        ran(store.as_ref(), "slow").len(),
        1,
        "the batch in flight finished and committed during shutdown"
    );
}

#[test]
fn an_empty_domain_has_nothing_to_run() {
    let (_, store, _dir) = backends().pop().unwrap();
    let report = engine(fixture_domain(), "empty", store, TEST_CONFIG)
        .run()
        .unwrap();
    assert_eq!(
        (report.exit_code(), report.outcome),
        (0, Outcome::NothingToRun)
    );
}

/// A memory store whose first commit of a handler's writes fails with a version conflict, as if
/// another writer got there first.
#[derive(Default)]
struct ConflictOnce {
    inner: MemoryStore,
    conflicted: AtomicBool,
}

impl Store for ConflictOnce {
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
        if !unit.processed.is_empty() && !self.conflicted.swap(true, Ordering::SeqCst) {
            return Err(store::Error::VersionConflict {
                stream: "probe::probe-x".into(),
                expected: -1,
                actual: 0,
            });
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
    fn processed(&self, s: &str, ids: &[&str]) -> store::Result<std::collections::HashSet<String>> {
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

#[test]
fn a_version_conflict_re_runs_the_batch_without_counting_a_failure() {
    let store: Arc<ConflictOnce> = Arc::default();
    let engine = engine(fixture_domain(), "probe", store.clone(), TEST_CONFIG);
    engine
        .send("Probe.Run.v1", &json!({"id": "x", "behaviour": "ok"}), None)
        .unwrap();
    let report = engine.run().unwrap();
    assert!(
        store.conflicted.load(Ordering::SeqCst),
        "the conflict happened"
    );
    assert_eq!(
        ran(store.as_ref(), "x"),
        [json!({"id": "x", "attempts": 2})],
        "handled again after the conflict, committed once"
    );
    assert_eq!((report.totals.retries, report.totals.dead_lettered), (0, 0));
}
