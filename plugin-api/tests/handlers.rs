//! Handler forms: a handler takes the message first, then what it needs (the context, the metadata,
//! in either order), and returns a result or nothing; each form is called as the plain one is.

use protean_plugin_api::{prelude::*, testing::TestHost};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Aggregate)]
struct Order;

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
struct Placed {
    id: String,
}

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
struct Seen {
    id: String,
    by: String,
    stream: String,
}

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
struct Closed {
    id: String,
}

#[derive(Serialize, Deserialize, Command)]
#[command(aggregate = Order, target = id)]
struct Place {
    id: String,
}

/// Raises `Seen { by }` with the stream `meta` names (or `-` without metadata).
fn seen(ctx: &mut Context, id: &str, by: &str, meta: Option<&Metadata>) -> HandlerResult {
    let stream = meta.map_or("-".into(), |m| m.stream.clone());
    ctx.raise(
        id,
        &Seen {
            id: id.into(),
            by: by.into(),
            stream,
        },
    )
}

fn plain(event: Placed, ctx: &mut Context) -> HandlerResult {
    seen(ctx, &event.id, "plain", None)
}

fn with_metadata(event: Placed, ctx: &mut Context, meta: Metadata) -> HandlerResult {
    assert_eq!(meta.message_type, "Shop.Placed.v1");
    seen(ctx, &event.id, "context-metadata", Some(&meta))
}

fn metadata_first(event: Placed, meta: Metadata, ctx: &mut Context) -> HandlerResult {
    seen(ctx, &event.id, "metadata-context", Some(&meta))
}

fn only_metadata(_: Placed, meta: Metadata) -> HandlerResult {
    if meta.stream == "shop::order-bad" {
        return Err(HandlerError::reject("bad stream"));
    }
    Ok(())
}

fn nothing(event: Placed) {
    assert!(!event.id.is_empty());
}

fn any_error(_: Place, _: &mut Context) -> Result<(), std::fmt::Error> {
    Err(std::fmt::Error)
}

#[derive(Default, Serialize, Deserialize)]
struct Steps {
    taken: Vec<String>,
}

fn started(state: &mut Steps, _: Placed) {
    state.taken.push("start".into());
}

fn noted(state: &mut Steps, _: Seen, meta: Metadata) -> HandlerResult {
    state.taken.push(meta.message_type);
    Ok(())
}

fn ended(state: &mut Steps, event: Closed, meta: Metadata, ctx: &mut Context) -> HandlerResult {
    state.taken.push(format!("end at {}", meta.position));
    let by = state.taken.join(", ");
    ctx.raise(
        &event.id,
        &Seen {
            id: event.id.clone(),
            by,
            stream: meta.stream,
        },
    )
}

fn domain() -> Domain {
    Domain::new("Shop")
        .event_handler(EventHandler::new("plain").on(plain))
        .event_handler(EventHandler::new("context-metadata").on(with_metadata))
        .event_handler(EventHandler::new("metadata-context").on(metadata_first))
        .event_handler(EventHandler::new("metadata").on(only_metadata))
        .projector(Projector::new("nothing").on(nothing))
        .command_handler(CommandHandler::<Order>::new("orders").on(any_error))
        .process_manager(
            ProcessManager::<Steps>::new("steps", "id")
                .start(started)
                .on(noted)
                .end(ended),
        )
}

#[test]
fn every_form_is_called_with_what_it_asks_for() {
    let host = TestHost::new(domain());
    for handler in ["plain", "context-metadata", "metadata-context"] {
        host.handle_event(handler, "o1", &Placed { id: "o1".into() })
            .unwrap();
    }
    let seen: Vec<(String, String)> = host
        .events::<Order>("o1")
        .iter()
        .map(|e| (e.data["by"].to_string(), e.data["stream"].to_string()))
        .collect();
    assert_eq!(
        seen,
        [
            (r#""plain""#.into(), r#""-""#.into()),
            (r#""context-metadata""#.into(), r#""shop::order-o1""#.into()),
            (r#""metadata-context""#.into(), r#""shop::order-o1""#.into()),
        ]
    );
}

#[test]
fn a_form_without_context_still_fails_and_succeeds_as_it_says() {
    let host = TestHost::new(domain());
    host.handle_event("metadata", "ok", &Placed { id: "ok".into() })
        .unwrap();
    let error = host
        .handle_event("metadata", "bad", &Placed { id: "bad".into() })
        .unwrap_err();
    assert!(!error.is_retryable());
    host.handle_event("nothing", "o1", &Placed { id: "o1".into() })
        .unwrap();
    let panicked = host
        .handle_event("nothing", "o2", &Placed { id: String::new() })
        .unwrap_err();
    assert!(
        panicked.message().contains("handler panicked"),
        "{panicked}"
    );
}

#[test]
fn any_error_a_handler_returns_is_retryable() {
    let host = TestHost::new(domain());
    let error = host
        .handle_command("orders", &Place { id: "o1".into() })
        .unwrap_err();
    assert!(error.is_retryable());
    assert_eq!(
        error.message(),
        "an error occurred when formatting an argument"
    );
}

#[test]
fn process_manager_steps_take_what_they_need_too() {
    let host = TestHost::new(domain());
    host.handle_event("steps", "p1", &Placed { id: "p1".into() })
        .unwrap();
    let seen = Seen {
        id: "p1".into(),
        by: "someone".into(),
        stream: "-".into(),
    };
    host.handle_event("steps", "p1", &seen).unwrap();
    host.handle_event("steps", "p1", &Closed { id: "p1".into() })
        .unwrap();
    let raised = host.events::<Order>("p1");
    assert_eq!(raised.len(), 1);
    assert_eq!(raised[0].data["by"], "start, Shop.Seen.v1, end at 0");
    assert_eq!(raised[0].data["stream"], "shop::order-p1");
}
