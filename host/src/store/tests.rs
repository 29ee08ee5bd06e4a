//! The store conformance suite: the same tests for every backend.

use serde_json::json;

mod schedules;

use super::{DeadLetter, Error, InFlight, MarkerKey, ParkedKey, Store, ABSENT};
use crate::{
    message::Kind,
    ownership::Owned,
    unit_of_work::{
        CallRecord, DocumentWrite, Fence, IdempotencyKey, NewMessage, Parking, PositionUpdate,
        ProcessedMarker, UnitOfWork,
    },
};

fn event(stream: &str, n: u64, expected: Option<i64>) -> NewMessage {
    NewMessage::new(
        Kind::Event,
        stream,
        "Shop.Happened.v1",
        &json!({ "n": n }),
        expected,
        None,
        None,
    )
}

/// Commit `messages` as one unit.
pub(crate) fn append(store: &dyn Store, messages: Vec<NewMessage>) -> Result<Option<u64>, Error> {
    store.commit(&UnitOfWork {
        messages,
        ..UnitOfWork::default()
    })
}

/// Commit `messages` as one unit that publishes them (an outbox row each).
fn publish(store: &dyn Store, messages: Vec<NewMessage>) {
    store
        .commit(&UnitOfWork {
            messages,
            publish: true,
            ..UnitOfWork::default()
        })
        .unwrap();
}

pub(super) fn positions_are_per_stream_and_global(store: &dyn Store) {
    append(
        store,
        vec![
            event("shop::order-1", 0, Some(-1)),
            event("shop::order-2", 0, None),
        ],
    )
    .unwrap();
    let last = append(store, vec![event("shop::order-1", 1, Some(0))]).unwrap();
    assert_eq!(last, Some(3));
    let stream: Vec<(u64, u64)> = store
        .read_stream("shop::order-1", 0)
        .unwrap()
        .iter()
        .map(|m| (m.position, m.global_position))
        .collect();
    assert_eq!(stream, [(0, 1), (1, 3)]);
    assert_eq!(store.read_stream("shop::order-1", 1).unwrap().len(), 1);
    assert_eq!(store.head(&["shop::order".into()]).unwrap(), 3);
    assert_eq!(store.head(&["shop::other".into()]).unwrap(), 0);
    assert_eq!(store.head(&[]).unwrap(), 3);
}

pub(super) fn category_reads_page_by_global_position(store: &dyn Store) {
    for n in 0..5 {
        append(
            store,
            vec![
                event(&format!("shop::order-{n}"), n, None),
                event(&format!("shop::stock-{n}"), n, None),
            ],
        )
        .unwrap();
    }
    let orders: Vec<u64> = store
        .read_categories(&["shop::order".into()], 0, 3)
        .unwrap()
        .iter()
        .map(|m| m.global_position)
        .collect();
    assert_eq!(orders, [1, 3, 5]);
    let next: Vec<u64> = store
        .read_categories(&["shop::order".into()], 5, 10)
        .unwrap()
        .iter()
        .map(|m| m.global_position)
        .collect();
    assert_eq!(next, [7, 9]);
    let both: Vec<u64> = store
        .read_categories(&["shop::order".into(), "shop::stock".into()], 2, 4)
        .unwrap()
        .iter()
        .map(|m| m.global_position)
        .collect();
    assert_eq!(both, [3, 4, 5, 6]);
}

/// A category is its name exactly: neither the categories it is a prefix of nor its own prefixes are
/// read with it, and its head is its own last message.
pub(super) fn a_category_is_read_by_its_exact_name(store: &dyn Store) {
    let streams = [
        "sho-1",
        "shop-1",
        "shop::order-1",
        "shopping-1",
        "shop-2",
        "shop_-1",
    ];
    let messages = streams.iter().map(|s| event(s, 0, None)).collect();
    append(store, messages).unwrap();
    let read = |categories: &[&str], after| -> Vec<u64> {
        let categories: Vec<String> = categories.iter().map(|c| c.to_string()).collect();
        let page = store.read_categories(&categories, after, 10).unwrap();
        page.iter().map(|m| m.global_position).collect()
    };
    assert_eq!(read(&["shop"], 0), [2, 5]);
    assert_eq!(read(&["shop"], 2), [5]);
    assert_eq!(read(&["shop", "sho"], 0), [1, 2, 5]);
    assert_eq!(store.head(&["shop".into()]).unwrap(), 5);
    assert_eq!(store.head(&["sho".into()]).unwrap(), 1);
    assert_eq!(store.head(&["sh".into()]).unwrap(), 0, "no category sh");
}

pub(super) fn a_version_conflict_commits_nothing(store: &dyn Store) {
    append(store, vec![event("shop::order-1", 0, Some(-1))]).unwrap();
    let unit = UnitOfWork {
        messages: vec![
            event("shop::order-2", 0, None),
            event("shop::order-1", 1, Some(-1)),
        ],
        documents: vec![DocumentWrite::Put {
            collection: "c".into(),
            id: "1".into(),
            data: "{}".into(),
            expected: None,
        }],
        position: Some(PositionUpdate {
            subscription: "s".into(),
            position: 9,
        }),
        ..UnitOfWork::default()
    };
    let error = store.commit(&unit).unwrap_err();
    assert!(
        matches!(&error, Error::VersionConflict { stream, expected: -1, actual: 0 } if stream == "shop::order-1"),
        "{error}"
    );
    assert!(store.read_stream("shop::order-2", 0).unwrap().is_empty());
    assert_eq!(store.document("c", "1").unwrap(), None);
    assert_eq!(store.position("s").unwrap(), None);
}

pub(super) fn expected_versions_chain_within_a_unit(store: &dyn Store) {
    append(
        store,
        vec![
            event("shop::order-1", 0, Some(-1)),
            event("shop::order-1", 1, Some(0)),
            event("shop::order-1", 2, Some(1)),
        ],
    )
    .unwrap();
    assert_eq!(store.read_stream("shop::order-1", 0).unwrap().len(), 3);
}

pub(super) fn a_duplicate_message_id_is_refused(store: &dyn Store) {
    let message = event("shop::order-1", 0, None);
    append(store, vec![message.clone()]).unwrap();
    assert!(matches!(
        append(store, vec![message]),
        Err(Error::DuplicateMessage(_))
    ));
}

pub(super) fn documents_are_found_by_field(store: &dyn Store) {
    let put = |id: &str, order: &str| DocumentWrite::Put {
        collection: "reservations".into(),
        id: id.into(),
        data: json!({ "id": id, "order_id": order, "qty": 2 }).to_string(),
        expected: None,
    };
    let documents = vec![put("r1", "o1"), put("r2", "o2"), put("r3", "o1")];
    store
        .commit(&UnitOfWork {
            documents,
            ..UnitOfWork::default()
        })
        .unwrap();
    let by = |field: &str, v: serde_json::Value| -> Vec<String> {
        let found = store.find_documents("reservations", field, &v).unwrap();
        found.into_iter().map(|d| d.id).collect()
    };
    assert_eq!(by("order_id", json!("o1")), ["r1", "r3"]);
    assert_eq!(
        store
            .find_documents("reservations", "qty", &json!(2))
            .unwrap()
            .len(),
        3
    );
    let moved = vec![
        put("r3", "o2"),
        DocumentWrite::Delete {
            collection: "reservations".into(),
            id: "r1".into(),
            expected: None,
        },
    ];
    store
        .commit(&UnitOfWork {
            documents: moved,
            ..UnitOfWork::default()
        })
        .unwrap();
    assert!(by("order_id", json!("o1")).is_empty());
    assert_eq!(by("order_id", json!("o2")), ["r2", "r3"]);
    // An unchanged field of a moved document is still found; a deleted document's fields are gone.
    assert_eq!(by("qty", json!(2)), ["r2", "r3"]);
    assert!(by("id", json!("r1")).is_empty());
    assert_eq!(by("id", json!("r3")), ["r3"]);
    assert_eq!(store.document("reservations", "r1").unwrap(), None);
    assert!(store
        .document("reservations", "r2")
        .unwrap()
        .unwrap()
        .contains("\"o2\""));
    assert!(matches!(
        store.find_documents("reservations", "a.b", &json!(1)),
        Err(Error::BadField(_))
    ));
}

/// Whatever a value holds (quotes, backslashes, braces, text beyond ASCII, ten thousand characters), a
/// find by it answers its documents and only those of the collection asked (even where the collection
/// and field names run into each other); a document with a field no find could name (a NUL in it) is
/// written and found by its other fields.
pub(super) fn documents_are_found_by_any_value_in_their_own_collection(store: &dyn Store) {
    let long: String = (0..1000)
        .map(|i| format!("{i:05}-{}-", i * 7919 % 1009))
        .collect();
    let awkward = "a \"quoted\", {braced} \\ back\\slashed, ünïcode";
    let doc = |collection: &str, id: &str, data: serde_json::Value| DocumentWrite::Put {
        collection: collection.into(),
        id: id.into(),
        data: data.to_string(),
        expected: None,
    };
    let documents = vec![
        doc("notes", "long", json!({ "text": long, "tag": "x" })),
        doc(
            "notes",
            "awkward",
            json!({ "text": awkward, "a=b": "y", "nul\u{0}key": 1 }),
        ),
        doc("notes2", "long", json!({ "text": long })),
        doc("ab", "1", json!({ "c": 1 })),
        doc("a", "2", json!({ "bc": 1 })),
    ];
    store
        .commit(&UnitOfWork {
            documents,
            ..UnitOfWork::default()
        })
        .unwrap();
    let ids = |collection: &str, field: &str, v: serde_json::Value| -> Vec<String> {
        let found = store.find_documents(collection, field, &v).unwrap();
        found.into_iter().map(|d| d.id).collect()
    };
    assert_eq!(ids("notes", "text", json!(long)), ["long"]);
    assert!(ids("notes", "text", json!(format!("{long}!"))).is_empty());
    assert_eq!(ids("notes2", "text", json!(long)), ["long"]);
    assert_eq!(ids("notes", "text", json!(awkward)), ["awkward"]);
    assert_eq!(ids("notes", "tag", json!("x")), ["long"]);
    assert_eq!(ids("ab", "c", json!(1)), ["1"]);
    assert_eq!(ids("a", "bc", json!(1)), ["2"]);
    assert!(ids("a", "c", json!(1)).is_empty());
}

