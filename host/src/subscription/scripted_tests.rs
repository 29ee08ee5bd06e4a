//! The engine's loop ([`run`]) over a scripted source, with scripted handlers ([`Handlers`]) and a
//! store that records every unit it commits ([`Recording`]): what the loop committed and settled,
//! asserted unit by unit.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{message, Log, Scripted};
use crate::{
    config::Config,
    engine::{progress::State, run::run, Shared},
    message::Kind as MessageKind,
    plugin::{
        scripted::{effects, markers, Act, Scripted as Handlers, DONE},
        Kind,
    },
    store::{recording::Recording, Store, StoredMessage},
    sync::lock,
    unit_of_work::NewMessage,
};

const HAPPENED: &str = "Test.Happened.v1";

/// Batches of two; one retry, due at once; one re-run after a conflict.
const CONFIG: &str = "[server]\nmessages_per_tick = 2\nmax_retries = 1\nretry_delay_ms = 1\nmax_retry_delay_ms = 1\nversion_retries = 1\n";

/// An event handler `h` of category `thing`, handling [`HAPPENED`].
fn handlers() -> Handlers {
    Handlers::new("h", Kind::EventHandler, &["thing"], &[HAPPENED])
}

/// Events of [`HAPPENED`] with these ids, at global positions 1, 2, ...
fn script(ids: &[&str]) -> Vec<StoredMessage> {
    (1..)
        .zip(ids)
        .map(|(n, id)| message(n, HAPPENED, id))
        .collect()
}

/// The identities of the script's messages at these 1-based global positions.
fn at(positions: &[u64]) -> Vec<String> {
    positions
        .iter()
        .map(|n| format!("thing-1@{}", n - 1))
        .collect()
}

fn call(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|id| (*id).to_owned()).collect()
}

/// What a run of the loop left.
struct Played {
    log: Log,
    calls: Vec<Vec<String>>,
    shared: Arc<Shared>,
}

/// Run the loop over a scripted source serving `ids` until it has settled them all or `shutdown`.
async fn play(
    handlers: Handlers,
    store: Arc<dyn Store>,
    ids: &[&str],
    shutdown: CancellationToken,
) -> Played {
    let config = Config::parse(CONFIG, Path::new("test.toml"), &BTreeMap::new()).unwrap();
    let handlers = Arc::new(handlers);
    let (shared, subscriptions) = Shared::for_tests(handlers.clone(), store, config);
    let [sub] = subscriptions.try_into().unwrap();
    let (source, log) = Scripted::new(&sub, script(ids));
    run(shared.clone(), sub, source, shutdown).await.unwrap();
    let log = lock(&log).clone();
    Played {
        log,
        calls: handlers.calls(),
        shared,
    }
}

#[tokio::test]
async fn every_message_is_handled_once_in_batches_and_settled_in_order() {
    let store: Arc<Recording> = Arc::default();
    let ids = ["m1", "m2", "m3", "m4", "m5"];
    let played = play(handlers(), store.clone(), &ids, CancellationToken::new()).await;
    assert_eq!(
        played.log.served,
        [at(&[1, 2]), at(&[3, 4]), at(&[5])],
        "batches of messages_per_tick, each served once"
    );
    assert_eq!(
        played.calls,
        [call(&["m1", "m2"]), call(&["m3", "m4"]), call(&["m5"])]
    );
    let units = store.committed();
    let effects: Vec<Vec<String>> = units.iter().map(effects).collect();
    assert_eq!(
        effects,
        [call(&["m1", "m2"]), call(&["m3", "m4"]), call(&["m5"])]
    );
    let markers: Vec<Vec<String>> = units.iter().map(markers).collect();
    assert_eq!(markers, [at(&[1, 2]), at(&[3, 4]), at(&[5])]);
    // The source keeps its own cursor: no unit moves a stored position.
    assert!(units
        .iter()
        .all(|u| u.position.is_none() && u.dead_letters.is_empty()));
    assert_eq!(played.log.settled, at(&[1, 2, 3, 4, 5]));
    assert!(played.log.refused.is_empty() && played.log.closed);
    let totals = played.shared.progress.totals();
    assert_eq!(
        (
            totals.handled[HAPPENED],
            totals.written[DONE],
            totals.dead_lettered
        ),
        (5, 5, 0)
    );
}

