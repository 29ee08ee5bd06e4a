//! The batch logic on scripted handlers ([`Scripted`]) over a memory store that records every unit it
//! commits ([`Recording`]): classification, failures, crash containment, held keys, the position
//! prefix and conflict re-runs, asserted on the units of work.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicU32, Ordering as Atomic},
        Arc,
    },
};

use protean_plugin_api::{AfterDeadLetter, HandlerOptions};
use serde_json::{json, Value};

use super::{run, Attempts, Context, Origin, Record, Report, Subscription, Worker};
use crate::{
    config::{Config, SubscriptionType},
    engine::generation::Generation,
    message::Kind as MessageKind,
    plugin::{
        scripted::{effects, markers, Act, Scripted, DONE},
        Kind,
    },
    store::{recording::Recording, Store, StoredMessage},
    subscription::parking::Parking,
    unit_of_work::{CallRecord, NewMessage, UnitOfWork},
};

/// Handled messages' type; `Test.Other.v1` is one no handler here takes.
const HAPPENED: &str = "Test.Happened.v1";

/// Fast retries (so a due retry is due at once) unless a test holds keys for longer.
const FAST: &str = "[server]\nretry_delay_ms = 1\nmax_retry_delay_ms = 1\n";

/// A subscription of scripted handlers over a recording store.
struct Setup {
    store: Arc<Recording>,
    handlers: Arc<Scripted>,
    sub: Arc<Subscription>,
}

impl Setup {
    fn new(store: Arc<Recording>, handlers: Scripted, config: &str) -> Self {
        let config = Config::parse(config, Path::new("test.toml"), &BTreeMap::new()).unwrap();
        let handlers = Arc::new(handlers);
        let generation = Generation::plan(1, handlers.clone(), &config).unwrap();
        let sub = generation.subscriptions[0].clone();
        Self {
            store,
            handlers,
            sub,
        }
    }

    /// An event handler `h` of category `thing`.
    fn events(handlers: impl FnOnce(Scripted) -> Scripted, config: &str) -> Self {
        let scripted = Scripted::new("h", Kind::EventHandler, &["thing"], &[HAPPENED]);
        Self::new(Arc::default(), handlers(scripted), config)
    }

    /// The context of a single event-store reader of the subscription.
    fn context(&self, record: Record) -> Context<'_> {
        Context {
            plugin: self.handlers.as_ref(),
            store: self.store.as_ref(),
            clock: &crate::clock::SYSTEM,
            subscription: &self.sub,
            version_retries: 2,
            publish: false,
            fences: Vec::new(),
            position: Some(&self.sub.plan.name),
            worker: None,
            keys: None,
            deadlines: None,
            turns: None,
            progress: None,
            record,
            parking: None,
            origin: Origin::Store,
            first_delivery: false,
        }
    }

    /// Append events of `type` to `thing-1`, one per data, committed as one unit.
    fn append(&self, message_type: &str, data: &[Value]) {
        let messages = data
            .iter()
            .map(|d| {
                NewMessage::new(
                    MessageKind::Event,
                    "thing-1",
                    message_type,
                    d,
                    None,
                    None,
                    None,
                )
            })
            .collect();
        append(&self.store.inner, messages);
    }

    /// Every message of the subscription's categories.
    fn read(&self) -> Vec<StoredMessage> {
        self.read_after(0)
    }

    fn read_after(&self, after: u64) -> Vec<StoredMessage> {
        let categories = &self.sub.plan.categories;
        self.store.read_categories(categories, after, 100).unwrap()
    }

    /// One batch of everything after the stored position, as a single reader that records suspects
    /// only.
    fn run(&self, attempts: &mut Attempts) -> Report {
        let after = self.store.position(&self.sub.plan.name).unwrap();
        let messages = self.read_after(after.unwrap_or(0));
        run(&self.context(Record::Suspects), &messages, attempts).unwrap()
    }
}

fn append(store: &dyn Store, messages: Vec<NewMessage>) {
    crate::store::tests::append(store, messages).unwrap();
}

fn ids(ids: &[&str]) -> Vec<Value> {
    ids.iter().map(|id| json!({ "id": id })).collect()
}

fn position(unit: &UnitOfWork) -> Option<u64> {
    unit.position.as_ref().map(|p| p.position)
}

fn calls(setup: &Setup) -> Vec<Vec<String>> {
    setup.handlers.calls()
}

fn call(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|id| (*id).to_owned()).collect()
}