/// A unit of a batch's markers commits them all (250: two full batches of the default size, and a
/// rest). One whose hundred markers include one committed before is refused whole, naming that one:
/// none of its other markers, nor its effects, are written.
pub(super) fn a_batch_of_markers_with_one_processed_before_is_refused_whole(store: &dyn Store) {
    let marker = |n: u64| ProcessedMarker {
        subscription: "s".into(),
        message_id: format!("m{n}"),
        global_position: n,
        build_id: "b".into(),
    };
    let found = |from: u64, to: u64| {
        let ids: Vec<String> = (from..to).map(|n| format!("m{n}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        store.processed("s", &ids).unwrap().len()
    };
    let first = UnitOfWork {
        processed: (1..251).map(marker).collect(),
        ..UnitOfWork::default()
    };
    store.commit(&first).unwrap();
    assert_eq!(found(1, 251), 250);
    let mut processed: Vec<ProcessedMarker> = (300..399).map(marker).collect();
    processed.insert(50, marker(150));
    let refused = store.commit(&UnitOfWork {
        messages: vec![event("shop::order-9", 0, None)],
        processed,
        ..UnitOfWork::default()
    });
    assert!(
        matches!(
            refused,
            Err(Error::AlreadyProcessed { ref subscription, ref message_id })
                if subscription == "s" && message_id == "m150"
        ),
        "the refusal names the message marked before: {refused:?}"
    );
    assert_eq!(
        found(300, 399),
        0,
        "no marker of the refused unit is written"
    );
    assert!(store.read_stream("shop::order-9", 0).unwrap().is_empty());
}

/// Positions and markers commit with the effects; a second commit of a marker (another consumer got
/// there first) is refused whole.
pub(super) fn positions_and_markers_commit_with_effects(store: &dyn Store) {
    let unit = UnitOfWork {
        messages: vec![event("shop::order-1", 0, None)],
        processed: vec![ProcessedMarker {
            subscription: "s".into(),
            message_id: "m1".into(),
            global_position: 0,
            build_id: "b".into(),
        }],
        position: Some(PositionUpdate {
            subscription: "s".into(),
            position: 41,
        }),
        ..UnitOfWork::default()
    };
    store.commit(&unit).unwrap();
    assert_eq!(store.position("s").unwrap(), Some(41));
    let again = UnitOfWork {
        position: Some(PositionUpdate {
            subscription: "s".into(),
            position: 42,
        }),
        ..unit.clone()
    };
    let raced = store.commit(&UnitOfWork {
        messages: vec![event("shop::order-2", 0, None)],
        ..again
    });
    assert!(
        matches!(raced, Err(Error::AlreadyProcessed { ref subscription, .. }) if subscription == "s"),
        "a message handled twice is refused: {raced:?}"
    );
    assert_eq!(
        store.position("s").unwrap(),
        Some(41),
        "nothing of the refused unit is written"
    );
    assert!(store.read_stream("shop::order-2", 0).unwrap().is_empty());
}

pub(super) fn markers_are_found_by_message_id(store: &dyn Store) {
    let marker = |id: &str| ProcessedMarker {
        subscription: "s".into(),
        message_id: id.into(),
        global_position: 0,
        build_id: "b".into(),
    };
    store
        .commit(&UnitOfWork {
            processed: vec![marker("m1"), marker("m2")],
            ..UnitOfWork::default()
        })
        .unwrap();
    let found = store.processed("s", &["m1", "m3", "m2"]).unwrap();
    assert_eq!(found.len(), 2);
    assert!(found.contains("m1") && found.contains("m2"));
    assert!(store.processed("other", &["m1"]).unwrap().is_empty());
    // A unit of markers alone (PostgreSQL commits it as one statement) is refused whole when one of
    // its messages was handled before.
    let raced = store.commit(&UnitOfWork {
        processed: vec![marker("m3"), marker("m2"), marker("m4")],
        ..UnitOfWork::default()
    });
    assert!(
        matches!(raced, Err(Error::AlreadyProcessed { ref subscription, .. }) if subscription == "s"),
        "{raced:?}"
    );
    assert_eq!(
        store.processed("s", &["m3", "m4"]).unwrap().len(),
        0,
        "nothing of the refused unit is written"
    );
}

/// The engine's lookup finds a marker by the message's global position and identity: a redelivered
/// message is found whether it carries its global position or not (0), and a marker is never found
/// for another message at the same global position (an entry of another store) or another identity.
/// One message's marker twice in a unit (a batch that held it twice, built without a lookup) is
/// refused as processed before, naming it, whether the unit holds markers alone or effects too;
/// nothing of it is written.
pub(super) fn a_unit_with_one_message_twice_is_refused_as_processed_before(store: &dyn Store) {
    let marker = |id: &str, global_position| ProcessedMarker {
        subscription: "s".into(),
        message_id: id.into(),
        global_position,
        build_id: "b".into(),
    };
    let twice = vec![marker("shop::order-1@0", 1), marker("shop::order-1@0", 1)];
    let alone = store.commit(&UnitOfWork {
        processed: twice.clone(),
        ..UnitOfWork::default()
    });
    let names_it = |refused: &Result<Option<u64>, Error>| {
        matches!(
            refused,
            Err(Error::AlreadyProcessed { message_id, .. }) if message_id == "shop::order-1@0"
        )
    };
    assert!(names_it(&alone), "{alone:?}");
    let with_effects = store.commit(&UnitOfWork {
        messages: vec![event("shop::order-2", 0, None)],
        processed: twice,
        ..UnitOfWork::default()
    });
    assert!(names_it(&with_effects), "{with_effects:?}");
    assert!(store
        .processed("s", &["shop::order-1@0"])
        .unwrap()
        .is_empty());
    assert!(store.read_stream("shop::order-2", 0).unwrap().is_empty());
}

pub(super) fn markers_are_found_by_position_and_identity(store: &dyn Store) {
    let marker = |global_position: u64, id: &str| ProcessedMarker {
        subscription: "s".into(),
        message_id: id.into(),
        global_position,
        build_id: "b".into(),
    };
    let key = |global_position: u64, identity: &'static str| MarkerKey {
        global_position,
        identity,
    };
    store
        .commit(&UnitOfWork {
            processed: vec![marker(7, "shop::order-1@0"), marker(0, "protean-id")],
            ..UnitOfWork::default()
        })
        .unwrap();
    let found = store
        .processed_messages(
            "s",
            &[
                key(7, "shop::order-1@0"),
                key(0, "protean-id"),
                key(7, "shop::order-2@0"),
                key(8, "shop::order-1@1"),
            ],
        )
        .unwrap();
    let mut found: Vec<String> = found.into_iter().collect();
    found.sort();
    assert_eq!(found, ["protean-id", "shop::order-1@0"]);
    assert!(store
        .processed_messages("other", &[key(7, "shop::order-1@0")])
        .unwrap()
        .is_empty());
    // By identity alone (checks and tools) too.
    assert_eq!(store.processed("s", &["shop::order-1@0"]).unwrap().len(), 1);
    // The same message again is refused, with nothing of its unit written.
    let again = store.commit(&UnitOfWork {
        processed: vec![marker(9, "shop::order-3@0"), marker(7, "shop::order-1@0")],
        ..UnitOfWork::default()
    });
    assert!(
        matches!(again, Err(Error::AlreadyProcessed { .. })),
        "{again:?}"
    );
    assert!(store
        .processed_messages("s", &[key(9, "shop::order-3@0")])
        .unwrap()
        .is_empty());
}

/// Consumers racing to commit units of markers alone (handlers that changed nothing) for overlapping
/// messages: PostgreSQL commits such a unit as one statement, SQLite a unit of a full batch (100).
/// Raced with units of 12 and of 100. Checked from the store at the end: every message is marked
/// once, by exactly one unit that succeeded, and a refused unit wrote none of its markers (a message
/// marked that no successful unit holds would be half of a refused one).
pub(super) fn racing_units_of_markers_alone_mark_each_message_once(replicas: &[&dyn Store]) {
    for unit in [12, 100] {
        race_units_of_markers(replicas, unit, false);
    }
}

/// [`racing_units_of_markers_alone_mark_each_message_once`] with units that also append a message
/// each, so that they commit as transactions (PostgreSQL's refusal is then an error inside one, the
/// marker it names looked up after the rollback). Also checked from the store: a refused unit's
/// message is not there, a successful unit's is.
pub(super) fn racing_units_of_markers_with_effects_keep_no_refused_effect(replicas: &[&dyn Store]) {
    for unit in [12, 100] {
        race_units_of_markers(replicas, unit, true);
    }
}

/// [`racing_units_of_markers_alone_mark_each_message_once`] with units of `size` markers, of a
/// subscription of their own; with `effects`, each unit appends one message to a stream of its own.
fn race_units_of_markers(replicas: &[&dyn Store], size: usize, effects: bool) {
    const MESSAGES: usize = 240;
    let subscription = &format!("{}{size}", if effects { "e" } else { "s" });
    let id = |n: usize| format!("m{n:03}");
    let stream = |r: usize, step: usize| format!("race{size}-{r}x{step}");
    // Per replica: the units that committed, the refused ones with the message each refusal names,
    // and whether each step's unit committed.
    type Outcomes = (Vec<Vec<usize>>, Vec<(Vec<usize>, String)>, Vec<bool>);
    let outcomes: Vec<Outcomes> = std::thread::scope(|scope| {
        let racers: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(r, store)| {
                scope.spawn(move || {
                    let (mut won, mut refused, mut committed) =
                        (Vec::new(), Vec::new(), Vec::new());
                    // Each replica walks the messages from its own offset, so that its units overlap
                    // the others' by a few messages.
                    for step in 0..MESSAGES / (size / 2) {
                        let first = (step * size / 2 + r * 5) % MESSAGES;
                        let unit: Vec<usize> =
                            (first..first + size).map(|n| n % MESSAGES).collect();
                        let processed = unit
                            .iter()
                            .map(|n| ProcessedMarker {
                                subscription: subscription.to_owned(),
                                message_id: id(*n),
                                global_position: *n as u64,
                                build_id: format!("replica-{r}"),
                            })
                            .collect();
                        let messages = match effects {
                            true => vec![event(&stream(r, step), step as u64, None)],
                            false => Vec::new(),
                        };
                        let unit_of_work = UnitOfWork {
                            processed,
                            messages,
                            ..UnitOfWork::default()
                        };
                        let outcome = match store.commit(&unit_of_work) {
                            Ok(_) => {
                                won.push(unit);
                                true
                            }
                            Err(Error::AlreadyProcessed { message_id, .. }) => {
                                refused.push((unit, message_id));
                                false
                            }
                            Err(other) => panic!("replica {r}: {other}"),
                        };
                        committed.push(outcome);
                    }
                    (won, refused, committed)
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut holders = vec![0; MESSAGES];
    for n in outcomes.iter().flat_map(|(won, _, _)| won).flatten() {
        holders[*n] += 1;
    }
    for (unit, named) in outcomes.iter().flat_map(|(_, refused, _)| refused) {
        assert!(
            unit.iter().any(|n| id(*n) == *named && holders[*n] == 1),
            "a refusal names {named}, which is not a message of its unit that another unit marked"
        );
    }
    let twice: Vec<usize> = (0..MESSAGES).filter(|n| holders[*n] > 1).collect();
    assert!(
        twice.is_empty(),
        "marked by two units that both succeeded: {twice:?}"
    );
    let ids: Vec<String> = (0..MESSAGES).map(id).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let marked = replicas[0].processed(subscription, &ids).unwrap();
    let orphans: Vec<&&str> = ids
        .iter()
        .enumerate()
        .filter(|(n, id)| marked.contains(**id) && holders[*n] == 0)
        .map(|(_, id)| id)
        .collect();
    assert!(orphans.is_empty(), "markers of refused units: {orphans:?}");
    let unmarked = (0..MESSAGES).filter(|n| holders[*n] == 1 && !marked.contains(ids[*n]));
    assert_eq!(
        unmarked.count(),
        0,
        "a successful unit's markers are all there"
    );
    let refused = outcomes.iter().any(|(_, refused, _)| !refused.is_empty());
    assert!(refused, "no unit was refused: nothing tested");
    if effects {
        for (r, (_, _, committed)) in outcomes.iter().enumerate() {
            for (step, committed) in committed.iter().enumerate() {
                let stored = replicas[0].read_stream(&stream(r, step), 0).unwrap();
                assert_eq!(
                    stored.len(),
                    usize::from(*committed),
                    "replica {r}, step {step}: a unit's message is stored exactly when it committed"
                );
            }
        }
    }
}

pub(super) fn the_outbox_publishes_each_stream_in_order(store: &dyn Store) {
    let outbox = store.outbox().expect("this store keeps an outbox");
    publish(
        store,
        vec![
            event("shop::order-1", 0, None),
            event("shop::stock-1", 0, None),
            event("shop::order-2", 0, None),
        ],
    );
    store
        .commit(&UnitOfWork {
            messages: vec![event("shop::order-3", 0, None)],
            ..UnitOfWork::default()
        })
        .unwrap();
    assert_eq!(
        outbox.counts(3).unwrap().pending,
        3,
        "a unit without publish writes no outbox rows"
    );
    let lease = std::time::Duration::from_secs(30);
    let a = outbox
        .claim("a", 10, lease, &InFlight::none())
        .unwrap()
        .items;
    let targets: Vec<&str> = a.iter().map(|i| i.target.as_str()).collect();
    assert_eq!(targets, ["shop::order", "shop::stock", "shop::order"]);
    assert_eq!(a[0].stream_and_position().0, "shop::order-1");
    let b = outbox.claim("b", 10, lease, &InFlight::none()).unwrap();
    assert!(b.items.is_empty(), "streams leased to a stay with a");
    assert_eq!(b.waiting.len(), 2, "b waits for a's leases: {b:?}");
    // The end of a's round, in one call: a row failed, one published. Then a stops, giving its
    // leases back.
    let failure = super::RowFailure {
        seq: a[0].seq,
        error: "broker down".into(),
        retry_at: super::now_ms() + 60_000,
    };
    outbox.settle("a", &[a[1].seq], &[failure]).unwrap();
    outbox.release("a").unwrap();
    let b = outbox.claim("b", 10, lease, &InFlight::none()).unwrap();
    assert!(
        b.items.is_empty(),
        "the order stream waits behind its first row: {b:?}"
    );
    assert!(b.wake_at.is_some(), "and says until when: {b:?}");
    outbox
        .failed("b", a[0].seq, "broker down", super::now_ms() + 60_000)
        .unwrap();
    let counts = outbox.counts(2).unwrap();
    assert_eq!(
        (counts.pending, counts.failing, counts.held),
        (2, 1, 1),
        "two attempts failed: held from 2, still pending; the row behind it waits: {counts:?}"
    );
    assert!(counts.oldest_pending_age_ms.is_some());
    assert!(
        outbox
            .claim("b", 10, lease, &InFlight::none())
            .unwrap()
            .items
            .is_empty(),
        "a held row is never skipped: the rows after it wait"
    );
    let rows = outbox.pending(Some("shop::order"), 10).unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (r.stream.as_str(), r.attempts, r.last_error.as_deref()))
            .collect::<Vec<_>>(),
        [
            ("shop::order-1", 2, Some("broker down")),
            ("shop::order-2", 0, None)
        ]
    );
    assert!(outbox.pending(Some("shop::stock"), 10).unwrap().is_empty());
    assert_eq!(outbox.republish(Some("shop::stock")).unwrap(), 0);
    assert_eq!(
        outbox.republish(Some("shop::order")).unwrap(),
        1,
        "the held row's backoff is cleared"
    );
    let b = outbox
        .claim("b", 10, lease, &InFlight::none())
        .unwrap()
        .items;
    assert_eq!(
        b.iter()
            .map(|i| (i.stream_and_position().0, i.attempts))
            .collect::<Vec<_>>(),
        [
            ("shop::order-1".to_owned(), 2),
            ("shop::order-2".to_owned(), 0)
        ],
        "in commit order, the held row first"
    );
    outbox.published("b", &[b[0].seq, b[1].seq]).unwrap();
    let counts = outbox.counts(2).unwrap();
    assert_eq!(
        (counts.pending, counts.held, counts.oldest_pending_age_ms),
        (0, 0, None)
    );
}

/// A processor keeps the streams it publishes to from one round to the next, without writing its lease
/// again while more than three quarters of it are left, until it releases them.
pub(super) fn a_worker_keeps_its_streams_from_round_to_round_until_it_releases_them(
    store: &dyn Store,
) {
    let outbox = store.outbox().expect("this store keeps an outbox");
    for n in 0..3 {
        publish(store, vec![event("shop::order-1", n, None)]);
    }
    let lease = std::time::Duration::from_secs(60);
    let until = |claim: &super::Claim| claim.waiting.iter().map(|l| l.until).collect::<Vec<_>>();
    let first = outbox
        .claim("a", 1, lease, &InFlight::none())
        .unwrap()
        .items;
    outbox.settle("a", &[first[0].seq], &[]).unwrap();
    let b = outbox.claim("b", 10, lease, &InFlight::none()).unwrap();
    assert!(b.items.is_empty(), "a's stream stays a's after its round");
    let leased = until(&b);
    assert_eq!(leased.len(), 1, "{b:?}");
    // Not a wait for anything: time passes, so that a lease written again would end later.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let second = outbox
        .claim("a", 1, lease, &InFlight::none())
        .unwrap()
        .items;
    assert_eq!(
        second[0].stream_and_position().1,
        1,
        "a's next round goes on"
    );
    assert_eq!(
        until(&outbox.claim("b", 10, lease, &InFlight::none()).unwrap()),
        leased,
        "a lease with more than three quarters left is not written again"
    );
    outbox.settle("a", &[second[0].seq], &[]).unwrap();
    outbox.release("a").unwrap();
    let third = outbox.claim("b", 10, lease, &InFlight::none()).unwrap();
    assert_eq!(
        third
            .items
            .iter()
            .map(|i| i.stream_and_position().1)
            .collect::<Vec<_>>(),
        [2],
        "released: b goes on where a left off ({third:?})"
    );
}

/// A processor claims its next round while the broker takes the one before: the claim passes over the
/// rows in flight, whether the store's query leaves them out (the longest run) or the chooser does,
/// and they hold back nothing behind them. The rows themselves are left as they were.
pub(super) fn a_claim_passes_over_the_rows_in_flight(store: &dyn Store) {
    let outbox = store.outbox().expect("this store keeps an outbox");
    publish(
        store,
        vec![
            event("shop::order-1", 0, None),
            event("shop::stock-1", 0, None),
            event("shop::order-1", 1, None),
            event("shop::order-1", 2, None),
        ],
    );
    let lease = std::time::Duration::from_secs(30);
    let taken = |claim: super::Claim| {
        claim
            .items
            .iter()
            .map(super::OutboxItem::stream_and_position)
            .collect::<Vec<_>>()
    };
    let first = outbox.claim("a", 2, lease, &InFlight::none()).unwrap();
    let seqs: Vec<u64> = first.items.iter().map(|i| i.seq).collect();
    assert_eq!(
        taken(first),
        [("shop::order-1".into(), 0), ("shop::stock-1".into(), 0)]
    );
    let all = outbox.pending(None, 10).unwrap();
    let seq = |n: usize| all[n].seq;
    assert_eq!(seqs, [seq(0), seq(1)]);
    let next = outbox
        .claim("a", 10, lease, &InFlight::new(seqs.iter().copied()))
        .unwrap();
    assert_eq!(
        taken(next),
        [("shop::order-1".into(), 1), ("shop::order-1".into(), 2)],
        "the next round, behind the rows in flight"
    );
    let apart = InFlight::new([seq(0), seq(2)]);
    assert_eq!(
        taken(outbox.claim("a", 10, lease, &apart).unwrap()),
        [("shop::stock-1".into(), 0), ("shop::order-1".into(), 2)],
        "rows in flight that are not one run"
    );
    assert_eq!(
        outbox.counts(3).unwrap().pending,
        4,
        "a claim marks nothing"
    );
    outbox.settle("a", &seqs, &[]).unwrap();
    assert_eq!(
        taken(outbox.claim("a", 10, lease, &InFlight::none()).unwrap()),
        [("shop::order-1".into(), 1), ("shop::order-1".into(), 2)]
    );
}

pub(super) fn lag_is_counted_per_category_and_ping_answers(store: &dyn Store) {
    store.ping().unwrap();
    append(
        store,
        vec![
            event("shop::order-1", 0, None),
            event("shop::stock-1", 0, None),
            event("shop::order-2", 0, None),
        ],
    )
    .unwrap();
    let orders = ["shop::order".to_owned()];
    assert_eq!(store.count_after(&orders, 0).unwrap(), 2);
    assert_eq!(
        store.count_after(&orders, 1).unwrap(),
        1,
        "the stock event between them is not counted"
    );
    let both = ["shop::order".to_owned(), "shop::stock".to_owned()];
    assert_eq!(store.count_after(&both, 0).unwrap(), 3);
    assert_eq!(store.count_after(&both, 3).unwrap(), 0);
    store.ping().unwrap();
}

/// The adversary of "a position never passes a message that can still become visible below it": a
/// writer commits to two categories as fast as it can while a reader that follows both pages through
/// them, moving its position to the last message of each page, as a subscription does. Every message
/// must be seen. On separate snapshots per category this lost messages within a few hundred pages.
pub(super) fn a_reader_of_several_categories_passes_no_message_a_writer_commits(store: &dyn Store) {
    const UNITS: u64 = 3_000;
    let categories = ["shop::order".to_owned(), "shop::stock".to_owned()];
    let done = std::sync::atomic::AtomicBool::new(false);
    let (appended, seen) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut appended = Vec::new();
            for n in 0..UNITS {
                let stream = format!("{}-{}", categories[(n % 2) as usize], n % 7);
                appended.push(
                    append(store, vec![event(&stream, n, None)])
                        .unwrap()
                        .unwrap(),
                );
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            appended
        });
        let mut seen = Vec::new();
        let mut position = 0;
        loop {
            // Read whether the writer is done before reading the store: an empty page after it is final.
            let finished = done.load(std::sync::atomic::Ordering::SeqCst);
            let page = store.read_categories(&categories, position, 5).unwrap();
            match page.last() {
                Some(last) => position = last.global_position,
                None if finished => break,
                None => {}
            }
            seen.extend(page.iter().map(|m| m.global_position));
        }
        (writer.join().unwrap(), seen)
    });
    let missed: Vec<u64> = appended
        .iter()
        .filter(|p| !seen.contains(p))
        .copied()
        .collect();
    assert!(missed.is_empty(), "the reader's position passed {missed:?}");
    assert_eq!(seen.len(), appended.len(), "and it saw nothing twice");
}

/// The fence of the lease of `name` (the tests' fences are of subscriptions: a partition's only
/// records under another name, see `ownership::Owned::key`).
fn fence(name: &str, token: u64) -> Fence {
    Fence {
        owned: Owned::Subscription(name.into()),
        token,
    }
}

/// A unit under `fences` that appends one event to `stream`.
fn fenced(fences: Vec<Fence>, stream: &str) -> UnitOfWork {
    UnitOfWork {
        messages: vec![event(stream, 0, None)],
        fences,
        ..UnitOfWork::default()
    }
}

/// Whether `result` is the refusal of `token` on `name` by a recorded `current`.
fn is_fenced(result: &Result<Option<u64>, Error>, name: &str, token: u64, current: u64) -> bool {
    matches!(result, Err(Error::Fenced { owned, token: t, current: c })
        if owned == &Owned::Subscription(name.into()) && *t == token && *c == current)
}

pub(super) fn a_higher_fence_commits_and_raises_it(store: &dyn Store) {
    store
        .commit(&fenced(vec![fence("p-1", 1)], "shop::order-1"))
        .unwrap();
    store
        .commit(&fenced(vec![fence("p-1", 2)], "shop::order-2"))
        .expect("a newer owner commits");
    assert_eq!(store.read_stream("shop::order-2", 0).unwrap().len(), 1);
    let stale = store.commit(&fenced(vec![fence("p-1", 1)], "shop::order-3"));
    assert!(is_fenced(&stale, "p-1", 1, 2), "raised to 2: {stale:?}");
}

/// A replica that lost its lease cannot commit: nothing of its unit is written.
pub(super) fn a_lower_fence_is_refused_and_writes_nothing(store: &dyn Store) {
    store
        .commit(&fenced(vec![fence("p-1", 5)], "shop::order-1"))
        .unwrap();
    let stale = UnitOfWork {
        documents: vec![DocumentWrite::Put {
            collection: "c".into(),
            id: "1".into(),
            data: "{}".into(),
            expected: None,
        }],
        processed: vec![ProcessedMarker {
            subscription: "s".into(),
            message_id: "m1".into(),
            global_position: 0,
            build_id: "b".into(),
        }],
        position: Some(PositionUpdate {
            subscription: "s".into(),
            position: 9,
        }),
        ..fenced(vec![fence("p-1", 4)], "shop::order-2")
    };
    let refused = store.commit(&stale);
    assert!(is_fenced(&refused, "p-1", 4, 5), "{refused:?}");
    let error = refused.unwrap_err().to_string();
    assert_eq!(error, "subscription p-1 was taken over by a newer owner (fencing token 5 > 4); this replica's commit is refused");
    assert!(store.read_stream("shop::order-2", 0).unwrap().is_empty());
    assert_eq!(store.document("c", "1").unwrap(), None);
    assert!(store.processed("s", &["m1"]).unwrap().is_empty());
    assert_eq!(store.position("s").unwrap(), None);
}

pub(super) fn an_equal_fence_commits(store: &dyn Store) {
    store
        .commit(&fenced(vec![fence("p-1", 3)], "shop::order-1"))
        .unwrap();
    store
        .commit(&fenced(vec![fence("p-1", 3)], "shop::order-2"))
        .expect("the same owner commits again");
    assert_eq!(store.read_stream("shop::order-2", 0).unwrap().len(), 1);
}

/// The new owner commits its fence alone right after taking the lease: from then on the old owner's
/// commits fail, even before the new owner has anything else to write.
pub(super) fn a_unit_of_fences_only_raises_them(store: &dyn Store) {
    store
        .commit(&fenced(vec![fence("p-1", 6)], "shop::order-1"))
        .unwrap();
    store
        .commit(&UnitOfWork {
            fences: vec![fence("p-1", 7)],
            ..UnitOfWork::default()
        })
        .unwrap();
    let stale = store.commit(&fenced(vec![fence("p-1", 6)], "shop::order-2"));
    assert!(is_fenced(&stale, "p-1", 6, 7), "{stale:?}");
    assert!(store.read_stream("shop::order-2", 0).unwrap().is_empty());
}

pub(super) fn fences_of_two_names_are_independent(store: &dyn Store) {
    store
        .commit(&fenced(vec![fence("p-1", 10)], "shop::order-1"))
        .unwrap();
    store
        .commit(&fenced(vec![fence("p-2", 1)], "shop::order-2"))
        .expect("p-2 has its own tokens");
    let stale = store.commit(&fenced(vec![fence("p-1", 9)], "shop::order-3"));
    assert!(is_fenced(&stale, "p-1", 9, 10), "{stale:?}");
    let both = store.commit(&fenced(
        vec![fence("p-2", 2), fence("p-1", 1)],
        "shop::order-4",
    ));
    assert!(
        is_fenced(&both, "p-1", 1, 10),
        "one stale fence refuses the unit: {both:?}"
    );
    store
        .commit(&fenced(vec![fence("p-2", 1)], "shop::order-5"))
        .expect("the refused unit did not raise p-2");
}

fn put(id: &str, data: serde_json::Value, expected: Option<u64>) -> DocumentWrite {
    DocumentWrite::Put {
        collection: "c".into(),
        id: id.into(),
        data: data.to_string(),
        expected,
    }
}

fn write_docs(store: &dyn Store, documents: Vec<DocumentWrite>) -> Result<Option<u64>, Error> {
    store.commit(&UnitOfWork {
        documents,
        ..UnitOfWork::default()
    })
}

/// Documents "1" and "2" of collection "c", `{"n": 1}` and `{"n": 2}`, written unconditionally.
fn write_two_docs(store: &dyn Store) {
    write_docs(
        store,
        vec![
            put("1", json!({"n": 1}), None),
            put("2", json!({"n": 2}), None),
        ],
    )
    .unwrap();
}

fn version(store: &dyn Store, id: &str) -> u64 {
    store
        .read_document("c", id)
        .unwrap()
        .map_or(ABSENT, |d| d.version)
}

fn is_document_conflict(result: &Result<Option<u64>, Error>, expected: u64, actual: u64) -> bool {
    matches!(result, Err(Error::DocumentConflict { collection, expected: e, actual: a, .. })
        if collection == "c" && *e == expected && *a == actual)
}

/// A write expecting the version its handler read commits only while that is still the stored one
/// (insert-if-absent for a document read as absent); a refused unit writes nothing at all.
pub(super) fn a_document_write_commits_only_on_the_version_read(store: &dyn Store) {
    write_docs(store, vec![put("1", json!({"n": 1}), Some(ABSENT))]).unwrap();
    let v1 = version(store, "1");
    assert_ne!(v1, ABSENT);
    assert_eq!(
        store.find_documents("c", "n", &json!(1)).unwrap()[0].version,
        v1,
        "find answers the same version as get"
    );
    let late_insert = UnitOfWork {
        messages: vec![event("shop::order-1", 0, None)],
        documents: vec![put("1", json!({"n": 9}), Some(ABSENT))],
        position: Some(PositionUpdate {
            subscription: "s".into(),
            position: 9,
        }),
        ..UnitOfWork::default()
    };
    let refused = store.commit(&late_insert);
    assert!(is_document_conflict(&refused, ABSENT, v1), "{refused:?}");
    assert!(store.read_stream("shop::order-1", 0).unwrap().is_empty());
    assert_eq!(store.position("s").unwrap(), None);

    write_docs(store, vec![put("1", json!({"n": 2}), Some(v1))]).unwrap();
    let v2 = version(store, "1");
    assert_ne!(v2, v1);
    let stale = write_docs(store, vec![put("1", json!({"n": 3}), Some(v1))]);
    assert!(is_document_conflict(&stale, v1, v2), "{stale:?}");
    let stale_delete = DocumentWrite::Delete {
        collection: "c".into(),
        id: "1".into(),
        expected: Some(v1),
    };
    assert!(is_document_conflict(
        &write_docs(store, vec![stale_delete]),
        v1,
        v2
    ));
    assert_eq!(store.document("c", "1").unwrap().unwrap(), r#"{"n":2}"#);
}

/// Versions are never reused: a document deleted and written again has a version its earlier readers
/// never saw, so their writes conflict. Writes without an expected version are unconditional, and
/// writes of one document chain within a unit.
pub(super) fn document_versions_are_never_reused(store: &dyn Store) {
    write_docs(store, vec![put("1", json!({"n": 1}), None)]).unwrap();
    let v1 = version(store, "1");
    let delete = DocumentWrite::Delete {
        collection: "c".into(),
        id: "1".into(),
        expected: Some(v1),
    };
    write_docs(store, vec![delete, put("1", json!({"n": 1}), Some(ABSENT))]).unwrap();
    let again = version(store, "1");
    assert_ne!(again, v1, "a re-created document has a new version");
    let stale = write_docs(store, vec![put("1", json!({"n": 5}), Some(v1))]);
    assert!(is_document_conflict(&stale, v1, again), "{stale:?}");
    write_docs(store, vec![put("1", json!({"n": 6}), None)]).unwrap();
    assert_eq!(store.document("c", "1").unwrap().unwrap(), r#"{"n":6}"#);
    let absent_delete = DocumentWrite::Delete {
        collection: "c".into(),
        id: "2".into(),
        expected: Some(ABSENT),
    };
    write_docs(store, vec![absent_delete]).unwrap();
    assert_eq!(version(store, "2"), ABSENT);
}

/// The puts of one unit each get a version of their own, newer than every version drawn before, among
/// deletes that draw none; the versions they replaced are stale afterwards.
pub(super) fn a_units_puts_each_get_a_version_of_their_own(store: &dyn Store) {
    write_two_docs(store);
    let before = [version(store, "1"), version(store, "2")];
    assert_ne!(before[0], before[1]);
    let delete = DocumentWrite::Delete {
        collection: "c".into(),
        id: "2".into(),
        expected: Some(before[1]),
    };
    let unit = vec![
        put("1", json!({"n": 10}), Some(before[0])),
        delete,
        put("3", json!({"n": 3}), Some(ABSENT)),
        put("4", json!({"n": 4}), None),
    ];
    write_docs(store, unit).unwrap();
    let after = [
        version(store, "1"),
        version(store, "3"),
        version(store, "4"),
    ];
    let newest = before.into_iter().max().unwrap();
    assert!(
        after.iter().all(|v| *v > newest),
        "{after:?} after {before:?}"
    );
    assert!(
        after[0] != after[1] && after[1] != after[2] && after[0] != after[2],
        "{after:?}"
    );
    assert_eq!(version(store, "2"), ABSENT);
    let stale = write_docs(store, vec![put("1", json!({"n": 11}), Some(before[0]))]);
    assert!(
        is_document_conflict(&stale, before[0], after[0]),
        "{stale:?}"
    );
    write_docs(store, vec![put("3", json!({"n": 30}), Some(after[1]))]).unwrap();
    assert!(version(store, "3") > after.into_iter().max().unwrap());
}

/// Writers that read-modify-write one document at once, retrying on conflicts, lose no increment.
pub(super) fn concurrent_read_modify_writes_lose_nothing(store: &dyn Store) {
    const WRITERS: u64 = 4;
    const EACH: u64 = 25;
    let increment = || {
        for _ in 0..EACH {
            loop {
                let read = store.read_document("c", "counter").unwrap();
                let (n, expected) = match &read {
                    Some(d) => {
                        let n = serde_json::from_str::<serde_json::Value>(&d.data).unwrap()["n"]
                            .as_u64()
                            .unwrap();
                        (n, d.version)
                    }
                    None => (0, ABSENT),
                };
                match write_docs(
                    store,
                    vec![put("counter", json!({"n": n + 1}), Some(expected))],
                ) {
                    Ok(_) => break,
                    Err(Error::DocumentConflict { .. }) => continue,
                    Err(other) => panic!("{other}"),
                }
            }
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..WRITERS {
            scope.spawn(increment);
        }
    });
    let counter: serde_json::Value =
        serde_json::from_str(&store.document("c", "counter").unwrap().unwrap()).unwrap();
    assert_eq!(counter["n"], WRITERS * EACH);
}

/// Units writing the same documents in opposite orders, at once, all commit: none waits on a row the
/// other locked while the other waits on one it locked (a deadlock the database would break by
/// failing one of them), and the index of each document's fields is its last write's.
pub(super) fn units_writing_the_same_documents_in_opposite_orders_all_commit(store: &dyn Store) {
    const DOCUMENTS: usize = 30;
    const ROUNDS: usize = 20;
    let write = |round: usize, reverse: bool| {
        let mut ids: Vec<usize> = (0..DOCUMENTS).collect();
        if reverse {
            ids.reverse();
        }
        let documents = ids
            .into_iter()
            .map(|i| {
                put(
                    &format!("d{i}"),
                    json!({"round": round, "by": reverse}),
                    None,
                )
            })
            .collect();
        write_docs(store, documents).unwrap_or_else(|e| panic!("round {round}: {e}"));
    };
    std::thread::scope(|scope| {
        for reverse in [false, true] {
            scope.spawn(move || (0..ROUNDS).for_each(|round| write(round, reverse)));
        }
    });
    for i in 0..DOCUMENTS {
        let data: serde_json::Value =
            serde_json::from_str(&store.document("c", &format!("d{i}")).unwrap().unwrap()).unwrap();
        let found = store.find_documents("c", "by", &data["by"]).unwrap();
        assert!(
            found.iter().any(|d| d.id == format!("d{i}")),
            "d{i} indexed by its last write"
        );
        let other = store
            .find_documents("c", "by", &json!(!data["by"].as_bool().unwrap()))
            .unwrap();
        assert!(
            !other.iter().any(|d| d.id == format!("d{i}")),
            "d{i}'s old field is gone"
        );
    }
}

/// Several documents and streams read at once (a batch's reads ahead) are what reading them one at a
/// time answers: present documents with their collection and version, every stream's messages in order.
pub(super) fn reads_of_several_documents_and_streams_answer_as_one_at_a_time(store: &dyn Store) {
    write_two_docs(store);
    store
        .commit(&UnitOfWork {
            messages: vec![
                event("shop::order-1", 0, None),
                event("shop::order-2", 0, None),
                event("shop::order-1", 1, None),
            ],
            ..UnitOfWork::default()
        })
        .unwrap();
    let mut documents = store
        .read_documents(&[("c", "2"), ("c", "absent"), ("other", "1"), ("c", "1")])
        .unwrap();
    documents.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    let expected: Vec<_> = ["1", "2"]
        .iter()
        .map(|id| {
            (
                "c".to_owned(),
                store.read_document("c", id).unwrap().unwrap(),
            )
        })
        .collect();
    assert_eq!(documents, expected);
    let streams = store
        .read_streams(&["shop::order-2", "shop::order-1", "shop::order-9"])
        .unwrap();
    let mut one_at_a_time = store.read_stream("shop::order-1", 0).unwrap();
    one_at_a_time.extend(store.read_stream("shop::order-2", 0).unwrap());
    let key = |m: &super::StoredMessage| (m.stream.clone(), m.position);
    let mut streams: Vec<_> = streams.iter().map(key).collect();
    streams.sort();
    assert_eq!(streams, one_at_a_time.iter().map(key).collect::<Vec<_>>());
}

/// Several finds at once (a batch's finds ahead) are what finding one at a time answers, each in its
/// place: a find asked twice, one that finds nothing, one in another collection, a number.
pub(super) fn several_finds_answer_as_one_at_a_time(store: &dyn Store) {
    let put = |collection: &str, id: &str, order: serde_json::Value| DocumentWrite::Put {
        collection: collection.into(),
        id: id.into(),
        data: json!({ "id": id, "order_id": order }).to_string(),
        expected: None,
    };
    let documents = vec![
        put("reservations", "r2", json!("o1")),
        put("reservations", "r1", json!("o1")),
        put("reservations", "r3", json!("o2")),
        put("reservations", "r4", json!(7)),
        put("other", "x1", json!("o1")),
    ];
    store
        .commit(&UnitOfWork {
            documents,
            ..UnitOfWork::default()
        })
        .unwrap();
    let (o1, o2, none, seven) = (json!("o1"), json!("o2"), json!("o9"), json!(7));
    let finds = [
        ("reservations", "order_id", &o1),
        ("reservations", "order_id", &none),
        ("other", "order_id", &o1),
        ("reservations", "order_id", &o2),
        ("reservations", "order_id", &o1),
        ("reservations", "order_id", &seven),
    ];
    let each = store.find_documents_each(&finds).unwrap();
    let one_at_a_time: Vec<_> = finds
        .iter()
        .map(|&(c, f, v)| store.find_documents(c, f, v).unwrap())
        .collect();
    assert_eq!(each, one_at_a_time);
    let ids: Vec<Vec<&str>> = each
        .iter()
        .map(|found| found.iter().map(|d| d.id.as_str()).collect())
        .collect();
    assert_eq!(
        ids,
        [
            vec!["r1", "r2"],
            vec![],
            vec!["x1"],
            vec!["r3"],
            vec!["r1", "r2"],
            vec!["r4"]
        ]
    );
    assert!(store.find_documents_each(&[]).unwrap().is_empty());
    assert!(matches!(
        store.find_documents_each(&[("reservations", "a.b", &o1)]),
        Err(Error::BadField(_))
    ));
}

fn keyed(key: &str, stream: &str) -> UnitOfWork {
    let message = event(stream, 0, None);
    UnitOfWork {
        idempotency_key: Some(IdempotencyKey {
            key: key.into(),
            message_id: message.id.clone(),
        }),
        messages: vec![message],
        ..UnitOfWork::default()
    }
}

/// A unit with an idempotency key commits once: a second unit with the key writes nothing and is told
/// the first one's message id, which the key also answers on its own.
pub(super) fn an_idempotency_key_commits_once(store: &dyn Store) {
    let first = keyed("k-1", "shop::order-1");
    store.commit(&first).unwrap();
    let first_id = first.messages[0].id.clone();
    let second = store.commit(&keyed("k-1", "shop::order-2"));
    assert!(
        matches!(&second, Err(Error::AlreadyCommitted { key, message_id }) if key == "k-1" && *message_id == first_id),
        "{second:?}"
    );
    assert!(store.read_stream("shop::order-2", 0).unwrap().is_empty());
    assert_eq!(store.idempotency_key("k-1").unwrap(), Some(first_id));
    assert_eq!(store.idempotency_key("k-2").unwrap(), None);
    store.commit(&keyed("k-2", "shop::order-2")).unwrap();
}

/// Units with one key committed at once (a retry racing the attempt it retries): exactly one commits.
pub(super) fn concurrent_units_with_one_key_commit_once(store: &dyn Store) {
    let committed = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for n in 0..4 {
            let committed = &committed;
            scope.spawn(
                move || match store.commit(&keyed("same", &format!("shop::order-{n}"))) {
                    Ok(_) => {
                        committed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(Error::AlreadyCommitted { .. }) => {}
                    Err(other) => panic!("{other}"),
                },
            );
        }
    });
    assert_eq!(committed.into_inner(), 1);
    assert_eq!(
        store
            .read_categories(&["shop::order".into()], 0, 100)
            .unwrap()
            .len(),
        1
    );
}

fn call(subscription: &str, identity: &str, attempts: u32) -> CallRecord {
    CallRecord {
        subscription: subscription.into(),
        identity: identity.into(),
        attempts,
    }
}

/// Calls are recorded per subscription and message, replaced by a later record, and cleared only by
/// the commit that settles their message: what a process that died in a call leaves behind.
pub(super) fn call_records_outlive_their_call_until_a_commit_settles_it(store: &dyn Store) {
    store
        .record_calls(&[
            call("orders", "a@0", 1),
            call("orders", "b@0", 1),
            call("stock", "a@0", 1),
        ])
        .unwrap();
    store.record_calls(&[call("orders", "a@0", 2)]).unwrap();
    let all = store.recorded_calls("orders", None).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((all["a@0"], all["b@0"]), (2, 1));
    let some = store
        .recorded_calls("orders", Some(&["a@0", "c@0"]))
        .unwrap();
    assert_eq!(
        some.into_iter().collect::<Vec<_>>(),
        [("a@0".to_owned(), 2)]
    );
    store
        .commit(&UnitOfWork {
            ended_calls: vec![("orders".into(), "a@0".into())],
            ..UnitOfWork::default()
        })
        .unwrap();
    let left = store.recorded_calls("orders", None).unwrap();
    assert_eq!(left.keys().collect::<Vec<_>>(), ["b@0"]);
    assert_eq!(store.recorded_calls("stock", None).unwrap()["a@0"], 1);
}

/// A unit of markers that ends call records (what a stream subscription commits for a batch its
/// handlers changed nothing for): the records go with the markers' commit, and stay when the unit is
/// refused for a marker committed before, as does the position such a unit moves (an event-store
/// subscription's). PostgreSQL writes all three in one statement.
pub(super) fn a_unit_of_markers_ends_its_calls_only_when_it_commits(store: &dyn Store) {
    let marker = |id: &str, n: u64| ProcessedMarker {
        subscription: "orders".into(),
        message_id: id.into(),
        global_position: n,
        build_id: "b".into(),
    };
    let settling = |ids: &[(&str, u64)]| UnitOfWork {
        processed: ids.iter().map(|(id, n)| marker(id, *n)).collect(),
        ended_calls: ids
            .iter()
            .map(|(id, _)| ("orders".to_owned(), id.to_string()))
            .collect(),
        ..UnitOfWork::default()
    };
    let calls = [
        call("orders", "a@0", 2),
        call("orders", "b@0", 1),
        call("orders", "c@0", 1),
    ];
    store.record_calls(&calls).unwrap();
    let moving = |ids: &[(&str, u64)], position: u64| UnitOfWork {
        position: Some(PositionUpdate {
            subscription: "orders".into(),
            position,
        }),
        ..settling(ids)
    };
    store.commit(&moving(&[("a@0", 1)], 1)).unwrap();
    let left = store.recorded_calls("orders", None).unwrap();
    assert_eq!(left.len(), 2, "a's record ends with its marker: {left:?}");
    assert!(!left.contains_key("a@0"));
    assert_eq!(store.position("orders").unwrap(), Some(1));
    let refused = store.commit(&moving(&[("b@0", 2), ("a@0", 1), ("c@0", 3)], 3));
    assert!(
        matches!(refused, Err(Error::AlreadyProcessed { ref message_id, .. }) if message_id == "a@0"),
        "{refused:?}"
    );
    let left = store.recorded_calls("orders", None).unwrap();
    assert_eq!(
        (left.get("b@0"), left.get("c@0")),
        (Some(&1), Some(&1)),
        "a refused unit ends no call"
    );
    let found = store.processed("orders", &["b@0", "c@0"]).unwrap();
    assert!(found.is_empty(), "nor writes a marker: {found:?}");
    assert_eq!(
        store.position("orders").unwrap(),
        Some(1),
        "nor moves the position"
    );
    store.commit(&settling(&[("b@0", 2)])).unwrap();
    assert!(!store
        .recorded_calls("orders", None)
        .unwrap()
        .contains_key("b@0"));
}

fn parking(park: &[(&str, u64)], hold: &[(&str, u64)], settle: &[(&str, u64)]) -> UnitOfWork {
    let pairs = |v: &[(&str, u64)]| v.iter().map(|(k, p)| (k.to_string(), *p)).collect();
    UnitOfWork {
        parking: Parking {
            subscription: "s".into(),
            park: pairs(park),
            hold: pairs(hold),
            settle: pairs(settle),
            unpark: settle.iter().map(|(k, _)| k.to_string()).collect(),
        },
        ..UnitOfWork::default()
    }
}

fn dead_letter_at(global_position: u64) -> UnitOfWork {
    UnitOfWork {
        dead_letters: vec![DeadLetter {
            subscription: "s".into(),
            handler: "h".into(),
            message_id: format!("m{global_position}"),
            stream: "shop::order-1".into(),
            global_position,
            message_type: "Shop.Happened.v1".into(),
            data: "{}".into(),
            metadata: "{}".into(),
            error: "boom".into(),
            attempts: 1,
            build_id: "b".into(),
            failed_at: "2026-01-01T00:00:00.000000+00:00".into(),
        }],
        ..UnitOfWork::default()
    }
}

fn parked(store: &dyn Store) -> Vec<(String, u64, bool, u64)> {
    let keys: Vec<ParkedKey> = store.parked_keys("s").unwrap();
    keys.into_iter()
        .map(|p| (p.key, p.dead_letter, p.released, p.held))
        .collect()
}

/// A key parks behind its dead letter and holds later messages (by global position, read back in
/// order); it is released by the replay of that dead letter and unparked once nothing is held.
pub(super) fn a_parked_key_holds_until_released_and_drained(store: &dyn Store) {
    let stream: Vec<NewMessage> = (0..4).map(|n| event("shop::order-1", n, None)).collect();
    append(store, stream).unwrap();
    store.commit(&dead_letter_at(1)).unwrap();
    store
        .commit(&parking(&[("k", 1)], &[("k", 3), ("k", 2), ("k", 3)], &[]))
        .unwrap();
    assert_eq!(parked(store), [("k".to_owned(), 1, false, 2)]);
    let held: Vec<u64> = store
        .held_messages("s", "k", 10)
        .unwrap()
        .iter()
        .map(|m| m.global_position)
        .collect();
    assert_eq!(held, [2, 3], "in store order, a message held twice once");
    assert_eq!(store.held_messages("s", "k", 1).unwrap().len(), 1);
    store.commit(&parking(&[], &[], &[("k", 2)])).unwrap();
    assert_eq!(
        parked(store),
        [("k".to_owned(), 1, false, 1)],
        "not released: still parked"
    );
    assert!(store.resolve_dead_letter("s", 1, "b2").unwrap());
    assert_eq!(parked(store), [("k".to_owned(), 1, true, 1)], "released");
    store.commit(&parking(&[], &[("k", 4)], &[])).unwrap();
    store.commit(&parking(&[], &[], &[("k", 3)])).unwrap();
    assert_eq!(parked(store), [("k".to_owned(), 1, true, 1)], "4 is held");
    store.commit(&parking(&[], &[], &[("k", 4)])).unwrap();
    assert!(parked(store).is_empty(), "unparked: {:?}", parked(store));
}

/// Holding behind a key that is not parked refuses the whole unit: a stale view of the parked keys
/// must not move a position past a message for good.
pub(super) fn holding_behind_a_key_not_parked_is_refused_whole(store: &dyn Store) {
    append(store, vec![event("shop::order-1", 0, None)]).unwrap();
    let unit = UnitOfWork {
        position: Some(PositionUpdate {
            subscription: "s".into(),
            position: 1,
        }),
        ..parking(&[("k", 1)], &[("x", 1)], &[])
    };
    let refused = store.commit(&unit);
    assert!(
        matches!(refused, Err(Error::NotParked { ref key, .. }) if key == "x"),
        "{refused:?}"
    );
    assert_eq!(store.position("s").unwrap(), None);
    assert!(parked(store).is_empty(), "nothing of the unit is written");
}

/// A replay that failed again leaves a newer dead letter: the key stays parked until that one is
/// replayed. A purge releases every parked key of the subscription.
pub(super) fn a_key_is_released_by_its_last_dead_letter_or_a_purge(store: &dyn Store) {
    let stream: Vec<NewMessage> = (0..3).map(|n| event("shop::order-1", n, None)).collect();
    append(store, stream).unwrap();
    store.commit(&dead_letter_at(1)).unwrap();
    store.commit(&dead_letter_at(1)).unwrap();
    store.commit(&dead_letter_at(2)).unwrap();
    store
        .commit(&parking(&[("a", 1), ("b", 2)], &[("b", 3)], &[]))
        .unwrap();
    assert!(store.resolve_dead_letter("s", 1, "b2").unwrap());
    assert_eq!(
        parked(store)[0],
        ("a".to_owned(), 1, false, 0),
        "failed again"
    );
    assert!(store.resolve_dead_letter("s", 1, "b3").unwrap());
    assert_eq!(parked(store)[0], ("a".to_owned(), 1, true, 0));
    assert_eq!(store.purge_dead_letters("s").unwrap(), 1);
    assert_eq!(parked(store)[1], ("b".to_owned(), 2, true, 1), "purged");
    store
        .commit(&parking(&[("b", 3)], &[], &[("b", 3)]))
        .unwrap();
    assert_eq!(
        parked(store)[1],
        ("b".to_owned(), 3, false, 0),
        "a held message dead-lettered parks its key again, behind it"
    );
}

macro_rules! store_conformance {
    ($($backend:ident => $make:expr),+ $(,)?) => {$(
        mod $backend {
            #[test] fn positions_are_per_stream_and_global() { let (s, _g) = $make; super::positions_are_per_stream_and_global(&s) }
            #[test] fn category_reads_page_by_global_position() { let (s, _g) = $make; super::category_reads_page_by_global_position(&s) }
            #[test] fn a_category_is_read_by_its_exact_name() { let (s, _g) = $make; super::a_category_is_read_by_its_exact_name(&s) }
            #[test] fn markers_are_found_by_position_and_identity() { let (s, _g) = $make; super::markers_are_found_by_position_and_identity(&s) }
            #[test] fn a_unit_with_one_message_twice_is_refused_as_processed_before() { let (s, _g) = $make; super::a_unit_with_one_message_twice_is_refused_as_processed_before(&s) }
            #[test] fn a_version_conflict_commits_nothing() { let (s, _g) = $make; super::a_version_conflict_commits_nothing(&s) }
            #[test] fn expected_versions_chain_within_a_unit() { let (s, _g) = $make; super::expected_versions_chain_within_a_unit(&s) }
            #[test] fn a_duplicate_message_id_is_refused() { let (s, _g) = $make; super::a_duplicate_message_id_is_refused(&s) }
            #[test] fn documents_are_found_by_field() { let (s, _g) = $make; super::documents_are_found_by_field(&s) }
            #[test] fn documents_are_found_by_any_value_in_their_own_collection() { let (s, _g) = $make; super::documents_are_found_by_any_value_in_their_own_collection(&s) }
            #[test] fn positions_and_markers_commit_with_effects() { let (s, _g) = $make; super::positions_and_markers_commit_with_effects(&s) }
            #[test] fn a_batch_of_markers_with_one_processed_before_is_refused_whole() { let (s, _g) = $make; super::a_batch_of_markers_with_one_processed_before_is_refused_whole(&s) }
            #[test] fn markers_are_found_by_message_id() { let (s, _g) = $make; super::markers_are_found_by_message_id(&s) }
            #[test] fn racing_units_of_markers_alone_mark_each_message_once() { let (s, _g) = $make; super::racing_units_of_markers_alone_mark_each_message_once(&[&s as &dyn super::Store; 4]) }
            #[test] fn racing_units_of_markers_with_effects_keep_no_refused_effect() { let (s, _g) = $make; super::racing_units_of_markers_with_effects_keep_no_refused_effect(&[&s as &dyn super::Store; 4]) }
            #[test] fn the_outbox_publishes_each_stream_in_order() { let (s, _g) = $make; super::the_outbox_publishes_each_stream_in_order(&s) }
            #[test] fn a_claim_passes_over_the_rows_in_flight() { let (s, _g) = $make; super::a_claim_passes_over_the_rows_in_flight(&s) }
            #[test] fn a_worker_keeps_its_streams_from_round_to_round_until_it_releases_them() { let (s, _g) = $make; super::a_worker_keeps_its_streams_from_round_to_round_until_it_releases_them(&s) }
            #[test] fn lag_is_counted_per_category_and_ping_answers() { let (s, _g) = $make; super::lag_is_counted_per_category_and_ping_answers(&s) }
            #[test] fn a_higher_fence_commits_and_raises_it() { let (s, _g) = $make; super::a_higher_fence_commits_and_raises_it(&s) }
            #[test] fn a_lower_fence_is_refused_and_writes_nothing() { let (s, _g) = $make; super::a_lower_fence_is_refused_and_writes_nothing(&s) }
            #[test] fn an_equal_fence_commits() { let (s, _g) = $make; super::an_equal_fence_commits(&s) }
            #[test] fn a_unit_of_fences_only_raises_them() { let (s, _g) = $make; super::a_unit_of_fences_only_raises_them(&s) }
            #[test] fn a_reader_of_several_categories_passes_no_message_a_writer_commits() { let (s, _g) = $make; super::a_reader_of_several_categories_passes_no_message_a_writer_commits(&s) }
            #[test] fn fences_of_two_names_are_independent() { let (s, _g) = $make; super::fences_of_two_names_are_independent(&s) }
            #[test] fn a_document_write_commits_only_on_the_version_read() { let (s, _g) = $make; super::a_document_write_commits_only_on_the_version_read(&s) }
            #[test] fn document_versions_are_never_reused() { let (s, _g) = $make; super::document_versions_are_never_reused(&s) }
            #[test] fn a_units_puts_each_get_a_version_of_their_own() { let (s, _g) = $make; super::a_units_puts_each_get_a_version_of_their_own(&s) }
            #[test] fn concurrent_read_modify_writes_lose_nothing() { let (s, _g) = $make; super::concurrent_read_modify_writes_lose_nothing(&s) }
            #[test] fn reads_of_several_documents_and_streams_answer_as_one_at_a_time() { let (s, _g) = $make; super::reads_of_several_documents_and_streams_answer_as_one_at_a_time(&s) }
            #[test] fn several_finds_answer_as_one_at_a_time() { let (s, _g) = $make; super::several_finds_answer_as_one_at_a_time(&s) }
            #[test] fn units_writing_the_same_documents_in_opposite_orders_all_commit() { let (s, _g) = $make; super::units_writing_the_same_documents_in_opposite_orders_all_commit(&s) }
            #[test] fn an_idempotency_key_commits_once() { let (s, _g) = $make; super::an_idempotency_key_commits_once(&s) }
            #[test] fn concurrent_units_with_one_key_commit_once() { let (s, _g) = $make; super::concurrent_units_with_one_key_commit_once(&s) }
            #[test] fn call_records_outlive_their_call_until_a_commit_settles_it() { let (s, _g) = $make; super::call_records_outlive_their_call_until_a_commit_settles_it(&s) }
            #[test] fn a_unit_of_markers_ends_its_calls_only_when_it_commits() { let (s, _g) = $make; super::a_unit_of_markers_ends_its_calls_only_when_it_commits(&s) }
            #[test] fn a_parked_key_holds_until_released_and_drained() { let (s, _g) = $make; super::a_parked_key_holds_until_released_and_drained(&s) }
            #[test] fn holding_behind_a_key_not_parked_is_refused_whole() { let (s, _g) = $make; super::holding_behind_a_key_not_parked_is_refused_whole(&s) }
            #[test] fn a_key_is_released_by_its_last_dead_letter_or_a_purge() { let (s, _g) = $make; super::a_key_is_released_by_its_last_dead_letter_or_a_purge(&s) }
            #[test] fn schedules_are_due_in_order_and_counted() { let (s, _g) = $make; super::schedules::schedules_are_due_in_order_and_counted(&s) }
            #[test] fn setting_a_key_again_replaces_its_schedule() { let (s, _g) = $make; super::schedules::setting_a_key_again_replaces_its_schedule(&s) }
            #[test] fn a_cancel_settles_only_a_pending_schedule() { let (s, _g) = $make; super::schedules::a_cancel_settles_only_a_pending_schedule(&s) }
            #[test] fn settled_schedules_are_pruned_once_kept_long_enough() { let (s, _g) = $make; super::schedules::settled_schedules_are_pruned_once_kept_long_enough(&s) }
            #[test] fn a_schedule_fires_once() { let (s, _g) = $make; super::schedules::a_schedule_fires_once(&s) }
            #[test] fn a_firing_with_one_stale_schedule_is_refused_whole() { let (s, _g) = $make; super::schedules::a_firing_with_one_stale_schedule_is_refused_whole(&s) }
            #[test] fn writes_of_one_key_apply_in_order() { let (s, _g) = $make; super::schedules::writes_of_one_key_apply_in_order(&s) }
            #[test] fn scheduled_data_and_metadata_round_trip_exactly() { let (s, _g) = $make; super::schedules::scheduled_data_and_metadata_round_trip_exactly(&s) }
        }
    )+};
}

fn sqlite() -> (super::SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (
        super::SqliteStore::open(&dir.path().join("nested/store.db")).unwrap(),
        dir,
    )
}

// The same cluster helper as the end-to-end tests: one source for how a test PostgreSQL is run.
#[path = "../../../tests/e2e/support/postgres.rs"]
#[allow(unreachable_pub, dead_code)]
pub(super) mod cluster;

/// A fresh cluster with the store set up in it; the cluster stops when the pair is dropped.
pub(super) fn postgres() -> (super::PostgresStore, cluster::PgServer) {
    let server = cluster::PgServer::start();
    let config = server.store_config();
    super::PostgresStore::connect(&config)
        .unwrap()
        .setup()
        .unwrap();
    (super::PostgresStore::open(&config).unwrap(), server)
}

store_conformance! {
    memory => (super::super::MemoryStore::default(), ()),
    sqlite => super::sqlite(),
    postgres => super::postgres(),
}

#[test]
fn racing_firings_and_cancels_settle_each_schedule_once_in_memory() {
    let store: &dyn Store = &super::MemoryStore::default();
    schedules::racing_firings_and_cancels_settle_each_schedule_once(&[store; 4]);
}

/// The streams of the rows a claim takes, in order.
fn revived_in_order(store: &dyn Store) -> Vec<String> {
    let claim = store
        .outbox()
        .unwrap()
        .claim(
            "w",
            10,
            std::time::Duration::from_secs(30),
            &InFlight::none(),
        )
        .unwrap();
    claim
        .items
        .iter()
        .map(|i| i.stream_and_position().0)
        .collect()
}

/// Two rows of one stream to publish (a test then marks the first 'abandoned', as older builds did).
fn two_rows_to_publish(store: &dyn Store) {
    publish(
        store,
        vec![
            event("shop::order-1", 0, None),
            event("shop::order-2", 0, None),
        ],
    );
}

/// What only the SQLite store has to do: bring files written by older builds up to its schema, serve
/// replicas that share its file, and tell the outbox which stored text is still what was committed.
mod sqlite_only {
    use super::{fence, fenced, is_fenced, two_rows_to_publish};
    use crate::{
        store::{outbox, schedules::ScheduleWrite, InFlight, SqliteStore, Store},
        unit_of_work::UnitOfWork,
    };

    /// The payloads a claim of every row takes.
    fn claimed_payloads(store: &SqliteStore) -> Vec<Result<String, crate::message::PoisonError>> {
        let lease = std::time::Duration::from_secs(30);
        let outbox = store.outbox().unwrap();
        let claim = outbox.claim("w", 10, lease, &InFlight::none()).unwrap();
        claim.items.into_iter().map(|i| i.payload).collect()
    }

    /// Each outbox row's message text, as stored, and its checksum.
    fn stored_texts(path: &std::path::Path) -> Vec<(String, String, Option<i64>)> {
        let db = rusqlite::Connection::open(path).unwrap();
        let mut rows = db
            .prepare(
                "SELECT m.data, m.metadata, o.checksum FROM outbox o \
                 JOIN messages m ON m.global_position = o.global_position ORDER BY o.seq",
            )
            .unwrap();
        let texts = rows.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)));
        texts.unwrap().map(Result::unwrap).collect()
    }

    /// A store file with two rows to publish, and where it is.
    fn with_two_rows_to_publish() -> (SqliteStore, std::path::PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        two_rows_to_publish(&store);
        (store, path, dir)
    }

    /// The wire forms of `texts` (the rows of global positions 1, 2, ...), made by parsing them.
    fn validated(
        texts: &[(String, String, Option<i64>)],
    ) -> Vec<Result<String, crate::message::PoisonError>> {
        let wire = |((data, metadata, _), at): (&(String, String, _), u64)| {
            crate::message::wire_json(data, metadata, 0, at)
        };
        texts.iter().zip(1..).map(wire).collect()
    }

    /// The bytes the page cache of the store's writer connection holds.
    fn writer_cache_bytes(store: &SqliteStore) -> i32 {
        let (mut used, mut highest) = (0, 0);
        let connection = store.connection();
        // SAFETY: the handle is the open connection's, held for the call; the status only reads it.
        #[allow(unsafe_code)]
        let status = unsafe {
            rusqlite::ffi::sqlite3_db_status(
                connection.handle(),
                rusqlite::ffi::SQLITE_DBSTATUS_CACHE_USED,
                &mut used,
                &mut highest,
                0,
            )
        };
        assert_eq!(status, rusqlite::ffi::SQLITE_OK);
        used
    }

    /// A large message's overflow pages do not stay in the writer's page cache once its claim has
    /// read them: kept, they were resident while the broker's client copied the message, and its
    /// publishing peaked at over 4 times its size.
    #[test]
    fn claiming_a_large_message_gives_its_pages_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let large = "x".repeat(2 << 20);
        let message = crate::unit_of_work::NewMessage::new(
            crate::message::Kind::Event,
            "shop::order-1",
            "Shop.Happened.v1",
            &serde_json::json!({ "large": large }),
            None,
            None,
            None,
        );
        // Committed by another store that stays open, as another process would: the message is in the
        // WAL, read through the page cache. A store opened afresh claims it, so its writer's cache
        // holds only what the claim read.
        let writer = SqliteStore::open(&path).unwrap();
        super::publish(&writer, vec![message]);
        let store = SqliteStore::open(&path).unwrap();

        let payloads = claimed_payloads(&store);

        assert!(payloads[0].as_ref().unwrap().len() > 2 << 20);
        let after = writer_cache_bytes(&store);
        assert!(
            after < 1 << 20,
            "the writer's page cache holds {after} bytes after claiming a message of 2 MiB"
        );
    }

    /// A row written by this build keeps its text's checksum, and a claim makes its wire form the way
    /// any other text gets it.
    #[test]
    fn an_outbox_row_keeps_its_messages_checksum() {
        let (store, path, _dir) = with_two_rows_to_publish();
        let texts = stored_texts(&path);
        for (data, metadata, checksum) in &texts {
            assert_eq!(*checksum, Some(outbox::text_checksum(data, metadata)));
        }
        assert_eq!(claimed_payloads(&store), validated(&texts));
    }

    /// A message whose text changed since its commit is parsed before it is published: text the scan
    /// of known JSON would take (`tru` is no JSON value) is refused, and a valid edit goes out as it is.
    #[test]
    fn text_changed_since_its_commit_is_parsed_before_it_is_published() {
        let (store, path, _dir) = with_two_rows_to_publish();
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch(
            "UPDATE messages SET metadata = '{\"headers\":tru}' WHERE global_position = 1; \
             UPDATE messages SET data = '{\"edited\": true}' WHERE global_position = 2;",
        )
        .unwrap();
        let payloads = claimed_payloads(&store);
        assert!(
            matches!(
                payloads[0],
                Err(crate::message::PoisonError::BadMetadata(_))
            ),
            "{:?}",
            payloads[0]
        );
        let second: serde_json::Value =
            serde_json::from_str(payloads[1].as_ref().unwrap()).unwrap();
        assert_eq!(second["data"], serde_json::json!({"edited": true}));
    }

    /// A fired schedule's text was read back from the store: its row has no checksum, and text damaged
    /// while it waited is refused, not published as it is.
    #[test]
    fn a_fired_schedules_text_is_parsed_before_it_is_published() {
        use crate::store::schedules::FiredSchedule;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        let kind = crate::message::Kind::Command;
        let data = serde_json::json!({"n": 1});
        let message = crate::unit_of_work::NewMessage::new(
            kind,
            "shop::order-1",
            "Shop.Remind.v1",
            &data,
            None,
            None,
            None,
        );
        let set = ScheduleWrite::Set {
            key: "remind".into(),
            due_ms: 1,
            message,
        };
        let unit = UnitOfWork {
            schedules: vec![set],
            ..UnitOfWork::default()
        };
        store.commit(&unit).unwrap();
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE schedules SET data = '{not json' WHERE key = 'remind'",
                [],
            )
            .unwrap();
        let schedule = store.schedules().get("remind").unwrap().unwrap();
        let now = chrono::DateTime::from_timestamp_millis(2).unwrap();
        let fired = FiredSchedule {
            key: schedule.key.clone(),
            id: schedule.id.clone(),
            at_ms: 2,
        };
        let firing = UnitOfWork {
            messages: vec![schedule.message(now)],
            fired: vec![fired],
            publish: true,
            ..UnitOfWork::default()
        };
        store.commit(&firing).unwrap();
        assert_eq!(stored_texts(&path)[0].2, None, "no checksum");
        let payloads = claimed_payloads(&store);
        assert!(
            matches!(payloads[..], [Err(crate::message::PoisonError::BadData(_))]),
            "{payloads:?}"
        );
    }

    /// The outbox's counts read the pending rows only, through their partial index (whose entries are
    /// the pending rows): their cost is the backlog's, however many rows were published before (a
    /// health check makes them).
    #[test]
    fn outbox_counts_read_the_pending_rows_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        drop(SqliteStore::open(&path).unwrap());
        let db = rusqlite::Connection::open(&path).unwrap();
        let plan: Vec<String> = db
            .prepare(&format!(
                "EXPLAIN QUERY PLAN {}",
                include_str!("sql/sqlite/outbox_counts.sql")
            ))
            .unwrap()
            .query_map([10], |r| r.get(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(plan, ["SCAN outbox USING INDEX outbox_pending"], "{plan:?}");
    }

    /// A published row is deleted; rows an older build marked 'published' and kept are deleted when the
    /// file is opened; rows still to publish stay.
    #[test]
    fn published_rows_are_deleted_and_those_an_older_build_kept_go_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        for n in 0..3 {
            super::publish(&store, vec![super::event("shop::order-1", n, None)]);
        }
        let outbox = store.outbox().unwrap();
        let lease = std::time::Duration::from_secs(30);
        let first = outbox.claim("w", 1, lease, &InFlight::none()).unwrap();
        outbox.published("w", &[first.items[0].seq]).unwrap();
        let db = rusqlite::Connection::open(&path).unwrap();
        let rows = || -> Vec<(u64, String)> {
            let mut select = db
                .prepare("SELECT seq, status FROM outbox ORDER BY seq")
                .unwrap();
            let rows = select.query_map([], |r| Ok((r.get(0)?, r.get(1)?)));
            rows.unwrap().map(Result::unwrap).collect()
        };
        let pending = |seqs: &[u64]| {
            seqs.iter()
                .map(|&s| (s, "pending".to_owned()))
                .collect::<Vec<_>>()
        };
        assert_eq!(rows(), pending(&[2, 3]), "the published row is gone");
        db.execute_batch(
            "UPDATE outbox SET status = 'published', published_at = '2026-01-01T00:00:00Z' WHERE seq = 2",
        )
        .unwrap();
        drop(store);
        drop(SqliteStore::open(&path).unwrap());
        assert_eq!(rows(), pending(&[3]), "the row an older build kept is gone");
    }

    /// Rows an older build wrote have no checksum: the column is added, and their text is parsed.
    #[test]
    fn outbox_rows_of_an_older_build_are_published_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        two_rows_to_publish(&SqliteStore::open(&path).unwrap());
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("ALTER TABLE outbox DROP COLUMN checksum")
            .unwrap();
        let store = SqliteStore::open(&path).unwrap();
        let texts = stored_texts(&path);
        assert_eq!(texts.iter().map(|t| t.2).collect::<Vec<_>>(), [None, None]);
        assert_eq!(claimed_payloads(&store), validated(&texts));
    }

    /// An open reads what it needs of a file, not the tables that grow with use: a schema statement
    /// that read every processed marker made each start slower with every message ever handled
    /// (19 ms for 100,000 markers, warm).
    #[test]
    fn an_open_reads_no_table_that_grows_with_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        super::publish(&store, vec![super::event("shop::order-1", 0, None)]);
        drop(store);
        let n = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)";
        let grown = format!(
            "{n} INSERT INTO processed
                 SELECT 'projector', i, 'shop::order-' || i || '@0', 'build', 'then' FROM n;
             {n} INSERT INTO messages (position, time, stream_name, category, type, data, metadata, id)
                 SELECT 0, 'then', 'shop::item-' || i, 'shop::item', 'Shop.Added.v1', '{{}}', '{{}}', 'id-' || i
                 FROM n;"
        );
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(&grown)
            .unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size > 16 << 20, "the tables grew: {size} bytes");
        // Bytes read by this thread's read calls (SQLite reads on the thread that runs the statement).
        let read = || -> u64 {
            let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
            let line = io.lines().find(|l| l.starts_with("rchar:")).unwrap();
            line["rchar:".len()..].trim().parse().unwrap()
        };
        let before = read();
        let store = SqliteStore::open(&path).unwrap();
        let opened = read() - before;
        assert!(
            opened < 1 << 20,
            "an open of a {size} byte file read {opened} bytes"
        );
        let marker = crate::store::MarkerKey {
            global_position: 7,
            identity: "shop::order-7@0",
        };
        let found = store.processed_messages("projector", &[marker]).unwrap();
        assert_eq!(found.len(), 1, "the markers are still there");
    }

    /// A full batch of markers is one statement that binds the subscription and build id once: each
    /// row still holds its own, whether the batch's markers share them or not.
    #[test]
    fn each_marker_of_a_full_batch_keeps_its_subscription_and_build() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        let marker =
            |n: u64, subscription: &str, build: &str| crate::unit_of_work::ProcessedMarker {
                subscription: subscription.into(),
                message_id: format!("m{n}@0"),
                global_position: n,
                build_id: build.into(),
            };
        let alike: Vec<_> = (1..=100).map(|n| marker(n, "s", "b1")).collect();
        let mixed: Vec<_> = (101..=200)
            .map(|n| match n % 2 {
                0 => marker(n, "s", "b1"),
                _ => marker(n, "t", "b2"),
            })
            .collect();
        for processed in [&alike, &mixed] {
            let unit = UnitOfWork {
                processed: processed.clone(),
                ..UnitOfWork::default()
            };
            store.commit(&unit).unwrap();
        }
        let db = rusqlite::Connection::open(&path).unwrap();
        let mut select = db
            .prepare("SELECT subscription, global_position, message_id, build_id FROM processed ORDER BY global_position")
            .unwrap();
        let rows: Vec<(String, u64, String, String)> = select
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let expected: Vec<_> = alike
            .iter()
            .chain(&mixed)
            .map(|m| {
                (
                    m.subscription.clone(),
                    m.global_position,
                    m.message_id.clone(),
                    m.build_id.clone(),
                )
            })
            .collect();
        assert_eq!(rows, expected);
    }

    /// A new file gets this build's version; one a newer build upgraded keeps its own.
    #[test]
    fn an_open_never_lowers_the_schema_version() {
        let version = |dir: &tempfile::TempDir| -> i64 {
            rusqlite::Connection::open(dir.path().join("store.db"))
                .unwrap()
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap()
        };
        let (_store, dir) = reopened_after("");
        assert_eq!(version(&dir), 5);
        let (_store, dir) = reopened_after("PRAGMA user_version = 9");
        assert_eq!(version(&dir), 9);
    }

    /// A new store file made older by `sql` (what a build before a table left), opened again.
    fn reopened_after(sql: &str) -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        drop(SqliteStore::open(&path).unwrap());
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
        (SqliteStore::open(&path).unwrap(), dir)
    }

    /// Replicas sharing the file, each with its own connections.
    #[test]
    fn racing_firings_and_cancels_settle_each_schedule_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let replicas: Vec<SqliteStore> =
            (0..4).map(|_| SqliteStore::open(&path).unwrap()).collect();
        let replicas: Vec<&dyn Store> = replicas.iter().map(|r| r as &dyn Store).collect();
        super::schedules::racing_firings_and_cancels_settle_each_schedule_once(&replicas);
    }

    #[test]
    fn a_store_file_from_before_schedules_gets_their_table() {
        let (store, _dir) = reopened_after("DROP TABLE schedules; PRAGMA user_version = 4");
        let message = super::event("shop::order-1", 0, None);
        let set = ScheduleWrite::Set {
            key: "k".into(),
            due_ms: 5,
            message,
        };
        store
            .commit(&UnitOfWork {
                schedules: vec![set],
                ..UnitOfWork::default()
            })
            .unwrap();
        assert_eq!(store.schedules().next_due().unwrap(), Some(5));
    }

    #[test]
    fn replicas_opening_a_new_file_at_once_all_succeed() {
        // The race is won or lost in microseconds: many rounds, each on a new file.
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store.db");
            let barrier = std::sync::Barrier::new(8);
            std::thread::scope(|scope| {
                let opened: Vec<_> = (0..8)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            SqliteStore::open(&path).map(drop)
                        })
                    })
                    .collect();
                for open in opened {
                    let opened = open.join().unwrap();
                    assert!(opened.is_ok(), "round {round}: {opened:?}");
                }
            });
        }
    }

    #[test]
    fn rows_abandoned_by_an_older_build_are_pending_again_when_the_file_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        super::two_rows_to_publish(&SqliteStore::open(&path).unwrap());
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("UPDATE outbox SET status = 'abandoned', attempts = 10 WHERE seq = 1")
            .unwrap();
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(
            super::revived_in_order(&store),
            ["shop::order-1", "shop::order-2"]
        );
    }

    #[test]
    fn a_store_file_from_before_fences_gets_their_table() {
        let (store, _dir) = reopened_after("DROP TABLE protean_fences");
        store
            .commit(&UnitOfWork {
                fences: vec![fence("p-1", 2)],
                ..UnitOfWork::default()
            })
            .unwrap();
        let stale = store.commit(&fenced(vec![fence("p-1", 1)], "shop::order-1"));
        assert!(is_fenced(&stale, "p-1", 1, 2), "{stale:?}");
    }
}

