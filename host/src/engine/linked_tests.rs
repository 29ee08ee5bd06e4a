//! The whole engine, in test mode, on the memory store, running the reference domain linked into this
//! binary ([`Plugin::linked`]): the flow `tests/e2e/engine.rs` checks through a built library, with
//! no library built.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Engine, EngineOptions, Outcome};
use crate::{
    config::Config,
    plugin::{Plugin, LINKED_BUILD},
    store::{recording::Recording, MemoryStore, Store},
};

/// Fast retries and a generous time limit, so that a test waits only as long as the work.
const TEST_CONFIG: &str =
    "[server]\nretry_delay_ms = 5\nmax_retry_delay_ms = 20\ntest_mode_timeout_seconds = 60\n";

/// An engine in test mode over `store`, running the sample domain's `domain` instance in process.
fn engine(store: Arc<dyn Store>) -> Engine {
    linked(store, "domain", sample_domain::fulfilment::domain)
}

/// An engine in test mode over `store`, running `domain` linked in as instance `name`.
fn linked(store: Arc<dyn Store>, name: &'static str, domain: fn() -> Domain) -> Engine {
    linked_with(store, name, domain, TEST_CONFIG)
}

/// [`linked`], configured by the TOML text `config`.
fn linked_with(
    store: Arc<dyn Store>,
    name: &'static str,
    domain: fn() -> Domain,
    config: &str,
) -> Engine {
    let domain = Plugin::linked(name, domain).unwrap();
    let config = Config::parse(config, Path::new("test.toml"), &BTreeMap::new()).unwrap();
    let options = EngineOptions {
        test_mode: true,
        config,
        ..EngineOptions::default()
    };
    Engine::with_handlers(Arc::new(domain), store, options).unwrap()
}

/// The aggregate of [`Boom`] commands.
#[derive(Debug, Default)]
struct Bomb;

impl Aggregate for Bomb {
    const CATEGORY: &'static str = "bomb";
    fn apply(&mut self, _: &Recorded) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Panics in its handler when `panic` says so; else raises [`Defused`].
#[derive(Debug, Serialize, Deserialize)]
struct Boom {
    id: String,
    panic: bool,
}

impl Message for Boom {
    const NAME: &'static str = "Boom";
}

impl Command for Boom {
    type Aggregate = Bomb;
    fn target_id(&self) -> String {
        self.id.clone()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Defused {
    id: String,
}

impl Message for Defused {
    const NAME: &'static str = "Defused";
}

impl Event for Defused {
    type Aggregate = Bomb;
}

fn boom(command: Boom, ctx: &mut Context) -> HandlerResult {
    assert!(!command.panic, "{} was told to panic", command.id);
    ctx.raise(&command.id.clone(), &Defused { id: command.id })
}

fn bombs() -> Domain {
    Domain::new("Bombs").command_handler(
        CommandHandler::<Bomb>::new("defuser")
            .on(boom)
            .max_retries(1),
    )
}

fn place(order: &str) -> Value {
    json!({ "order_id": order, "customer": "ada", "sku": "book", "quantity": 2, "total": 30.0 })
}

/// Send `count` orders, o0 onwards.
fn place_orders(engine: &Engine, count: usize) {
    for n in 0..count {
        engine
            .send("Fulfilment.PlaceOrder.v1", &place(&format!("o{n}")), None)
            .unwrap();
    }
}

fn types(store: &dyn Store, stream: &str) -> Vec<String> {
    let messages = store.read_stream(stream, 0).unwrap();
    messages.into_iter().map(|m| m.message_type).collect()
}

#[test]
fn the_linked_sample_domain_runs_every_order_to_shipped_on_the_memory_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let engine = engine(store.clone());
    assert_eq!(engine.build_id(), LINKED_BUILD);
    place_orders(&engine, 3);
    let report = engine.run().unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    for n in 0..3 {
        let order = format!("o{n}");
        let summary = store.document("order_summaries", &order).unwrap();
        let summary: Value = serde_json::from_str(&summary.expect("a summary")).unwrap();
        assert_eq!(summary["status"], "shipped", "{order}");
        assert_eq!(
            types(store.as_ref(), &format!("fulfilment::order-{order}")),
            ["Fulfilment.OrderPlaced.v1", "Fulfilment.OrderShipped.v1"],
            "{order}"
        );
        assert_eq!(
            types(store.as_ref(), &format!("fulfilment::reservation-{order}")),
            ["Fulfilment.StockReserved.v1"],
            "{order}"
        );
    }
    assert_eq!(report.totals.written["Fulfilment.OrderShipped.v1"], 3);
    assert_eq!(report.totals.dead_lettered, 0);
    assert!(store.dead_letters(None).unwrap().is_empty());
}

#[test]
fn a_command_the_linked_domain_does_not_know_is_refused_before_anything_is_stored() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let engine = engine(store.clone());
    let refused = engine.send("Fulfilment.Unknown.v1", &json!({}), None);
    assert!(
        matches!(refused, Err(super::EngineError::BadCommand { .. })),
        "{refused:?}"
    );
    assert_eq!(store.head(&[]).unwrap(), 0);
}

#[test]
fn a_handler_that_panics_costs_its_message_only_and_is_dead_lettered_after_its_retries() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let engine = linked(store.clone(), "bombs", bombs);
    for (id, panic) in [("b1", true), ("b2", false)] {
        engine
            .send("Bombs.Boom.v1", &json!({ "id": id, "panic": panic }), None)
            .unwrap();
    }
    let report = engine.run().unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    let [dead] = store.dead_letters(None).unwrap().try_into().unwrap();
    assert_eq!((dead.handler.as_str(), dead.attempts), ("defuser", 2));
    assert!(
        dead.error.contains("handler panicked") && dead.error.contains("b1 was told to panic"),
        "{}",
        dead.error
    );
    assert!(types(store.as_ref(), "bombs::bomb-b1").is_empty());
    assert_eq!(
        types(store.as_ref(), "bombs::bomb-b2"),
        ["Bombs.Defused.v1"]
    );
    assert_eq!(report.totals.dead_lettered, 1);
}