#[test]
fn a_batch_is_one_call_per_handler_run_and_one_unit_with_effects_markers_and_position() {
    let setup = Setup::events(|s| s, FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2", "m3"]));
    let messages = setup.read();
    let report = setup.run(&mut Attempts::default());
    assert_eq!(calls(&setup), [call(&["m1", "m2", "m3"])]);
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(effects(&unit), ["m1", "m2", "m3"]);
    let identities: Vec<String> = messages.iter().map(StoredMessage::identity).collect();
    assert_eq!(markers(&unit), identities);
    assert!(unit.processed.iter().all(|p| p.build_id == "scripted"));
    assert_eq!(position(&unit), Some(messages[2].global_position));
    assert_eq!(unit.position.as_ref().unwrap().subscription, "h");
    assert!(unit.dead_letters.is_empty());
    // Whatever a dead process may have recorded of the messages called is cleared with them.
    let ended: Vec<String> = unit.ended_calls.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ended, identities);
    assert!(report.complete && report.retry.is_none());
    assert_eq!(report.position, Some(messages[2].global_position));
    assert_eq!(report.settled, identities);
}

#[test]
fn poison_is_dead_lettered_unhandled_and_the_batch_goes_on() {
    let setup = Setup::events(|s| s, &format!("{FAST}max_message_bytes = 4096\n"));
    let big = "x".repeat(5000);
    setup.append(
        HAPPENED,
        &[
            json!({"id": "m1"}),
            json!({"id": "bad-metadata"}),
            json!({"id": "bad-checksum"}),
            json!({"id": "oversize", "pad": big}),
            json!({"id": "m5"}),
        ],
    );
    let mut messages = setup.read();
    messages[1].metadata = "not json".into();
    messages[2].data = json!({"id": "bad-checksum", "changed": true}).to_string();
    let report = run(
        &setup.context(Record::Suspects),
        &messages,
        &mut Attempts::default(),
    )
    .unwrap();
    assert_eq!(calls(&setup), [call(&["m1"]), call(&["m5"])]);
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(effects(&unit), ["m1", "m5"]);
    assert_eq!(
        markers(&unit),
        [messages[0].identity(), messages[4].identity()]
    );
    let reasons: Vec<(&str, u32, &str)> = unit
        .dead_letters
        .iter()
        .map(|d| (d.handler.as_str(), d.attempts, d.error.as_str()))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons
        .iter()
        .all(|(handler, attempts, _)| handler.is_empty() && *attempts == 1));
    assert!(
        reasons[0].2.starts_with("metadata is not valid JSON"),
        "{reasons:?}"
    );
    assert!(reasons[1].2.starts_with("checksum mismatch"), "{reasons:?}");
    assert!(
        reasons[2].2.starts_with("message is ")
            && reasons[2]
                .2
                .contains("over server.max_message_bytes = 4096"),
        "{reasons:?}"
    );
    // The event store keeps the message in its dead letter.
    assert_eq!(unit.dead_letters[1].data, messages[2].data);
    assert_eq!(position(&unit), Some(messages[4].global_position));
    assert_eq!((report.dead_lettered, report.complete), (3, true));
    assert_eq!(
        report.dead_lettered_ids,
        [
            messages[1].identity(),
            messages[2].identity(),
            messages[3].identity()
        ]
    );
}

#[test]
fn a_type_nobody_here_handles_is_skipped_and_passed_by_the_position() {
    let setup = Setup::events(|s| s, FAST);
    setup.append(HAPPENED, &ids(&["m1"]));
    setup.append("Test.Other.v1", &ids(&["other"]));
    let messages = setup.read();
    let report = setup.run(&mut Attempts::default());
    assert_eq!(calls(&setup), [call(&["m1"])]);
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(markers(&unit), [messages[0].identity()]);
    assert!(unit.dead_letters.is_empty());
    assert_eq!(position(&unit), Some(messages[1].global_position));
    assert_eq!((report.skipped, report.complete), (1, true));
}

#[test]
fn a_command_nobody_handles_is_poison_and_an_expired_one_is_skipped_unhandled() {
    let scripted = Scripted::new(
        "runner",
        Kind::CommandHandler,
        &["thing:command"],
        &["Test.Do.v1"],
    );
    let setup = Setup::new(Arc::default(), scripted, FAST);
    assert_eq!(setup.sub.plan.name, "commands:thing");
    let command = |message_type: &str, id: &str, deadline: Option<&str>| {
        let data = json!({ "id": id });
        NewMessage::new(
            MessageKind::Command,
            "thing:command-1",
            message_type,
            &data,
            None,
            deadline,
            None,
        )
    };
    append(
        &setup.store.inner,
        vec![
            command("Test.Do.v1", "c1", None),
            command("Test.Unknown.v1", "c2", None),
            command("Test.Do.v1", "c3", Some("2000-01-01T00:00:00Z")),
            command("Test.Do.v1", "c4", Some("2999-01-01T00:00:00Z")),
        ],
    );
    let messages = setup.read();
    let report = setup.run(&mut Attempts::default());
    assert_eq!(calls(&setup), [call(&["c1"]), call(&["c4"])]);
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(effects(&unit), ["c1", "c4"]);
    let [dead] = unit.dead_letters.clone().try_into().unwrap();
    assert_eq!(dead.global_position, messages[1].global_position);
    assert_eq!(
        dead.error,
        "no handler for command type Test.Unknown.v1; is the right domain loaded?"
    );
    assert_eq!((report.skipped, report.dead_lettered), (1, 1));
    assert_eq!(position(&unit), Some(messages[3].global_position));
}