/// A store file made before documents had versions keeps its documents (version 1 each) and gets
/// conditional writes.
#[test]
fn a_store_file_from_before_document_versions_gets_them() {
    use crate::store::SqliteStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let old = SqliteStore::open(&path).unwrap();
    write_docs(&old, vec![put("1", json!({"n": 1}), None)]).unwrap();
    drop(old);
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("ALTER TABLE documents DROP COLUMN version; DROP TABLE protean_counters")
        .unwrap();
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(version(&store, "1"), 1);
    write_docs(&store, vec![put("1", json!({"n": 2}), Some(1))]).unwrap();
    let stale = write_docs(&store, vec![put("1", json!({"n": 3}), Some(1))]);
    assert!(
        is_document_conflict(&stale, 1, version(&store, "1")),
        "{stale:?}"
    );
    assert!(version(&store, "1") > 1);
}

/// A store file whose processed markers an older build keyed by identity alone: rekeyed at open, every
/// one is still found by the engine's lookup and still refuses its message a second time, whether its
/// message is in this store (found under its global position), a broker entry of another store (under
/// 0), or an entry without positions.
#[test]
fn markers_of_a_store_file_from_before_positions_still_hold() {
    use crate::store::SqliteStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let old = SqliteStore::open(&path).unwrap();
    append(
        &old,
        vec![
            event("shop::order-1", 0, None),
            event("shop::order-1", 1, None),
        ],
    )
    .unwrap();
    drop(old);
    let local = "shop::order-1@1";
    let remote = "billing::invoice-9@4";
    // Not a message of this store: its name ends like one, and it must not take that message's place.
    let lookalike = "shop::order-1x@1";
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(&format!(
            "DROP TABLE processed;
             CREATE TABLE processed (subscription TEXT NOT NULL, message_id TEXT NOT NULL,
                 build_id TEXT NOT NULL, processed_at TEXT NOT NULL,
                 PRIMARY KEY (subscription, message_id)) WITHOUT ROWID;
             INSERT INTO processed VALUES ('s', '{local}', 'old', 't'), ('s', '{remote}', 'old', 't'),
                 ('s', 'protean-id', 'old', 't'), ('s', '{lookalike}', 'old', 't');"
        ))
        .unwrap();
    let store = SqliteStore::open(&path).unwrap();
    let rows = |sql: &str| -> Vec<String> {
        let file = rusqlite::Connection::open(&path).unwrap();
        let mut statement = file.prepare(sql).unwrap();
        let rows = statement.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    assert_eq!(
        rows("SELECT message_id || ' ' || global_position FROM processed"),
        [format!("{local} 2")]
    );
    assert_eq!(
        rows("SELECT message_id FROM processed_before_positions ORDER BY message_id"),
        [remote, "protean-id", lookalike]
    );
    let keys = [
        MarkerKey {
            global_position: 2,
            identity: local,
        },
        MarkerKey {
            global_position: 31,
            identity: remote,
        },
        MarkerKey {
            global_position: 0,
            identity: "protean-id",
        },
    ];
    assert_eq!(store.processed_messages("s", &keys).unwrap().len(), 3);
    for key in keys {
        let again = store.commit(&UnitOfWork {
            processed: vec![ProcessedMarker {
                subscription: "s".into(),
                message_id: key.identity.into(),
                global_position: key.global_position,
                build_id: "new".into(),
            }],
            ..UnitOfWork::default()
        });
        assert!(
            matches!(again, Err(Error::AlreadyProcessed { .. })),
            "{key:?}: {again:?}"
        );
    }
    assert!(store
        .processed("s", &[local, remote, "protean-id"])
        .is_ok_and(|found| found.len() == 3));
    drop(store);

    // A file whose markers all name its own messages keeps no second table.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(&format!(
            "DROP TABLE processed; DROP TABLE processed_before_positions;
             CREATE TABLE processed (subscription TEXT NOT NULL, message_id TEXT NOT NULL,
                 build_id TEXT NOT NULL, processed_at TEXT NOT NULL,
                 PRIMARY KEY (subscription, message_id)) WITHOUT ROWID;
             INSERT INTO processed VALUES ('s', '{local}', 'old', 't');"
        ))
        .unwrap();
    let store = SqliteStore::open(&path).unwrap();
    assert!(
        rows("SELECT name FROM sqlite_master WHERE name = 'processed_before_positions'").is_empty()
    );
    assert_eq!(store.processed_messages("s", &[keys[0]]).unwrap().len(), 1);
}

