//! The buffer's reads: the store overlaid with what the batch wrote so far, and the document versions
//! its writes carry.

use serde_json::{json, Value};

use super::{Buffer, DocumentWrite, NewMessage, UnitOfWork};
use crate::{
    message::{Cause, Kind},
    plugin::HostServices,
    store::{MemoryStore, Store, ABSENT},
};

const LIMIT: usize = 1 << 20;

fn store_with(messages: Vec<NewMessage>, documents: Vec<DocumentWrite>) -> MemoryStore {
    let store = MemoryStore::default();
    let unit = UnitOfWork {
        messages,
        documents,
        ..UnitOfWork::default()
    };
    store.commit(&unit).unwrap();
    store
}

fn event(stream: &str, message_type: &str, data: Value) -> NewMessage {
    NewMessage::new(Kind::Event, stream, message_type, &data, None, None, None)
}

fn put(collection: &str, id: &str, data: Value) -> DocumentWrite {
    DocumentWrite::Put {
        collection: collection.into(),
        id: id.into(),
        data: data.to_string(),
        expected: None,
    }
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

fn drained(buffer: &Buffer<'_>) -> UnitOfWork {
    let mut unit = UnitOfWork::default();
    buffer.drain_into(&mut unit);
    unit
}

#[test]
fn a_stream_read_sees_the_stored_events_then_the_buffered_ones_in_order() {
    let store = store_with(vec![event("s-1", "T.A.v1", json!({"n": 0}))], vec![]);
    let causes = [Cause::default(); 2];
    let buffer = Buffer::new(&store, &crate::clock::SYSTEM, &causes, LIMIT);
    buffer
        .view(0)
        .raise_event(0, "s-1", "T.B.v1", br#"{"n":1}"#, None)
        .unwrap();
    buffer
        .view(1)
        .raise_event(0, "s-2", "T.C.v1", br#"{"n":9}"#, None)
        .unwrap();
    let view = buffer.view(1);
    assert_eq!(
        json_of(&view.read_stream("s-1", 0).unwrap()),
        json!([
            {"type": "T.A.v1", "position": 0, "data": {"n": 0}},
            {"type": "T.B.v1", "position": 1, "data": {"n": 1}},
        ])
    );
    assert_eq!(
        json_of(&view.read_stream("s-1", 1).unwrap()),
        json!([{"type": "T.B.v1", "position": 1, "data": {"n": 1}}])
    );
    // A failed message's writes are dropped: reads no longer see them.
    buffer.discard_from(0);
    assert_eq!(
        json_of(&view.read_stream("s-1", 0).unwrap()),
        json!([{"type": "T.A.v1", "position": 0, "data": {"n": 0}}])
    );
    assert!(drained(&buffer).is_empty());
}

#[test]
fn a_document_read_sees_the_buffered_put_or_delete_before_the_store() {
    let store = store_with(vec![], vec![put("docs", "d1", json!({"v": "stored"}))]);
    let causes = [Cause::default(); 3];
    let buffer = Buffer::new(&store, &crate::clock::SYSTEM, &causes, LIMIT);
    let view = buffer.view(0);
    let get = |id: &str| view.get_document("docs", id).unwrap().map(|d| json_of(&d));
    assert_eq!(get("d1"), Some(json!({"v": "stored"})));
    view.put_document(1, "docs", "d1", br#"{"v":"buffered"}"#)
        .unwrap();
    assert_eq!(get("d1"), Some(json!({"v": "buffered"})));
    view.delete_document(2, "docs", "d1").unwrap();
    assert_eq!(get("d1"), None);
    // Dropping the delete's message shows the put again; dropping the put's, the store.
    buffer.discard_from(2);
    assert_eq!(get("d1"), Some(json!({"v": "buffered"})));
    buffer.discard_from(1);
    assert_eq!(get("d1"), Some(json!({"v": "stored"})));
}

#[test]
fn the_first_write_of_a_document_carries_the_version_its_handler_read() {
    let store = store_with(vec![], vec![put("docs", "d1", json!({"v": 1}))]);
    let stored = store.read_document("docs", "d1").unwrap().unwrap().version;
    let causes = [Cause::default(); 1];
    let buffer = Buffer::new(&store, &crate::clock::SYSTEM, &causes, LIMIT);
    let view = buffer.view(0);
    view.get_document("docs", "d1").unwrap();
    view.get_document("docs", "missing").unwrap();
    for (id, v) in [("d1", 2), ("d1", 3), ("missing", 1), ("unread", 1)] {
        let data = json!({ "v": v }).to_string();
        view.put_document(0, "docs", id, data.as_bytes()).unwrap();
    }
    let expected: Vec<_> = drained(&buffer)
        .documents
        .iter()
        .map(|w| (w.key().1.to_owned(), w.expected()))
        .collect();
    assert_eq!(
        expected,
        [
            ("d1".to_owned(), Some(stored)),
            ("d1".to_owned(), None),
            ("missing".to_owned(), Some(ABSENT)),
            ("unread".to_owned(), None),
        ]
    );
}

#[test]
fn a_find_sees_stored_matches_overlaid_with_buffered_puts_and_deletes_and_notes_their_versions() {
    let store = store_with(
        vec![],
        vec![
            put("docs", "a", json!({"id": "a", "colour": "red"})),
            put("docs", "b", json!({"id": "b", "colour": "red"})),
            put("docs", "c", json!({"id": "c", "colour": "red"})),
        ],
    );
    let version = |id: &str| store.read_document("docs", id).unwrap().unwrap().version;
    let causes = [Cause::default(); 1];
    let buffer = Buffer::new(&store, &crate::clock::SYSTEM, &causes, LIMIT);
    let view = buffer.view(0);
    view.put_document(0, "docs", "b", br#"{"id":"b","colour":"blue"}"#)
        .unwrap();
    view.delete_document(0, "docs", "c").unwrap();
    view.put_document(0, "docs", "d", br#"{"id":"d","colour":"red"}"#)
        .unwrap();
    let found = json_of(&view.find_documents("docs", "colour", br#""red""#).unwrap());
    let mut ids: Vec<&str> = found
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["a", "d"]);
    // `a` was read through the find, so its write is conditional on that version; `b` was written
    // before the find read it, so it stays unconditional.
    view.put_document(0, "docs", "a", br#"{"id":"a","colour":"green"}"#)
        .unwrap();
    let unit = drained(&buffer);
    let a = unit.documents.iter().find(|w| w.key().1 == "a").unwrap();
    assert_eq!(a.expected(), Some(version("a")));
    let b = unit.documents.iter().find(|w| w.key().1 == "b").unwrap();
    assert_eq!(b.expected(), None);
}