#[test]
fn a_retryable_failure_stops_the_batch_before_it_and_drops_its_partial_writes() {
    let setup = Setup::events(|s| s.script("m2", &[Act::Retry]), FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2", "m3"]));
    let messages = setup.read();
    let mut attempts = Attempts::default();
    let report = setup.run(&mut attempts);
    assert_eq!(calls(&setup), [call(&["m1", "m2", "m3"])]);
    let [unit] = setup.store.take().try_into().unwrap();
    assert_eq!(
        effects(&unit),
        ["m1"],
        "m2's write is dropped, m3 not settled"
    );
    assert_eq!(markers(&unit), [messages[0].identity()]);
    assert_eq!(position(&unit), Some(messages[0].global_position));
    assert!(report.retry.is_some() && !report.complete);
    assert_eq!(attempts.failed(&messages[1].identity()), 1);

    // The retry: m2 alone, in a unit of its own (recorded before its call), then the rest.
    let report = setup.run(&mut attempts);
    assert_eq!(&calls(&setup)[1..], [call(&["m2"]), call(&["m3"])]);
    let [alone, rest] = setup.store.take().try_into().unwrap();
    assert_eq!(
        (effects(&alone), position(&alone)),
        (vec!["m2".to_owned()], Some(messages[1].global_position))
    );
    assert_eq!(
        alone.ended_calls,
        [("h".to_owned(), messages[1].identity())]
    );
    assert_eq!(
        (effects(&rest), position(&rest)),
        (vec!["m3".to_owned()], Some(messages[2].global_position))
    );
    assert_eq!(rest.ended_calls, [("h".to_owned(), messages[2].identity())]);
    assert!(report.complete && report.retry.is_none());
    assert_eq!(
        attempts.failed(&messages[1].identity()),
        0,
        "forgotten once settled"
    );
    assert!(setup.store.recorded_calls("h", None).unwrap().is_empty());
}

#[test]
fn a_rejection_is_dead_lettered_with_its_handler_and_the_batch_goes_on() {
    let setup = Setup::events(|s| s.script("m2", &[Act::Reject]), FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2", "m3"]));
    let messages = setup.read();
    let report = setup.run(&mut Attempts::default());
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(effects(&unit), ["m1", "m3"]);
    assert_eq!(
        markers(&unit),
        [messages[0].identity(), messages[2].identity()]
    );
    let [dead] = unit.dead_letters.clone().try_into().unwrap();
    assert_eq!(
        (
            dead.handler.as_str(),
            dead.attempts,
            dead.error.as_str(),
            dead.build_id.as_str()
        ),
        ("h", 1, "m2 rejected", "scripted")
    );
    assert_eq!(position(&unit), Some(messages[2].global_position));
    // The rest of the call after the rejected message is called again.
    assert_eq!(calls(&setup), [call(&["m1", "m2", "m3"]), call(&["m3"])]);
    assert!(report.complete);
}

#[test]
fn a_retryable_failure_out_of_retries_is_dead_lettered() {
    let options = HandlerOptions {
        max_retries: Some(1),
        ..HandlerOptions::default()
    };
    let setup = Setup::events(
        |s| s.options(options).script("m1", &[Act::Retry, Act::Retry]),
        FAST,
    );
    setup.append(HAPPENED, &ids(&["m1"]));
    let mut attempts = Attempts::default();
    let first = setup.run(&mut attempts);
    assert!(first.retry.is_some());
    let second = setup.run(&mut attempts);
    assert_eq!(second.dead_lettered, 1);
    let units = setup.store.committed();
    let dead = &units.last().unwrap().dead_letters[0];
    assert_eq!((dead.attempts, dead.error.as_str()), (2, "m1 failed"));
    assert!(units.iter().all(|u| u.processed.is_empty()));
}

/// The SDK reports every host error as retryable; one that no retry can mend (here a field name the
/// store refuses) fails its message for good at once instead of after every retry.
#[test]
fn a_read_that_can_never_succeed_dead_letters_its_message_at_once() {
    let options = HandlerOptions {
        max_retries: Some(3),
        ..HandlerOptions::default()
    };
    let setup = Setup::events(|s| s.options(options).script("m2", &[Act::BadRead]), FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2", "m3"]));
    let report = setup.run(&mut Attempts::default());
    assert!(report.retry.is_none(), "nothing waits for a retry");
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(effects(&unit), ["m1", "m3"]);
    let [dead] = unit.dead_letters.clone().try_into().unwrap();
    assert_eq!(dead.attempts, 1, "dead-lettered on its first attempt");
    assert!(
        dead.error.contains("is not a plain identifier"),
        "{}",
        dead.error
    );
}

#[test]
fn a_plugin_that_returns_early_fails_the_message_it_did_not_report() {
    let setup = Setup::events(|s| s.script("m2", &[Act::Stop]), FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2"]));
    let messages = setup.read();
    let mut attempts = Attempts::default();
    let report = setup.run(&mut attempts);
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(effects(&unit), ["m1"]);
    assert!(report.retry.is_some());
    assert_eq!(attempts.failed(&messages[1].identity()), 1);
}

#[test]
fn a_call_that_does_not_return_retries_each_of_its_messages_alone_and_recorded() {
    let setup = Setup::events(|s| s.script("m2", &[Act::Crash, Act::Crash]), FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2", "m3"]));
    let messages = setup.read();
    let identity = |i: usize| messages[i].identity();
    let mut attempts = Attempts::default();
    let report = setup.run(&mut attempts);
    // Which message killed the call is unknown: nothing is settled, each counts a failed attempt.
    let [unit] = setup.store.take().try_into().unwrap();
    assert!(unit.processed.is_empty() && unit.messages.is_empty() && unit.position.is_none());
    assert!(report.retry.is_some() && !report.complete);
    assert!((0..3).all(|i| attempts.failed(&identity(i)) == 1));

    let report = setup.run(&mut attempts);
    assert_eq!(&calls(&setup)[1..], [call(&["m1"]), call(&["m2"])]);
    let [first, died] = setup.store.take().try_into().unwrap();
    assert!(died.processed.is_empty() && died.messages.is_empty() && died.position.is_none());
    assert_eq!(
        (effects(&first), position(&first)),
        (vec!["m1".to_owned()], Some(messages[0].global_position))
    );
    assert_eq!(first.ended_calls, [("h".to_owned(), identity(0))]);
    assert!(report.retry.is_some(), "m2 died again, alone");
    // Each call of a message that failed before is recorded first: m2's is left, for whoever comes next.
    let recorded = setup.store.recorded_calls("h", None).unwrap();
    assert_eq!(recorded, [(identity(1), 2)].into_iter().collect());
    assert_eq!(attempts.failed(&identity(1)), 2);
}

#[test]
fn a_message_whose_calls_never_came_back_is_dead_lettered_without_a_call() {
    let setup = Setup::events(|s| s, FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2"]));
    let messages = setup.read();
    let identity = messages[1].identity();
    // Four recorded calls and none settled: max_retries (3) + 1 deaths.
    let record = CallRecord {
        subscription: "h".into(),
        identity: identity.clone(),
        attempts: 4,
    };
    setup.store.record_calls(&[record]).unwrap();
    let mut attempts = Attempts::default();
    attempts.recover(setup.store.recorded_calls("h", None).unwrap());
    let report = setup.run(&mut attempts);
    assert_eq!(calls(&setup), [call(&["m1"])], "m2 is not called again");
    let units = setup.store.committed();
    let dead: Vec<_> = units.iter().flat_map(|u| u.dead_letters.clone()).collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].global_position, dead[0].attempts),
        (messages[1].global_position, 4)
    );
    assert!(
        dead[0]
            .error
            .contains("died or was stopped during each of its last 4 calls"),
        "{}",
        dead[0].error
    );
    assert!(units
        .iter()
        .any(|u| u.ended_calls == [("h".to_owned(), identity.clone())]));
    assert!(setup.store.recorded_calls("h", None).unwrap().is_empty());
    assert!(report.complete);
}

#[test]
fn suspects_are_called_alone_and_every_call_is_recorded_when_asked() {
    let setup = Setup::events(|s| s.script("m3", &[Act::Retry]), FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2", "m3", "m4"]));
    let messages = setup.read();
    let mut attempts = Attempts::default();
    attempts.suspect([messages[1].identity().as_str()]);
    run(&setup.context(Record::Every), &messages, &mut attempts).unwrap();
    assert_eq!(
        calls(&setup),
        [call(&["m1"]), call(&["m2"]), call(&["m3", "m4"])]
    );
    // Every call was recorded before it ran; a commit cleared those of the messages it settled.
    let recorded = setup.store.recorded_calls("h", None).unwrap();
    assert_eq!(
        recorded,
        [(messages[2].identity(), 1), (messages[3].identity(), 1)]
            .into_iter()
            .collect()
    );
    let positions: Vec<Option<u64>> = setup.store.committed().iter().map(position).collect();
    assert_eq!(
        positions,
        [
            Some(messages[0].global_position),
            Some(messages[1].global_position),
            None
        ],
        "m3 failed first in its unit: nothing more is settled"
    );
}

/// An ordered handler keyed by the data's `key`, parking or not.
fn ordered(park: bool) -> HandlerOptions {
    HandlerOptions {
        ordered_by: Some("key".into()),
        after_dead_letter: Some(if park {
            AfterDeadLetter::Park
        } else {
            AfterDeadLetter::MoveOn
        }),
        ..HandlerOptions::default()
    }
}

fn keyed(messages: &[(&str, &str)]) -> Vec<Value> {
    messages
        .iter()
        .map(|(id, key)| json!({ "id": id, "key": key }))
        .collect()
}

#[test]
fn an_ordered_failure_holds_its_key_only_and_the_position_stops_before_it() {
    // Long retries: the failed key stays held through the second batch.
    let slow = "[server]\nretry_delay_ms = 60000\nmax_retry_delay_ms = 60000\n";
    let setup = Setup::events(
        |s| s.options(ordered(false)).script("a1", &[Act::Retry]),
        slow,
    );
    setup.append(
        HAPPENED,
        &keyed(&[
            ("b1", "b"),
            ("a1", "a"),
            ("b2", "b"),
            ("a2", "a"),
            ("c1", "c"),
        ]),
    );
    let messages = setup.read();
    let mut attempts = Attempts::default();
    let report = setup.run(&mut attempts);
    let [unit] = setup.store.take().try_into().unwrap();
    assert_eq!(
        effects(&unit),
        ["b1", "b2", "c1"],
        "a1's write dropped, a2 held"
    );
    let settled = [
        messages[0].identity(),
        messages[2].identity(),
        messages[4].identity(),
    ];
    assert_eq!(markers(&unit), settled);
    // The position never passes the unsettled a1, whatever was settled after it.
    assert_eq!(position(&unit), Some(messages[0].global_position));
    assert_eq!(
        report
            .waiting
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    assert!(!report.complete);
    assert_eq!(report.settled, settled);

    // Still waiting: a's messages are neither called nor settled; the others were settled before.
    let called = calls(&setup);
    assert_eq!(
        called,
        [
            call(&["b1", "a1", "b2", "a2", "c1"]),
            call(&["b2"]),
            call(&["c1"])
        ]
    );
    let report = setup.run(&mut attempts);
    assert_eq!(calls(&setup), called, "nothing called");
    for unit in setup.store.take() {
        assert!(
            unit.processed.is_empty() && unit.position.is_none(),
            "{unit:?}"
        );
    }
    assert_eq!((report.skipped, report.complete), (2, false), "b2 and c1");
}

#[test]
fn an_ordered_dead_letter_parks_its_key_when_the_ordering_parks() {
    for park in [true, false] {
        let setup = Setup::events(
            |s| s.options(ordered(park)).script("a1", &[Act::Reject]),
            FAST,
        );
        setup.append(HAPPENED, &keyed(&[("a1", "a"), ("b1", "b"), ("a2", "a")]));
        let messages = setup.read();
        let report = setup.run(&mut Attempts::default());
        let [unit] = setup.store.committed().try_into().unwrap();
        assert_eq!(unit.dead_letters.len(), 1, "park: {park}");
        if park {
            assert_eq!(report.parked, ["a"]);
            assert_eq!(effects(&unit), ["b1"], "a2 waits behind a1's dead letter");
            assert_eq!(position(&unit), Some(messages[1].global_position));
            assert!(!report.complete);
        } else {
            assert!(report.parked.is_empty());
            assert_eq!(effects(&unit), ["b1", "a2"]);
            assert_eq!(position(&unit), Some(messages[2].global_position));
            assert!(report.complete);
        }
    }
}

#[test]
fn a_conflicting_commit_re_runs_the_batch_on_what_is_stored_now() {
    let store: Arc<Recording> = Arc::default();
    let writer = store.clone();
    let raced = Arc::new(AtomicU32::new(0));
    let races = raced.clone();
    // Another writer appends to m1's effect stream during its first call only.
    let hook = move |id: &str| {
        if id == "m1" && races.fetch_add(1, Atomic::SeqCst) == 0 {
            let data = json!({ "id": "elsewhere" });
            let theirs =
                NewMessage::new(MessageKind::Event, "done-m1", DONE, &data, None, None, None);
            append(&writer.inner, vec![theirs]);
        }
    };
    let scripted = Scripted::new("h", Kind::EventHandler, &["thing"], &[HAPPENED]).hook(hook);
    let setup = Setup::new(store, scripted, FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2"]));
    let mut attempts = Attempts::default();
    let report = setup.run(&mut attempts);
    assert_eq!(calls(&setup), [call(&["m1", "m2"]), call(&["m1", "m2"])]);
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(effects(&unit), ["m1", "m2"]);
    assert_eq!(
        unit.messages[0].expected_version,
        Some(0),
        "read after the other writer"
    );
    assert!(report.complete && report.retry.is_none());
    assert!(attempts.failed.is_empty(), "a conflict is not a failure");
}

#[test]
fn a_commit_that_keeps_conflicting_fails_the_first_message_with_backoff() {
    let store: Arc<Recording> = Arc::default();
    let writer = store.clone();
    let hook = move |id: &str| {
        let data = json!({ "id": "elsewhere" });
        let theirs = NewMessage::new(
            MessageKind::Event,
            &format!("done-{id}"),
            DONE,
            &data,
            None,
            None,
            None,
        );
        append(&writer.inner, vec![theirs]);
    };
    let scripted = Scripted::new("h", Kind::EventHandler, &["thing"], &[HAPPENED]).hook(hook);
    let setup = Setup::new(store, scripted, FAST);
    setup.append(HAPPENED, &ids(&["m1"]));
    let messages = setup.read();
    let mut attempts = Attempts::default();
    let report = setup.run(&mut attempts);
    // The first run and `version_retries` (2) re-runs.
    assert_eq!(calls(&setup).len(), 3);
    assert!(setup.store.committed().is_empty());
    assert!(report.retry.is_some() && report.position.is_none());
    assert_eq!(attempts.failed(&messages[0].identity()), 1);
}

#[test]
fn on_the_event_store_a_key_parked_by_the_batch_holds_its_later_messages_in_the_store() {
    let setup = Setup::events(
        |s| s.options(ordered(true)).script("a1", &[Act::Reject]),
        FAST,
    );
    setup.append(HAPPENED, &keyed(&[("a1", "a"), ("b1", "b"), ("a2", "a")]));
    let messages = setup.read();
    let none = std::collections::HashMap::new();
    let ctx = Context {
        parking: Some(Parking::Read(&none)),
        ..setup.context(Record::Suspects)
    };
    let report = run(&ctx, &messages, &mut Attempts::default()).unwrap();
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(effects(&unit), ["b1"]);
    assert_eq!(unit.parking.subscription, "h");
    assert_eq!(
        unit.parking.park,
        [("a".to_owned(), messages[0].global_position)]
    );
    assert_eq!(
        unit.parking.hold,
        [("a".to_owned(), messages[2].global_position)]
    );
    // Held counts as settled: the position passes it, in the commit that holds it.
    assert_eq!(position(&unit), Some(messages[2].global_position));
    assert_eq!(
        (report.parked.as_slice(), report.held, report.complete),
        (["a".to_owned()].as_slice(), 1, true)
    );
    let held = setup.store.held_messages("h", "a", 10).unwrap();
    assert_eq!(
        held.iter().map(|m| m.global_position).collect::<Vec<_>>(),
        [messages[2].global_position]
    );
}

#[test]
fn on_the_event_store_a_parked_keys_messages_after_its_dead_letter_are_held_and_not_called() {
    let setup = Setup::events(|s| s.options(ordered(true)), FAST);
    setup.append(HAPPENED, &keyed(&[("a1", "a"), ("b1", "b"), ("a2", "a")]));
    let messages = setup.read();
    // `a` parked behind a1's dead letter by an earlier batch.
    let parked_at = messages[0].global_position;
    let mut earlier = UnitOfWork::default();
    earlier.parking.subscription = "h".into();
    earlier.parking.park.push(("a".into(), parked_at));
    setup.store.commit(&earlier).unwrap();
    setup.store.take();
    let parked = [("a".to_owned(), parked_at)].into_iter().collect();
    let ctx = Context {
        parking: Some(Parking::Read(&parked)),
        ..setup.context(Record::Suspects)
    };
    let report = run(&ctx, &messages, &mut Attempts::default()).unwrap();
    assert_eq!(
        calls(&setup),
        [call(&["b1"])],
        "a1 was settled before, a2 waits"
    );
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(
        unit.parking.hold,
        [("a".to_owned(), messages[2].global_position)]
    );
    assert!(unit.parking.park.is_empty());
    assert_eq!(position(&unit), Some(messages[2].global_position));
    assert_eq!((report.held, report.skipped, report.complete), (1, 1, true));
}

#[test]
fn a_worker_settles_the_other_workers_keys_without_calling_or_counting_them() {
    let setup = Setup::events(|s| s.options(ordered(false)), FAST);
    // Two keys that fall in different partitions of two.
    let (mine, theirs) = ("k0", "k1");
    assert_ne!(
        crate::ordering::partition_of(mine, 2),
        crate::ordering::partition_of(theirs, 2)
    );
    let index = crate::ordering::partition_of(mine, 2);
    setup.append(
        HAPPENED,
        &keyed(&[("m1", mine), ("t1", theirs), ("m2", mine)]),
    );
    let messages = setup.read();
    let ctx = Context {
        worker: Some(Worker { index, of: 2 }),
        ..setup.context(Record::Suspects)
    };
    let report = run(&ctx, &messages, &mut Attempts::default()).unwrap();
    assert_eq!(calls(&setup), [call(&["m1"]), call(&["m2"])]);
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(
        markers(&unit),
        [messages[0].identity(), messages[2].identity()]
    );
    assert_eq!(position(&unit), Some(messages[2].global_position));
    assert_eq!((report.skipped, report.complete), (0, true));
}

/// The subscription of `setup` read from broker streams instead (a consumer group).
fn on_a_stream(setup: &Setup) -> Subscription {
    let sub = &setup.sub;
    Subscription {
        plan: sub.plan.clone(),
        settings: sub.settings,
        retry: sub.retry,
        commands: sub.commands,
        kind: SubscriptionType::Stream,
        ordering: sub.ordering.clone(),
    }
}

#[test]
fn a_stream_batch_skips_redeliveries_and_duplicates_and_hands_its_dead_letters_to_the_broker() {
    let setup = Setup::events(|s| s.script("m3", &[Act::Reject]), FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2", "m3"]));
    let stored = setup.read();
    // m1 was handled before (committed, not acknowledged); m2 is delivered twice.
    let mut earlier = UnitOfWork::default();
    earlier
        .processed
        .push(crate::unit_of_work::ProcessedMarker {
            subscription: "h".into(),
            message_id: stored[0].identity(),
            global_position: stored[0].global_position,
            build_id: "older".into(),
        });
    setup.store.commit(&earlier).unwrap();
    setup.store.take();
    let delivered = [&stored[0], &stored[1], &stored[1], &stored[2]].map(Clone::clone);
    let stream = on_a_stream(&setup);
    let ctx = Context {
        subscription: &stream,
        position: None,
        origin: Origin::Broker,
        ..setup.context(Record::Suspects)
    };
    let report = run(&ctx, &delivered, &mut Attempts::default()).unwrap();
    assert_eq!(calls(&setup), [call(&["m2"]), call(&["m3"])]);
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(effects(&unit), ["m2"]);
    assert_eq!(markers(&unit), [stored[1].identity()]);
    assert!(unit.position.is_none(), "the group keeps where it is");
    assert!(
        unit.dead_letters.is_empty(),
        "the broker's dead-letter stream keeps them"
    );
    let [dead] = report.dead_letters.clone().try_into().unwrap();
    assert_eq!(
        (
            dead.error.as_str(),
            dead.data.as_str(),
            dead.metadata.as_str()
        ),
        ("m3 rejected", "", "")
    );
    assert_eq!(report.dead_lettered_ids, [stored[2].identity()]);
    assert_eq!(report.skipped, 2, "the redelivery and the duplicate");
    assert_eq!(report.settled.len(), 4, "all acknowledged");
}

/// A message delivered twice whose calls never came back (both entries suspects, each its own unit):
/// the first entry is dead-lettered without a call, and the second is settled with it, neither called
/// nor dead-lettered again. A dead letter leaves no marker and ends the message's call count, so a
/// second entry left to be called afresh would start its crash loop over, for ever if it killed the
/// process before the broker took the first's dead letter.
#[test]
fn a_message_delivered_twice_is_dead_lettered_once_and_its_second_entry_settled_with_it() {
    let setup = Setup::events(|s| s, FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2", "m3"]));
    let stored = setup.read();
    let culprit = stored[1].identity();
    let delivered = [&stored[0], &stored[1], &stored[2], &stored[1]].map(Clone::clone);
    let record = CallRecord {
        subscription: "h".into(),
        identity: culprit.clone(),
        attempts: 4,
    };
    setup.store.record_calls(&[record]).unwrap();
    let mut attempts = Attempts::default();
    attempts.recover(setup.store.recorded_calls("h", None).unwrap());
    let stream = on_a_stream(&setup);
    let ctx = Context {
        subscription: &stream,
        position: None,
        origin: Origin::Broker,
        ..setup.context(Record::Every)
    };
    let report = run(&ctx, &delivered, &mut attempts).unwrap();
    assert_eq!(
        calls(&setup),
        [call(&["m1"]), call(&["m3"])],
        "m2 is never called"
    );
    assert_eq!(report.dead_lettered_ids, std::slice::from_ref(&culprit));
    assert_eq!(report.dead_letters.len(), 1);
    assert_eq!(report.skipped, 1, "the second entry");
    assert_eq!(report.settled.len(), 4, "all acknowledged");
    assert!(report.complete);
    // Kept until the broker has the dead letter (`subscription::calls`): read again before, the message
    // is dead-lettered again without a call.
    let recorded = setup.store.recorded_calls("h", None).unwrap();
    assert_eq!(recorded, [(culprit, 4)].into_iter().collect());
}

/// A broker's batch looks up its messages' processed markers, and that time is the `markers` phase's;
/// a single reader of the event store looks up none.
#[test]
fn the_marker_lookup_of_a_stream_batch_is_timed_as_its_own_phase() {
    use std::time::Duration;

    use super::super::timings::{measure, Phase};
    let setup = Setup::events(|s| s, FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2"]));
    let stored = setup.read();
    let stream = on_a_stream(&setup);
    let ctx = Context {
        subscription: &stream,
        position: None,
        origin: Origin::Broker,
        ..setup.context(Record::Suspects)
    };
    let (report, spent) = measure(Phase::Engine, || {
        run(&ctx, &stored, &mut Attempts::default())
    });
    assert_eq!(report.unwrap().settled.len(), 2);
    assert!(spent.get(Phase::Markers) > Duration::ZERO, "{spent:?}");
    let reader = Setup::events(|s| s, FAST);
    reader.append(HAPPENED, &ids(&["m1", "m2"]));
    let (report, spent) = measure(Phase::Engine, || reader.run(&mut Attempts::default()));
    assert_eq!(report.handled.len(), 2);
    assert_eq!(spent.get(Phase::Markers), Duration::ZERO, "{spent:?}");
}

/// `delivered` as a broker's first delivery to the stream subscription of `setup`: built without a
/// marker lookup.
fn first_delivery(setup: &Setup, delivered: &[StoredMessage]) -> Report {
    let stream = on_a_stream(setup);
    let ctx = Context {
        subscription: &stream,
        position: None,
        origin: Origin::Broker,
        first_delivery: true,
        ..setup.context(Record::Suspects)
    };
    run(&ctx, delivered, &mut Attempts::default()).unwrap()
}

/// Mark `message` processed by `h`, as an earlier delivery's commit did.
fn processed_before(setup: &Setup, message: &StoredMessage) {
    let mut earlier = UnitOfWork::default();
    earlier
        .processed
        .push(crate::unit_of_work::ProcessedMarker {
            subscription: "h".into(),
            message_id: message.identity(),
            global_position: message.global_position,
            build_id: "older".into(),
        });
    setup.store.commit(&earlier).unwrap();
    setup.store.take();
}

/// A first delivery that holds a message processed before (published twice) and one message twice:
/// built without a lookup, its commit is refused, and the batch built again, checked, commits each
/// other message once. The handler was called for the processed message in the refused build.
#[test]
fn a_first_delivery_holding_a_processed_message_and_a_duplicate_commits_each_message_once() {
    let setup = Setup::events(|s| s, FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2", "m3"]));
    let stored = setup.read();
    processed_before(&setup, &stored[0]);
    let delivered = [&stored[0], &stored[1], &stored[1], &stored[2]].map(Clone::clone);
    let report = first_delivery(&setup, &delivered);
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(effects(&unit), ["m2", "m3"]);
    assert_eq!(markers(&unit), [stored[1].identity(), stored[2].identity()]);
    assert_eq!(
        calls(&setup),
        [
            call(&["m1", "m2", "m2", "m3"]),
            call(&["m2"]),
            call(&["m3"])
        ]
    );
    assert_eq!(report.skipped, 2, "the processed one and the duplicate");
    assert_eq!(report.settled.len(), 4, "all acknowledged");
}

/// A first delivery whose build would dead-letter a message processed before (its handler rejects
/// it now) is built again, checked, before anything is committed: the message is skipped, not
/// dead-lettered, and a genuine rejection beside it still is (called in both builds).
#[test]
fn a_first_delivery_never_dead_letters_a_message_processed_before() {
    let setup = Setup::events(
        |s| {
            s.script("m1", &[Act::Reject])
                .script("m3", &[Act::Reject, Act::Reject])
        },
        FAST,
    );
    setup.append(HAPPENED, &ids(&["m1", "m2", "m3"]));
    let stored = setup.read();
    processed_before(&setup, &stored[0]);
    let report = first_delivery(&setup, &stored);
    let [unit] = setup.store.committed().try_into().unwrap();
    assert_eq!(effects(&unit), ["m2"]);
    assert_eq!(markers(&unit), [stored[1].identity()]);
    assert_eq!(report.dead_lettered_ids, [stored[2].identity()], "m3 only");
    assert_eq!(report.skipped, 1, "m1, processed before");
}

/// A first delivery that fails retryably, holding no message processed before, keeps its build: the
/// handler is called once, and the attempt counted once.
#[test]
fn a_first_delivery_that_fails_counts_one_attempt() {
    let setup = Setup::events(|s| s.script("m2", &[Act::Retry]), FAST);
    setup.append(HAPPENED, &ids(&["m1", "m2"]));
    let stored = setup.read();
    let stream = on_a_stream(&setup);
    let ctx = Context {
        subscription: &stream,
        position: None,
        origin: Origin::Broker,
        first_delivery: true,
        ..setup.context(Record::Suspects)
    };
    let mut attempts = Attempts::default();
    let report = run(&ctx, &stored, &mut attempts).unwrap();
    assert!(report.retry.is_some(), "{report:?}");
    assert_eq!(attempts.failed(&stored[1].identity()), 1);
    assert_eq!(calls(&setup), [call(&["m1", "m2"])]);
}