/// What only the PostgreSQL store offers: migrations, leases and the fence on a stale owner.
mod postgres_only {
    use std::time::{Duration, Instant};

    use super::{append, event, fence, fenced, is_fenced};
    use crate::{
        ownership::Owned,
        store::{Error, InFlight, Leases, PostgresStore, Store},
        unit_of_work::{PositionUpdate, UnitOfWork},
    };

    /// A second replica's store on the same database.
    fn replica(server: &super::cluster::PgServer) -> PostgresStore {
        PostgresStore::open(&server.store_config()).unwrap()
    }

    /// Replicas on one database, each with its own pool.
    #[test]
    fn racing_firings_and_cancels_settle_each_schedule_once() {
        let (store, server) = super::postgres();
        let others: Vec<PostgresStore> = (0..3).map(|_| replica(&server)).collect();
        let mut replicas: Vec<&dyn Store> = vec![&store];
        replicas.extend(others.iter().map(|r| r as &dyn Store));
        super::schedules::racing_firings_and_cancels_settle_each_schedule_once(&replicas);
    }

    /// Poll `take` until it succeeds: the only way to see a lease expire is to ask.
    /// Returns the lease's fencing token.
    fn take_when_free(leases: &dyn Leases, name: &str, owner: &str, ttl: Duration) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(token) = leases.take(&sub(name), owner, ttl).unwrap() {
                return token;
            }
            assert!(Instant::now() < deadline, "the lease never expired");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sub(name: &str) -> Owned {
        Owned::Subscription(name.into())
    }

