//! The buffer's reads: the store overlaid with what the batch wrote so far, and the document versions
//! its writes carry; and the schedules it buffers.

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

/// A batch's reads ahead answer its handlers as the store would have: a document read ahead that
/// another writer changed before the handler's write still makes that write conflict, and a stream
/// read ahead is overlaid with the batch's own appends.
#[test]
fn reads_ahead_answer_as_the_store_would_and_keep_the_version_read() {
    let store = store_with(
        vec![event("s-1", "T.A.v1", json!({"n": 0}))],
        vec![put("docs", "d1", json!({"v": 1}))],
    );
    let causes = [Cause::default(); 2];
    let buffer = Buffer::new(&store, &crate::clock::SYSTEM, &causes, LIMIT);
    let view = buffer.view(0);
    view.prefetch(
        &[("docs", "d1"), ("docs", "absent")],
        &["s-1", "s-empty"],
        &[],
    );
    let read_ahead = store.read_document("docs", "d1").unwrap().unwrap().version;
    // Another writer changes d1 and appends to s-1 after the read ahead.
    store
        .commit(&UnitOfWork {
            messages: vec![event("s-1", "T.Z.v1", json!({"n": 9}))],
            documents: vec![put("docs", "d1", json!({"v": 2}))],
            ..UnitOfWork::default()
        })
        .unwrap();
    assert_eq!(
        view.get_document("docs", "d1")
            .unwrap()
            .map(|d| json_of(&d)),
        Some(json!({"v": 1})),
        "answered from the read ahead"
    );
    assert_eq!(view.get_document("docs", "absent").unwrap(), None);
    view.raise_event(1, "s-1", "T.B.v1", br#"{"n":1}"#, None)
        .unwrap();
    assert_eq!(
        json_of(&view.read_stream("s-1", 0).unwrap()),
        json!([
            {"type": "T.A.v1", "position": 0, "data": {"n": 0}},
            {"type": "T.B.v1", "position": 1, "data": {"n": 1}},
        ])
    );
    assert_eq!(json_of(&view.read_stream("s-empty", 0).unwrap()), json!([]));
    view.put_document(1, "docs", "d1", br#"{"v":3}"#).unwrap();
    let unit = drained(&buffer);
    assert_eq!(unit.documents[0].expected(), Some(read_ahead));
    assert!(
        matches!(
            store.commit(&unit),
            Err(crate::store::Error::DocumentConflict { .. })
        ),
        "the write of a document changed since it was read ahead conflicts"
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

/// A batch's finds made ahead answer its handlers as the store did then, overlaid with the batch's own
/// writes, and a document found ahead that another writer changed since still makes its write
/// conflict. A find the batch did not announce is made when it is asked.
#[test]
fn finds_made_ahead_answer_as_the_store_would_and_keep_the_versions_found() {
    let store = store_with(
        vec![],
        vec![
            put("docs", "a", json!({"id": "a", "colour": "red"})),
            put("docs", "b", json!({"id": "b", "colour": "blue"})),
        ],
    );
    let found_ahead = store.read_document("docs", "a").unwrap().unwrap().version;
    let causes = [Cause::default(); 1];
    let buffer = Buffer::new(&store, &crate::clock::SYSTEM, &causes, LIMIT);
    let view = buffer.view(0);
    view.prefetch(&[], &[], &[("docs", "colour", r#""red""#)]);
    // Another writer changes `a` and adds a red `c` and a blue `e` after the finds ahead.
    let a_changed = json!({"id": "a", "colour": "red", "seen": true});
    store
        .commit(&UnitOfWork {
            documents: vec![
                put("docs", "a", a_changed),
                put("docs", "c", json!({"id": "c", "colour": "red"})),
                put("docs", "e", json!({"id": "e", "colour": "blue"})),
            ],
            ..UnitOfWork::default()
        })
        .unwrap();
    view.put_document(0, "docs", "d", br#"{"id":"d","colour":"red"}"#)
        .unwrap();
    // The value asked with spaces is the value announced.
    let red = view.find_documents("docs", "colour", br#" "red" "#);
    assert_eq!(
        json_of(&red.unwrap()),
        json!([{"id": "a", "colour": "red"}, {"id": "d", "colour": "red"}]),
        "answered from the find ahead, with the batch's own write"
    );
    let blue = view.find_documents("docs", "colour", br#""blue""#);
    assert_eq!(
        json_of(&blue.unwrap()),
        json!([{"id": "b", "colour": "blue"}, {"id": "e", "colour": "blue"}]),
        "not announced: asked of the store now"
    );
    view.put_document(0, "docs", "a", br#"{"id":"a","colour":"green"}"#)
        .unwrap();
    let unit = drained(&buffer);
    let a = unit.documents.iter().find(|w| w.key().1 == "a").unwrap();
    assert_eq!(a.expected(), Some(found_ahead));
    assert!(
        matches!(
            store.commit(&unit),
            Err(crate::store::Error::DocumentConflict { .. })
        ),
        "the write of a document changed since it was found ahead conflicts"
    );
}

/// Messages of one batch that announce the same find (the same value written differently too) have
/// the store asked it once, and every one of them answered from it.
#[test]
fn a_find_announced_by_several_messages_is_asked_of_the_store_once() {
    let store = crate::store::recording::Recording::default();
    store
        .commit(&UnitOfWork {
            documents: vec![put("docs", "a", json!({"id": "a", "colour": "red"}))],
            ..UnitOfWork::default()
        })
        .unwrap();
    let causes = [Cause::default(); 2];
    let buffer = Buffer::new(&store, &crate::clock::SYSTEM, &causes, LIMIT);
    buffer.view(0).prefetch(
        &[],
        &[],
        &[
            ("docs", "colour", r#""red""#),
            ("docs", "colour", r#" "red" "#),
            ("docs", "colour", r#""blue""#),
        ],
    );
    let asked = |colour: &str| ("docs".to_owned(), "colour".to_owned(), colour.to_owned());
    assert_eq!(store.finds(), [asked(r#""red""#), asked(r#""blue""#)]);
    for offset in [0, 1] {
        let red = buffer
            .view(offset)
            .find_documents("docs", "colour", br#""red""#);
        assert_eq!(
            json_of(&red.unwrap()),
            json!([{"id": "a", "colour": "red"}])
        );
    }
    assert_eq!(store.finds().len(), 2, "both answered from the find ahead");
}

mod schedules {
    use chrono::TimeZone;
    use protean_plugin_api::{MessageKind, ScheduledMessage};
    use serde_json::Value;

    use super::{drained, LIMIT};
    use crate::{
        clock::Clock,
        message::{Cause, MetaView},
        plugin::HostServices,
        store::MemoryStore,
        unit_of_work::{Buffer, ScheduleWrite},
    };

    const START_MS: i64 = 1_767_225_600_000;

    fn clock() -> Clock {
        Clock::simulated(chrono::Utc.timestamp_millis_opt(START_MS).unwrap())
    }

    fn set(view: &impl HostServices, index: u32, key: &str, due_ms: i64, n: u32) {
        let data = format!(r#"{{"n":{n}}}"#);
        let scheduled = ScheduledMessage {
            key,
            due_ms,
            kind: MessageKind::Command,
            stream: "t::x:command-1",
            message_type: "T.Do.v1",
            data: data.as_bytes(),
        };
        view.schedule(index, scheduled).unwrap();
    }

    /// (key, due, data) of each Set, or (key, at, "cancel") of each Cancel, in order.
    fn writes(buffer: &Buffer<'_>) -> Vec<(String, i64, String)> {
        drained(buffer)
            .schedules
            .into_iter()
            .map(|w| match w {
                ScheduleWrite::Set {
                    key,
                    due_ms,
                    message,
                } => (key, due_ms, message.data),
                ScheduleWrite::Cancel { key, at_ms } => (key, at_ms, "cancel".into()),
            })
            .collect()
    }

    #[test]
    fn sets_and_cancels_are_buffered_in_handler_order_and_a_reset_keeps_both_sets() {
        let store = MemoryStore::default();
        let clock = clock();
        let causes = [Cause::default(); 2];
        let buffer = Buffer::new(&store, &clock, &causes, LIMIT);
        let view = buffer.view(0);
        assert_eq!(view.now_ms(), START_MS, "handlers see the engine's clock");
        set(&view, 0, "k1", START_MS + 60_000, 1);
        set(&view, 1, "k1", START_MS + 120_000, 2);
        view.cancel_schedule(1, "k2").unwrap();
        assert_eq!(
            writes(&buffer),
            [
                ("k1".into(), START_MS + 60_000, r#"{"n":1}"#.into()),
                ("k1".into(), START_MS + 120_000, r#"{"n":2}"#.into()),
                ("k2".into(), START_MS, "cancel".into()),
            ]
        );
    }

    #[test]
    fn a_failed_messages_schedules_are_discarded_with_its_other_writes() {
        let store = MemoryStore::default();
        let clock = clock();
        let causes = [Cause::default(); 2];
        let buffer = Buffer::new(&store, &clock, &causes, LIMIT);
        let view = buffer.view(0);
        set(&view, 0, "kept", START_MS, 1);
        set(&view, 1, "dropped", START_MS, 2);
        view.cancel_schedule(1, "kept").unwrap();
        buffer.discard_from(1);
        assert_eq!(
            writes(&buffer),
            [("kept".into(), START_MS, r#"{"n":1}"#.into())]
        );
    }

    #[test]
    fn a_scheduled_message_is_made_as_a_written_one_caused_by_its_handlers_message() {
        let store = MemoryStore::default();
        let clock = clock();
        let meta =
            MetaView::parse(r#"{"headers": {"id": "p1"}, "domain": {"correlation_id": "corr-9"}}"#)
                .unwrap();
        let causes = [
            Cause::default(),
            Cause {
                id: "p1",
                stream: "t::x-1",
                meta: Some(&meta),
            },
        ];
        let buffer = Buffer::new(&store, &clock, &causes, LIMIT);
        // A call whose first message is batch index 1.
        set(&buffer.view(1), 0, "k", START_MS + 5, 7);
        let unit = drained(&buffer);
        let [ScheduleWrite::Set { message, .. }] = unit.schedules.as_slice() else {
            panic!("one set: {:?}", unit.schedules);
        };
        assert!(
            unit.messages.is_empty(),
            "nothing is appended before it fires"
        );
        assert_eq!(message.stream, "t::x:command-1");
        assert_eq!(message.message_type, "T.Do.v1");
        assert_eq!(message.expected_version, None);
        let metadata: Value = serde_json::from_str(&message.metadata).unwrap();
        assert_eq!(metadata["domain"]["correlation_id"], "corr-9");
        assert_eq!(metadata["domain"]["causation_id"], "p1");
        assert_eq!(metadata["headers"]["id"], message.id.as_str());
        assert_eq!(metadata["headers"]["time"], message.time.as_str());
        assert!(
            message.time.starts_with("2026-01-01T00:00:00"),
            "dated by the engine's clock: {}",
            message.time
        );
    }

    #[test]
    fn a_schedule_the_store_cannot_keep_fails_its_message_for_good() {
        let store = MemoryStore::default();
        let clock = clock();
        let causes = [Cause::default(); 5];
        let buffer = Buffer::new(&store, &clock, &causes, 4096);
        let view = buffer.view(0);
        let schedule = |index: u32, key: &str, due_ms: i64, data: &[u8]| {
            let scheduled = ScheduledMessage {
                key,
                due_ms,
                kind: MessageKind::Event,
                stream: "t::x-1",
                message_type: "T.A.v1",
                data,
            };
            view.schedule(index, scheduled).unwrap_err()
        };
        let empty = schedule(0, "", START_MS, b"{}");
        assert!(empty.contains("key is empty"), "{empty}");
        let long = schedule(1, &"k".repeat(201), START_MS, b"{}");
        assert!(long.contains("201 bytes, over the 200"), "{long}");
        let past_9999 = schedule(2, "k", protean_plugin_api::MAX_DUE_MS + 1, b"{}");
        assert!(past_9999.contains("outside the times"), "{past_9999}");
        let not_json = schedule(3, "k", START_MS, b"{nope");
        assert!(
            not_json.starts_with("T.A.v1 data is not JSON"),
            "{not_json}"
        );
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(5000));
        let too_big = schedule(4, "k", START_MS, big.as_bytes());
        assert!(
            too_big.contains("over server.max_message_bytes"),
            "{too_big}"
        );
        let cancel = view.cancel_schedule(0, "").unwrap_err();
        assert_eq!(cancel, empty);
        for index in 0..5 {
            assert_eq!(
                buffer.refusal(index..index + 1).map(|(i, _)| i),
                Some(index),
                "message {index} fails for good"
            );
        }
        assert!(writes(&buffer).is_empty(), "nothing refused was buffered");
    }
}