/// Under load an event-store subscription's next batch is read while its batch commits: a commit
/// does not wait for the read, nor the read for the commit. The store holds each batch's commit until
/// the read after it begins; a read that waited for the commit would leave the commit waiting in vain.
#[test]
fn the_next_batch_is_read_while_the_last_one_commits() {
    let recording = Arc::new(Recording::commits_wait_for_the_next_read());
    let store: Arc<dyn Store> = recording.clone();
    let config = format!("{TEST_CONFIG}messages_per_tick = 2\n");
    let engine = linked_with(store.clone(), "bombs", bombs, &config);
    for n in 0..6 {
        engine
            .send(
                "Bombs.Boom.v1",
                &json!({ "id": format!("b{n}"), "panic": false }),
                None,
            )
            .unwrap();
    }
    let report = engine.run().unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    let batches = recording
        .committed()
        .iter()
        .filter(|unit| unit.position.is_some())
        .count();
    assert!(
        batches >= 3,
        "six commands in batches of two: {batches} batches"
    );
    assert_eq!(
        recording.late_commits(),
        0,
        "commits that waited for their next read in vain"
    );
    for n in 0..6 {
        assert_eq!(
            types(store.as_ref(), &format!("bombs::bomb-b{n}")),
            ["Bombs.Defused.v1"]
        );
    }
}

/// The aggregate of [`Lit`] events, which nothing raises here.
#[derive(Debug, Default)]
struct Fuse;

impl Aggregate for Fuse {
    const CATEGORY: &'static str = "fuse";
    fn apply(&mut self, _: &Recorded) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Lit {
    id: String,
}

impl Message for Lit {
    const NAME: &'static str = "Lit";
}

impl Event for Lit {
    type Aggregate = Fuse;
}

fn watch(_: Lit, _: &mut Context) -> HandlerResult {
    Ok(())
}

/// [`bombs`], and a handler of a category nobody appends to.
fn bombs_and_a_watcher() -> Domain {
    bombs().event_handler(EventHandler::new("watcher").on(watch))
}

/// A subscription idle at the head reads again when a commit appended to its categories, not at every
/// commit: the watcher's category gets nothing while the defuser commits ten times, one command each,
/// so it reads once, at its start (the poll is ten minutes away).
#[test]
fn an_idle_subscription_reads_again_only_when_its_categories_got_messages() {
    let recording = Arc::new(Recording::default());
    let store: Arc<dyn Store> = recording.clone();
    let config = format!("{TEST_CONFIG}poll_interval_ms = 600000\nmessages_per_tick = 1\n");
    let engine = linked_with(store.clone(), "bombs", bombs_and_a_watcher, &config);
    for n in 0..10 {
        let boom = json!({ "id": format!("b{n}"), "panic": false });
        engine.send("Bombs.Boom.v1", &boom, None).unwrap();
    }
    let report = engine.run().unwrap();
    assert_eq!(report.outcome, Outcome::Quiescent);
    let appending = recording
        .committed()
        .iter()
        .filter(|unit| unit.position.is_some() && !unit.messages.is_empty())
        .count();
    assert_eq!(appending, 10, "the defuser's commits, one per command");
    let fuses = ["bombs::fuse".to_owned()];
    let reads = recording
        .reads()
        .iter()
        .filter(|(categories, _)| categories == &fuses)
        .count();
    assert_eq!(reads, 1, "reads of the watcher's category");
}

/// Two handlers share a name: the export table refuses the domain when it is created.
fn invalid() -> Domain {
    Domain::new("Bombs")
        .command_handler(CommandHandler::<Bomb>::new("twice").on(boom))
        .command_handler(CommandHandler::<Bomb>::new("twice").on(boom))
}

#[test]
fn a_linked_domain_is_checked_by_the_export_table_as_a_loaded_one_is() {
    let refused = Plugin::linked("invalid", invalid).unwrap_err();
    let crate::plugin::LoadError::Constructor {
        instance, reason, ..
    } = &refused
    else {
        panic!("{refused:?}")
    };
    assert_eq!(instance, "invalid");
    assert!(
        reason.starts_with("domain \"invalid\" is invalid: "),
        "{reason}"
    );
}

#[test]
fn replaying_a_dead_letter_calls_the_linked_handler_again_and_a_new_failure_is_a_new_dead_letter() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let engine = linked(store.clone(), "bombs", bombs);
    engine
        .send("Bombs.Boom.v1", &json!({ "id": "b1", "panic": true }), None)
        .unwrap();
    engine.run().unwrap();
    let [first] = store.dead_letters(None).unwrap().try_into().unwrap();
    let replayed = engine
        .replay_dead_letter(&first.subscription, first.global_position)
        .unwrap();
    assert_eq!(replayed, super::Replay::DeadLettered);
    let [again] = store.dead_letters(None).unwrap().try_into().unwrap();
    assert_eq!(again.global_position, first.global_position);
    assert!(
        again.error.contains("b1 was told to panic"),
        "{}",
        again.error
    );
    let missing = engine.replay_dead_letter(&first.subscription, first.global_position + 100);
    assert!(
        matches!(missing, Err(super::EngineError::NoDeadLetter { .. })),
        "{missing:?}"
    );
}