    /// A store set up by an older build (migration 5) keeps its documents: migration 6 gives each a
    /// version, and conditional writes work on them.
    #[test]
    fn documents_from_before_versions_get_one_at_setup() {
        let (store, server) = super::postgres();
        server.psql(
            "ALTER TABLE protean.documents DROP COLUMN version; \
             DROP SEQUENCE IF EXISTS protean.document_versions; \
             DROP TABLE protean.idempotency_keys; \
             DELETE FROM protean.schema_version WHERE version IN (6, 7); \
             INSERT INTO protean.documents (collection, id, data) VALUES ('c', '1', '{\"n\": 1}')",
        );
        let applied: Vec<i32> = store.setup().unwrap().iter().map(|m| m.version).collect();
        assert_eq!(applied, [6, 7]);
        let old = super::version(&store, "1");
        assert_ne!(old, super::ABSENT);
        super::write_docs(
            &store,
            vec![super::put("1", serde_json::json!({"n": 2}), Some(old))],
        )
        .unwrap();
        let stale = super::write_docs(
            &store,
            vec![super::put("1", serde_json::json!({"n": 3}), Some(old))],
        );
        assert!(
            super::is_document_conflict(&stale, old, super::version(&store, "1")),
            "{stale:?}"
        );
    }

    /// Undo migration 17: the document field table older builds wrote, with `rows` in it.
    fn before_migration_17(server: &super::cluster::PgServer, rows: &str) {
        server.psql(include_str!(
            "../../../tests/fixtures/postgres/before_migration_17.sql"
        ));
        server.psql(&format!(
            "INSERT INTO protean.document_fields VALUES {rows}"
        ));
    }

