//! Interop with a real MessageDB client: what Python Protean 0.18's `message_db` event store wrote
//! (tests/fixtures/messagedb, with the script that made them) is written again exactly as the client
//! writes it, through `message_store.write_message`, then read and handled by the Rust sample domain;
//! and what Protean made of the messages protean-host wrote is checked.

use std::path::PathBuf;

use protean_host::engine::Outcome;
use serde_json::Value;

use crate::support::{count_of, engine, postgres, sample_domain, TEST_CONFIG};

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/messagedb")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// `SELECT message_store.write_message(...)` as message-db-py calls it, the JSON in dollar quotes.
fn write_message(row: &Value) -> String {
    let expected = match &row["metadata"]["domain"]["expected_version"] {
        Value::Null => "NULL".to_owned(),
        v => v.to_string(),
    };
    format!(
        "SELECT message_store.write_message('{}', '{}', '{}', $j${}$j$::jsonb, $j${}$j$::jsonb, {expected})",
        row["id"].as_str().unwrap(),
        row["stream_name"].as_str().unwrap(),
        row["type"].as_str().unwrap(),
        row["data"],
        row["metadata"],
    )
}

#[test]
fn messages_python_protean_wrote_through_message_db_are_read_and_handled() {
    let written = fixture("python-wrote/rows.json");
    let rows = written["rows"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        4,
        "two PlaceOrder commands and their OrderPlaced events"
    );
    assert!(written["expected_version_conflict"]
        .as_str()
        .unwrap()
        .starts_with("ExpectedVersionError: Wrong expected version: 5"));
    let (store, pg) = postgres();
    for row in rows {
        let position = pg.psql(&write_message(row));
        assert_eq!(
            position,
            row["position"].to_string(),
            "write_message returns the stream position"
        );
    }
    for row in rows {
        let stream = row["stream_name"].as_str().unwrap();
        let position = row["position"].as_u64().unwrap();
        let message = store.read_stream(stream, position).unwrap().remove(0);
        assert_eq!(
            message.global_position,
            row["global_position"].as_u64().unwrap()
        );
        assert_eq!(message.message_type, row["type"].as_str().unwrap());
        assert_eq!(
            message.id,
            row["metadata"]["headers"]["id"].as_str().unwrap(),
            "the id is Protean's headers.id"
        );
        assert_eq!(
            serde_json::from_str::<Value>(&message.data).unwrap(),
            row["data"]
        );
        assert_eq!(
            serde_json::from_str::<Value>(&message.metadata).unwrap(),
            row["metadata"]
        );
    }
    let report = engine(sample_domain(), "domain", store.clone(), TEST_CONFIG)
        .run()
        .unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    for (category, message_type) in [
        ("fulfilment::order", "Fulfilment.OrderPlaced.v1"),
        ("fulfilment::reservation", "Fulfilment.StockReserved.v1"),
        ("fulfilment::order", "Fulfilment.OrderShipped.v1"),
    ] {
        assert_eq!(
            count_of(store.as_ref(), category, message_type),
            2,
            "{message_type}: once per Protean order"
        );
    }
    assert!(store.dead_letters(None).unwrap().is_empty());
}

#[test]
fn protean_read_every_message_protean_host_wrote_with_its_checksum_verified() {
    let results = fixture("rust-to-python/results.json");
    assert_eq!(results["failures"], Value::Array(vec![]));
    let messages: Vec<&Value> = results["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r.get("stream").is_some())
        .collect();
    assert_eq!(
        messages.len() as u64,
        results["messages_in_store"].as_u64().unwrap(),
        "every message was read back"
    );
    let ours: Vec<&&Value> = messages
        .iter()
        .filter(|r| r["written_by"] == "protean-host")
        .collect();
    assert_eq!(
        ours.len(),
        17,
        "o-3's whole flow and the rest of o-1's and o-2's"
    );
    for r in &messages {
        assert_eq!(r["deserialized"], true, "{r}");
        assert_eq!(r["checksum_valid"], true, "{r}");
        assert_eq!(r["event_store_position"], r["position"], "{r}");
    }
    let category = results["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r.get("category_read").is_some())
        .unwrap();
    assert_eq!(
        category["types"].as_array().unwrap().len(),
        6,
        "get_category_messages: three placed, three shipped"
    );
    assert_eq!(
        category["last_of_fulfilment::order-o-1"], "Fulfilment.OrderShipped.v1",
        "get_last_stream_message"
    );
}
