//! A domain's own unit tests still see their failures: the SDK's panic hook keeps to handler calls
//! and hands every other panic to the hook it replaced. (A file of its own: the hook is per process.)

use std::sync::Mutex;

use protean_plugin_api::{prelude::*, testing::TestHost};
use serde::{Deserialize, Serialize};

static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[derive(Default, Aggregate)]
struct Thing;

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Thing)]
struct Happened {
    id: String,
}

fn explode(_: Happened) {
    panic!("inside the handler");
}

#[test]
fn a_panic_outside_a_handler_call_reaches_the_previous_hook_and_one_inside_does_not() {
    std::panic::set_hook(Box::new(|info| {
        SEEN.lock().unwrap().push(info.to_string());
    }));
    let host = TestHost::new(Domain::new("Demo").event_handler(EventHandler::new("h").on(explode)));
    let failed = host
        .handle_event("h", "t1", &Happened { id: "t1".into() })
        .unwrap_err();
    assert!(
        failed.message().contains("inside the handler"),
        "{}",
        failed.message()
    );
    let outside = std::panic::catch_unwind(|| panic!("a failing assertion in a test"));
    assert!(outside.is_err());
    let seen = SEEN.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].contains("a failing assertion in a test"),
        "{seen:?}"
    );
}