    /// Documents an older build indexed are found after migration 17 as the host now looks for them:
    /// the entries it makes from the old table are the ones this build makes (a collection beyond
    /// ASCII, whose length in bytes is not its length in characters; an entry long enough to be hashed).
    #[test]
    fn documents_an_older_build_indexed_are_found_after_migration_17() {
        let (store, server) = super::postgres();
        let long = "x".repeat(600);
        let (c, data) = (
            "réservations",
            serde_json::json!({"order_id": "o1", "note": long}),
        );
        store
            .commit(&UnitOfWork {
                documents: vec![crate::unit_of_work::DocumentWrite::Put {
                    collection: c.into(),
                    id: "r1".into(),
                    data: data.to_string(),
                    expected: None,
                }],
                ..UnitOfWork::default()
            })
            .unwrap();
        before_migration_17(
            &server,
            &format!("('{c}', 'order_id', '\"o1\"', 'r1'), ('{c}', 'note', '\"{long}\"', 'r1')"),
        );
        let applied: Vec<i32> = store.setup().unwrap().iter().map(|m| m.version).collect();
        assert_eq!(applied, [17]);
        for (field, value) in [
            ("order_id", serde_json::json!("o1")),
            ("note", serde_json::json!(long)),
        ] {
            let found = store.find_documents(c, field, &value).unwrap();
            assert_eq!(found.len(), 1, "found by {field}");
            assert_eq!(found[0].id, "r1");
        }
        assert_eq!(
            server.psql("SELECT to_regclass('protean.document_fields') IS NULL"),
            "t",
            "the old table is gone, so an older server's document write fails"
        );
    }

