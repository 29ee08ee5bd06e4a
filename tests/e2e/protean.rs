//! Interoperability with Python Protean: envelopes made by the real `protean` 0.18 package
//! (tests/fixtures/protean, with the script that made them) round-trip through our types, pass our
//! checksum, and are handled by a Rust domain; what we write has Protean's shape.

use std::{path::PathBuf, sync::Arc};

use protean_host::{
    engine::Outcome,
    message::{self, Envelope, MetaView},
    store::{MemoryStore, Store},
    unit_of_work::{NewMessage, UnitOfWork},
};
use serde_json::{Map, Value};

use crate::support::{engine, sample_domain, TEST_CONFIG};

fn fixtures() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/protean/messages");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 8, "fixtures missing in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(p).unwrap(),
            )
        })
        .collect()
}

fn fixture(name: &str) -> Value {
    let (_, text) = fixtures()
        .into_iter()
        .find(|(n, _)| n.contains(name))
        .unwrap_or_else(|| panic!("no fixture {name}"));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_fixture_round_trips_unchanged_with_its_key_order() {
    for (name, text) in fixtures() {
        let original: Value = serde_json::from_str(&text).unwrap();
        let envelope: Envelope = serde_json::from_str(&text).unwrap();
        let again = serde_json::to_string(&envelope).unwrap();
        assert_eq!(again, serde_json::to_string(&original).unwrap(), "{name}");
    }
}

#[test]
fn every_fixture_passes_our_checksum_including_non_ascii_data() {
    for (name, text) in fixtures() {
        let envelope: Envelope = serde_json::from_str(&text).unwrap();
        let metadata = envelope.metadata.to_string();
        let view = MetaView::parse(&metadata).unwrap();
        assert_eq!(view.verify(&envelope.data.to_string()), Ok(()), "{name}");
    }
    let non_ascii = fixture("04-event-OrderPlaced");
    assert_eq!(
        non_ascii["data"]["sku"], "bücher-📚",
        "the fixture set covers non-ASCII data"
    );
}

#[test]
fn protean_deadlines_and_correlation_ids_are_read() {
    let command = fixture("08-command-ShipOrder");
    let metadata = command["metadata"].to_string();
    let view = MetaView::parse(&metadata).unwrap();
    let deadline =
        message::parse_time(command["metadata"]["headers"]["deadline"].as_str().unwrap()).unwrap();
    assert_eq!(
        view.expired(deadline - chrono::Duration::seconds(1)),
        Ok(false)
    );
    assert_eq!(
        view.expired(deadline + chrono::Duration::seconds(1)),
        Ok(true)
    );
    assert_eq!(
        view.correlation_id(),
        command["metadata"]["domain"]["correlation_id"].as_str()
    );
}

/// Store a Protean message as our store holds it: data and metadata apart, positions derived on read.
fn stored(envelope: &Value) -> NewMessage {
    let headers = &envelope["metadata"]["headers"];
    let mut metadata = envelope["metadata"].as_object().unwrap().clone();
    metadata.remove("event_store");
    NewMessage {
        id: headers["id"].as_str().unwrap().into(),
        stream: headers["stream"].as_str().unwrap().into(),
        message_type: headers["type"].as_str().unwrap().into(),
        time: headers["time"].as_str().unwrap().into(),
        data: envelope["data"].to_string(),
        metadata: Value::Object(metadata).to_string(),
        expected_version: None,
    }
}

#[test]
fn commands_written_by_python_protean_are_handled_by_the_rust_domain() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let python = [
        fixture("01-command-PlaceOrder"),
        fixture("03-command-PlaceOrder"),
    ];
    store
        .commit(&UnitOfWork {
            messages: python.iter().map(stored).collect(),
            ..UnitOfWork::default()
        })
        .unwrap();
    let report = engine(sample_domain(), "domain", store.clone(), TEST_CONFIG)
        .run()
        .unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    assert!(
        store.dead_letters(None).unwrap().is_empty(),
        "{:?}",
        store.dead_letters(None)
    );
    for (command, order) in python.iter().zip(["o-1", "o-2"]) {
        let events = store
            .read_stream(&format!("fulfilment::order-{order}"), 0)
            .unwrap();
        let types: Vec<&str> = events.iter().map(|m| m.message_type.as_str()).collect();
        assert_eq!(
            types,
            ["Fulfilment.OrderPlaced.v1", "Fulfilment.OrderShipped.v1"]
        );
        let placed: Value = serde_json::from_str(&events[0].metadata).unwrap();
        assert_eq!(
            placed["domain"]["causation_id"],
            command["metadata"]["headers"]["id"]
        );
        assert_eq!(
            placed["domain"]["correlation_id"],
            command["metadata"]["domain"]["correlation_id"]
        );
    }
    let placed: Value =
        serde_json::from_str(&store.read_stream("fulfilment::order-o-2", 0).unwrap()[0].data)
            .unwrap();
    assert_eq!(placed["customer"], "Zoë Ünal");
}

fn keys(value: &Value) -> Vec<String> {
    value
        .as_object()
        .map(|m: &Map<String, Value>| m.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn what_we_write_has_protean_shape() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    store
        .commit(&UnitOfWork {
            messages: vec![stored(&fixture("01-command-PlaceOrder"))],
            ..UnitOfWork::default()
        })
        .unwrap();
    engine(sample_domain(), "domain", store.clone(), TEST_CONFIG)
        .run()
        .unwrap();
    let ours = &store.read_stream("fulfilment::order-o-1", 0).unwrap()[0];
    let wire: Value = serde_json::from_str(
        &message::wire_json(
            &ours.data,
            &ours.metadata,
            ours.position,
            ours.global_position,
        )
        .unwrap(),
    )
    .unwrap();
    let theirs = fixture("02-event-OrderPlaced");
    assert_eq!(keys(&wire), keys(&theirs));
    assert_eq!(
        keys(&wire["metadata"]),
        keys(&theirs["metadata"]),
        "sections in Protean's order"
    );
    for section in ["headers", "envelope", "domain", "event_store"] {
        assert_eq!(
            keys(&wire["metadata"][section]),
            keys(&theirs["metadata"][section]),
            "{section}"
        );
    }
    assert_eq!(
        wire["data"], theirs["data"],
        "the same event data from the same command"
    );
    assert_eq!(
        wire["metadata"]["envelope"]["checksum"],
        theirs["metadata"]["envelope"]["checksum"]
    );
    assert_eq!(
        wire["metadata"]["event_store"],
        serde_json::json!({"global_position": 2, "position": 0})
    );
    for field in ["type", "stream"] {
        assert_eq!(
            wire["metadata"]["headers"][field], theirs["metadata"]["headers"][field],
            "{field}"
        );
    }
}