#[tokio::test]
async fn a_handler_failure_is_retried_then_dead_lettered_and_the_batches_go_on() {
    let store: Arc<Recording> = Arc::default();
    let scripted = handlers().script("m2", &[Act::Retry, Act::Retry]);
    let played = play(
        scripted,
        store.clone(),
        &["m1", "m2", "m3"],
        CancellationToken::new(),
    )
    .await;
    // m2 failed in the first batch; the second serves it again, first, and it is called alone.
    assert_eq!(played.log.served, [at(&[1, 2]), at(&[2, 3])]);
    assert_eq!(
        played.calls,
        [call(&["m1", "m2"]), call(&["m2"]), call(&["m3"])]
    );
    let units = store.committed();
    let effects: Vec<Vec<String>> = units.iter().map(effects).collect();
    assert_eq!(effects, [call(&["m1"]), vec![], call(&["m3"])]);
    let markers: Vec<String> = units.iter().flat_map(markers).collect();
    assert_eq!(
        markers,
        at(&[1, 3]),
        "a dead-lettered message is not marked handled"
    );
    let [dead] = units[1].dead_letters.clone().try_into().unwrap();
    assert_eq!(
        (
            dead.handler.as_str(),
            dead.attempts,
            dead.error.as_str(),
            dead.global_position
        ),
        ("h", 2, "m2 failed", 2)
    );
    // Served from memory, not the store: the dead letter (Origin::Store) keeps the message itself.
    assert_eq!(
        (
            dead.stream.as_str(),
            dead.message_type.as_str(),
            dead.data.as_str()
        ),
        ("thing-1", HAPPENED, r#"{"id":"m2"}"#)
    );
    assert!(
        dead.metadata.contains(&dead.message_id),
        "{}",
        dead.metadata
    );
    assert_eq!(store.dead_letters(Some("h")).unwrap(), [dead]);
    assert_eq!(played.log.settled, at(&[1, 2, 3]));
    assert_eq!(played.shared.progress.totals().dead_lettered, 1);
}

#[tokio::test]
async fn a_commit_the_store_refuses_is_served_again_after_the_backoff_and_loses_nothing() {
    let recording: Arc<Recording> = Arc::default();
    recording.refuse_next(1);
    let played = play(
        handlers(),
        recording.clone(),
        &["m1", "m2", "m3"],
        CancellationToken::new(),
    )
    .await;
    let [refused] = played.log.refused.clone().try_into().unwrap();
    assert!(refused.contains("scripted outage"), "{refused}");
    assert_eq!(played.log.served, [at(&[1, 2]), at(&[1, 2]), at(&[3])]);
    assert_eq!(
        played.calls,
        [call(&["m1", "m2"]), call(&["m1", "m2"]), call(&["m3"])]
    );
    // The refused unit left nothing: each effect and marker is committed once.
    let units = recording.committed();
    let effects: Vec<Vec<String>> = units.iter().map(effects).collect();
    assert_eq!(effects, [call(&["m1", "m2"]), call(&["m3"])]);
    let markers: Vec<String> = units.iter().flat_map(markers).collect();
    assert_eq!(markers, at(&[1, 2, 3]));
    assert_eq!(recording.read_stream("done-m1", 0).unwrap().len(), 1);
    assert_eq!(played.log.settled, at(&[1, 2, 3]));
}

#[tokio::test]
async fn a_commit_that_keeps_conflicting_is_retried_by_the_loop_and_loses_nothing() {
    let store: Arc<Recording> = Arc::default();
    let writer = store.clone();
    let races = Arc::new(AtomicU32::new(0));
    // Another writer appends to m1's effect stream during its first two calls: the run and its
    // one re-run (`version_retries = 1`) both conflict.
    let hook = move |id: &str| {
        if id == "m1" && races.fetch_add(1, Ordering::SeqCst) < 2 {
            let data = json!({ "id": "elsewhere" });
            let theirs =
                NewMessage::new(MessageKind::Event, "done-m1", DONE, &data, None, None, None);
            crate::store::tests::append(&writer.inner, vec![theirs]).unwrap();
        }
    };
    let played = play(
        handlers().hook(hook),
        store.clone(),
        &["m1", "m2"],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(played.log.served, [at(&[1, 2]), at(&[1, 2])]);
    assert_eq!(
        played.calls,
        [
            call(&["m1", "m2"]),
            call(&["m1", "m2"]),
            call(&["m1"]),
            call(&["m2"])
        ]
    );
    // A conflict is the batch's to re-run and the loop's to retry: the source never sees a refusal.
    assert!(played.log.refused.is_empty());
    let units = store.committed();
    let effects: Vec<Vec<String>> = units.iter().map(effects).collect();
    assert_eq!(effects, [call(&["m1"]), call(&["m2"])]);
    let markers: Vec<String> = units.iter().flat_map(markers).collect();
    assert_eq!(markers, at(&[1, 2]));
    assert_eq!(
        units[0].messages[0].expected_version,
        Some(1),
        "after the other writer's two"
    );
    assert_eq!(played.log.settled, at(&[1, 2]));
}

#[tokio::test]
async fn shutdown_finishes_and_commits_the_batch_in_flight_and_serves_no_other() {
    let store: Arc<Recording> = Arc::default();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let scripted = handlers().hook(move |id| {
        if id == "m1" {
            stop.cancel();
        }
    });
    let played = play(scripted, store.clone(), &["m1", "m2", "m3", "m4"], shutdown).await;
    assert_eq!(played.log.served, [at(&[1, 2])]);
    assert_eq!(played.calls, [call(&["m1", "m2"])]);
    let [unit] = store.committed().try_into().unwrap();
    assert_eq!(effects(&unit), ["m1", "m2"]);
    assert_eq!(markers(&unit), at(&[1, 2]));
    assert_eq!(played.log.settled, at(&[1, 2]));
    assert!(played.log.closed);
    let states = played.shared.progress.snapshot();
    assert_eq!(states[0].0, "h");
    assert_eq!(states[0].1, State::Stopped);
}