    /// `find` is a lookup in the field index, not a scan of the collection: the plan a prepared statement
    /// settles on (generic, for any value) uses the GIN index, on a collection of thousands.
    #[test]
    fn a_find_is_planned_on_the_field_index() {
        let (store, server) = super::postgres();
        let documents = (0..2000)
            .map(|i| crate::unit_of_work::DocumentWrite::Put {
                collection: "reservations".into(),
                id: format!("r{i}"),
                data: serde_json::json!({"order_id": format!("o{i}"), "qty": i % 3}).to_string(),
                expected: None,
            })
            .collect();
        store
            .commit(&UnitOfWork {
                documents,
                ..UnitOfWork::default()
            })
            .unwrap();
        server.psql("ANALYZE protean.documents");
        let find = include_str!("sql/postgres/find_documents.sql");
        let plan = server.psql(&format!(
            "SET plan_cache_mode = force_generic_plan; PREPARE find(text) AS {find}; \
             EXPLAIN EXECUTE find('12:reservationsorder_id=\"o7\"')"
        ));
        assert!(plan.contains("documents_by_field"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
    }

    /// A server of an older build still connected would write the table migration 17 drops: `db setup`
    /// refuses to apply it, naming the connection, and applies it once that server is gone. A server of
    /// this build (waiting for the migration) does not stop it.
    #[test]
    fn migration_17_waits_for_older_servers_to_stop() {
        let (store, server) = super::postgres();
        before_migration_17(&server, "('c', 'f', '1', 'd')");
        let connect = |name: &str| {
            let mut config: postgres::Config = server.uri().parse().unwrap();
            config.application_name(name);
            config.connect(postgres::NoTls).unwrap()
        };
        let _current = connect(&crate::store::postgres::migrate::application_name());
        let older = connect("protean-host");
        let pid: i32 = server
            .psql("SELECT pid FROM pg_stat_activity WHERE application_name = 'protean-host'")
            .parse()
            .unwrap();
        let refused = store.setup().unwrap_err();
        assert!(
            matches!(refused, Error::OlderServersConnected { migration: 17, .. }),
            "{refused}"
        );
        let line = refused.to_string();
        assert!(line.contains(&format!("process {pid} from ")), "{line}");
        assert!(line.contains("run `protean-host db setup` again"), "{line}");
        assert_eq!(store.status().unwrap().pending.len(), 1, "nothing applied");
        drop(older);
        // The server ends the session after the client's goodbye: wait for it to be gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        )) != "0"
        {
            assert!(
                Instant::now() < deadline,
                "the older connection never ended"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let applied: Vec<i32> = store.setup().unwrap().iter().map(|m| m.version).collect();
        assert_eq!(applied, [17]);
    }

    /// A published row is deleted; migration 18 deletes the rows older builds marked 'published' and
    /// kept, and leaves the rows still to publish.
    #[test]
    fn published_rows_are_deleted_and_migration_18_deletes_those_an_older_build_kept() {
        let (store, server) = super::postgres();
        for n in 0..3 {
            super::publish(&store, vec![super::event("shop::order-1", n, None)]);
        }
        let outbox = store.outbox().unwrap();
        let first = outbox
            .claim("w", 1, Duration::from_secs(30), &InFlight::none())
            .unwrap();
        outbox.published("w", &[first.items[0].seq]).unwrap();
        let rows = "SELECT string_agg(seq || ':' || status, ',' ORDER BY seq) FROM protean.outbox";
        assert_eq!(
            server.psql(rows),
            "2:pending,3:pending",
            "the published row is gone"
        );
        server.psql(
            "UPDATE protean.outbox SET status = 'published', published_at = now() WHERE seq = 2; \
             DELETE FROM protean.schema_version WHERE version = 18",
        );
        let applied: Vec<i32> = store.setup().unwrap().iter().map(|m| m.version).collect();
        assert_eq!(applied, [18]);
        assert_eq!(
            server.psql(rows),
            "3:pending",
            "the row an older build kept is gone"
        );
    }

    #[test]
    fn migration_5_makes_rows_abandoned_by_an_older_build_pending_again() {
        let (store, server) = super::postgres();
        super::two_rows_to_publish(&store);
        server.psql(
            "UPDATE protean.outbox SET status = 'abandoned', attempts = 10 \
             WHERE seq = (SELECT min(seq) FROM protean.outbox); \
             DELETE FROM protean.schema_version WHERE version = 5",
        );
        let applied: Vec<i32> = store.setup().unwrap().iter().map(|m| m.version).collect();
        assert_eq!(applied, [5]);
        assert_eq!(
            super::revived_in_order(&store),
            ["shop::order-1", "shop::order-2"]
        );
    }

    #[test]
    fn setup_is_idempotent_and_status_is_current() {
        let (store, _server) = super::postgres();
        assert!(store.setup().unwrap().is_empty(), "nothing left to apply");
        let status = store.status().unwrap();
        assert!(status.is_current());
        assert_eq!(status.version, crate::store::postgres::migrate::latest());
    }

    /// A MessageDB client takes only its category's lock, so its append can commit after a later one of
    /// another category: a reader of both must wait for it rather than read past it.
    #[test]
    fn a_reader_waits_for_a_message_db_append_in_flight_below_what_it_sees() {
        let (store, server) = super::postgres();
        let write = |stream: &str| {
            format!("SELECT message_store.write_message(gen_random_uuid()::text, '{stream}', 'Placed', '{{}}')")
        };
        let mut slow = postgres::Client::connect(&server.uri(), postgres::NoTls).unwrap();
        slow.batch_execute(&format!("BEGIN; {}", write("shop::order-1")))
            .unwrap();
        server.psql(&write("shop::stock-1"));
        let categories = ["shop::order".to_owned(), "shop::stock".to_owned()];
        let page = std::thread::scope(|scope| {
            let reader = scope.spawn(|| store.read_categories(&categories, 0, 10).unwrap());
            let waiting =
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
            while server.psql(waiting) != "1" && !reader.is_finished() {
                std::thread::sleep(Duration::from_millis(5));
            }
            slow.batch_execute("COMMIT").unwrap();
            reader.join().unwrap()
        });
        let read: Vec<u64> = page.iter().map(|m| m.global_position).collect();
        assert_eq!(
            read,
            [1, 2],
            "the append in flight below position 2 is read too"
        );
    }

    /// A writer that skips the category lock could commit below a position already read past: the store
    /// refuses its append, naming the fix, rather than let a subscription miss it.
    #[test]
    fn an_append_without_its_category_lock_is_refused() {
        let (_store, server) = super::postgres();
        let mut client = postgres::Client::connect(&server.uri(), postgres::NoTls).unwrap();
        let insert =
            "INSERT INTO message_store.messages (id, stream_name, position, type, data, metadata) \
                      VALUES (gen_random_uuid(), 'shop::order-1', 0, 'Placed', '{}', '{}')";
        let refused = client.batch_execute(insert).unwrap_err();
        let db = refused.as_db_error().unwrap();
        assert_eq!(
            db.message(),
            "message of category shop::order appended without the category's lock: subscriptions could miss it"
        );
        assert!(db.hint().unwrap().contains("message_store.write_message"));
        client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(message_store.hash_64('shop::order')); {insert}; COMMIT"
            ))
            .expect("with the lock it is appended");
        let other = client.batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(message_store.hash_64('shop::stock')); {insert}; COMMIT"
        ));
        assert!(other.is_err(), "another category's lock is not this one's");
        let recorded_other = client.batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(message_store.hash_64('shop::stock')); \
             SELECT set_config('protean.category_locks', ',' || message_store.hash_64('shop::stock') || ',', true); \
             {insert}; COMMIT"
        ));
        assert!(
            recorded_other.is_err(),
            "a record of another category's lock passes only that category"
        );
    }

    #[test]
    fn a_lease_has_one_owner_until_it_expires() {
        let (a, server) = super::postgres();
        let b = replica(&server);
        let ttl = Duration::from_millis(300);
        let (la, lb) = (a.leases().unwrap(), b.leases().unwrap());
        let first = la.take(&sub("sub"), "a", ttl).unwrap().expect("free");
        assert_eq!(lb.take(&sub("sub"), "b", ttl).unwrap(), None, "held by a");
        assert_eq!(
            la.take(&sub("sub"), "a", ttl).unwrap(),
            Some(first),
            "a renews its own lease, under the same token"
        );
        let second = take_when_free(lb, "sub", "b", Duration::from_secs(30));
        assert!(
            second > first,
            "a new owner, a higher token: {second} > {first}"
        );
        assert_eq!(
            la.take(&sub("sub"), "a", ttl).unwrap(),
            None,
            "b holds it now"
        );
        lb.release(&sub("sub"), "b").unwrap();
        let third = la.take(&sub("sub"), "a", ttl).unwrap();
        assert!(third.is_some(), "released leases are free at once");
    }

    /// A released lease's row is gone, but the fence its owner raised is not: the next owner's token is
    /// still higher, so the released owner's late commits stay refused.
    #[test]
    fn a_token_stays_above_the_fence_after_a_release() {
        let (a, server) = super::postgres();
        let b = replica(&server);
        let ttl = Duration::from_secs(30);
        let token = a
            .leases()
            .unwrap()
            .take(&sub("sub"), "a", ttl)
            .unwrap()
            .unwrap();
        a.commit(&fenced(vec![fence("sub", token)], "shop::order-1"))
            .unwrap();
        a.leases().unwrap().release(&sub("sub"), "a").unwrap();
        let next = b
            .leases()
            .unwrap()
            .take(&sub("sub"), "b", ttl)
            .unwrap()
            .unwrap();
        assert!(next > token, "{next} > {token}");
        b.commit(&fenced(vec![fence("sub", next)], "shop::order-2"))
            .unwrap();
        let late = a.commit(&fenced(vec![fence("sub", token)], "shop::order-3"));
        assert!(is_fenced(&late, "sub", token, next), "{late:?}");
    }

    #[test]
    fn a_stale_owner_cannot_commit_its_position() {
        let (a, server) = super::postgres();
        let b = replica(&server);
        let unit = |position, token| UnitOfWork {
            messages: vec![event("shop::order-1", position, None)],
            position: Some(PositionUpdate {
                subscription: "sub".into(),
                position,
            }),
            fences: vec![fence("sub", token)],
            ..UnitOfWork::default()
        };
        let old = a
            .leases()
            .unwrap()
            .take(&sub("sub"), "a", Duration::from_millis(200))
            .unwrap()
            .unwrap();
        a.commit(&unit(1, old)).unwrap();
        let new = take_when_free(b.leases().unwrap(), "sub", "b", Duration::from_secs(30));
        // What the engine does first with a lease it took (see `ownership`).
        b.commit(&fenced(vec![fence("sub", new)], "shop::order-9"))
            .unwrap();
        let refused = a.commit(&unit(2, old)).unwrap_err();
        assert!(
            matches!(&refused, Error::Fenced { owned, .. } if owned == &sub("sub")),
            "{refused}"
        );
        assert_eq!(
            a.position("sub").unwrap(),
            Some(1),
            "the stale commit moved nothing"
        );
        assert_eq!(
            a.read_stream("shop::order-1", 0).unwrap().len(),
            1,
            "and appended nothing"
        );
        b.commit(&unit(3, new)).unwrap();
        assert_eq!(b.position("sub").unwrap(), Some(3), "the new owner commits");
        append(&a, vec![event("shop::order-2", 0, None)])
            .expect("units without a fence are not fenced");
    }

    #[test]
    fn an_expired_lease_nobody_took_still_lets_its_owner_commit() {
        let (a, server) = super::postgres();
        let b = replica(&server);
        let ttl = Duration::from_millis(100);
        let old = a
            .leases()
            .unwrap()
            .take(&sub("sub"), "a", ttl)
            .unwrap()
            .unwrap();
        // The lease's time runs out: a clock, nothing to await (b's take below shows it did).
        std::thread::sleep(ttl * 2);
        let unit = UnitOfWork {
            position: Some(PositionUpdate {
                subscription: "sub".into(),
                position: 7,
            }),
            fences: vec![fence("sub", old)],
            ..UnitOfWork::default()
        };
        a.commit(&unit)
            .expect("a slow batch whose lease nobody took commits");
        let new = b.leases().unwrap().take(&sub("sub"), "b", ttl).unwrap();
        let new = new.expect("the lease was expired");
        b.commit(&fenced(vec![fence("sub", new)], "shop::order-9"))
            .unwrap();
        assert!(
            matches!(a.commit(&unit), Err(Error::Fenced { .. })),
            "after the takeover it fails"
        );
    }
}

#[test]
fn a_stored_message_is_identified_by_its_stream_and_position_else_its_id() {
    let message = |global_position, position| super::StoredMessage {
        global_position,
        position,
        stream: "shop::order-1".into(),
        id: "m-1".into(),
        ..super::StoredMessage::default()
    };
    assert_eq!(message(5, 0).identity(), "shop::order-1@0");
    assert_eq!(message(5, 42).identity(), "shop::order-1@42");
    assert_eq!(
        message(5, u64::MAX).identity(),
        format!("shop::order-1@{}", u64::MAX)
    );
    assert_eq!(message(0, 7).identity(), "m-1");
}
