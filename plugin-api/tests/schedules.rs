//! Schedules and timeouts, on the test host's virtual clock: a handler schedules, cancels or resets a
//! message, a process manager sets timeouts scoped to its instance, and `advance` fires what came due.

use std::time::{Duration, SystemTime};

use protean_plugin_api::{
    prelude::*,
    testing::{Produced, TestHost},
    MessageKind,
};
use serde::{Deserialize, Serialize};

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

#[derive(Debug, Default, Aggregate)]
struct Order;

/// Place an order; a reminder follows after `remind_after_ms` unless it is paid first.
#[derive(Serialize, Deserialize, Command)]
#[command(aggregate = Order, target = order)]
struct Place {
    order: String,
    remind_after_ms: u64,
}

#[derive(Serialize, Deserialize, Command)]
#[command(aggregate = Order, target = order)]
struct Pay {
    order: String,
}

#[derive(Serialize, Deserialize, Command)]
#[command(aggregate = Order, target = order)]
struct Remind {
    order: String,
}

/// Schedules a reminder and cancels the order `some-other`'s, then fails: both must go with the call.
#[derive(Serialize, Deserialize, Command)]
#[command(aggregate = Order, target = order)]
struct PlaceBadly {
    order: String,
}

#[derive(Serialize, Deserialize, Command)]
#[command(aggregate = Order, target = order)]
struct Escalate {
    order: String,
}

#[derive(Debug, Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
struct Placed {
    order: String,
    /// `ctx.now()` when placed, in ms since the epoch.
    at_ms: u64,
}

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
struct Paid {
    order: String,
}

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
struct Shipped {
    order: String,
}

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
struct Expired {
    order: String,
}

fn ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn reminder(order: &str) -> String {
    format!("remind-{order}")
}

fn place(command: Place, ctx: &mut Context) -> HandlerResult {
    let delay = Duration::from_millis(command.remind_after_ms);
    let remind = Remind {
        order: command.order.clone(),
    };
    ctx.schedule(&reminder(&command.order))
        .after(delay)
        .send(&remind)?;
    let at_ms = ms(ctx.now());
    ctx.raise(
        &command.order,
        &Placed {
            order: command.order.clone(),
            at_ms,
        },
    )
}

fn pay(command: Pay, ctx: &mut Context) -> HandlerResult {
    ctx.cancel(&reminder(&command.order))?;
    ctx.raise(
        &command.order,
        &Paid {
            order: command.order.clone(),
        },
    )
}

fn place_badly(command: PlaceBadly, ctx: &mut Context) -> HandlerResult {
    let remind = Remind {
        order: command.order.clone(),
    };
    ctx.schedule(&reminder(&command.order))
        .after(MINUTE)
        .send(&remind)?;
    ctx.cancel(&reminder("some-other"))?;
    Err(HandlerError::reject("placed badly"))
}

fn remind(_: Remind) {}

fn escalate(_: Escalate) {}

/// An event handler: an order expires a day after it was placed (an event raised then, not a command).
fn expire_later(event: Placed, ctx: &mut Context) -> HandlerResult {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(event.at_ms) + DAY;
    let key = format!("expire-{}", event.order);
    let expired = Expired {
        order: event.order.clone(),
    };
    ctx.schedule(&key).at(at).raise(&event.order, &expired)
}

/// Not a process manager: a timeout here is a mistake.
fn timeout_outside(event: Paid, ctx: &mut Context) -> HandlerResult {
    let command = Escalate { order: event.order };
    ctx.set_timeout("late", DAY, &command)
}

/// The delivery process: an order placed must ship within two days, or it is escalated; a payment
/// resets the clock, and an order paid twice cancels it (the second payment is a refund request).
#[derive(Default, Serialize, Deserialize)]
struct Delivery {
    payments: u32,
}

fn delivery_placed(_: &mut Delivery, event: Placed, ctx: &mut Context) -> HandlerResult {
    ctx.set_timeout("late", 2 * DAY, &Escalate { order: event.order })
}

fn delivery_paid(state: &mut Delivery, event: Paid, ctx: &mut Context) -> HandlerResult {
    state.payments += 1;
    match state.payments {
        1 => ctx.set_timeout("late", 2 * DAY, &Escalate { order: event.order }),
        _ => ctx.cancel_timeout("late"),
    }
}

fn delivery_shipped(_: &mut Delivery, _: Shipped) {}

fn shop() -> Domain {
    Domain::new("Shop")
        .command_handler(
            CommandHandler::<Order>::new("orders")
                .on(place)
                .on(pay)
                .on(place_badly)
                .on(remind)
                .on(escalate),
        )
        .event_handler(EventHandler::new("expiry").on(expire_later))
        .event_handler(EventHandler::new("misplaced").on(timeout_outside))
        .process_manager(
            ProcessManager::<Delivery>::new("delivery", "order")
                .start(delivery_placed)
                .on(delivery_paid)
                .end(delivery_shipped),
        )
}

fn placed(host: &TestHost, order: &str, remind_after: Duration) {
    let command = Place {
        order: order.into(),
        remind_after_ms: remind_after.as_millis() as u64,
    };
    host.handle_command("orders", &command).unwrap();
}

fn remind_command(order: &str) -> Produced {
    Produced {
        stream: format!("shop::order:command-{order}"),
        message_type: "Shop.Remind.v1".into(),
        data: serde_json::json!({ "order": order }),
    }
}

#[test]
fn a_scheduled_command_is_sent_when_the_clock_reaches_it() {
    let host = TestHost::new(shop());
    let start = host.now();
    placed(&host, "o1", 10 * MINUTE);
    let pending = host.scheduled();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].key, "shop::remind-o1", "keys are the domain's");
    assert_eq!(pending[0].due, start + 10 * MINUTE);
    assert_eq!(pending[0].kind, MessageKind::Command);
    assert_eq!(pending[0].message, remind_command("o1"));
    assert!(
        host.commands().is_empty(),
        "nothing is sent before it is due"
    );

    assert!(host
        .advance(10 * MINUTE - Duration::from_millis(1))
        .is_empty());
    let fired = host.advance(Duration::from_millis(1));
    assert_eq!(fired, [remind_command("o1")]);
    assert_eq!(host.commands(), fired, "sent like any other command");
    assert!(host.scheduled().is_empty(), "a schedule fires once");
    assert!(host.advance(DAY).is_empty());
    assert_eq!(host.now(), start + 10 * MINUTE + DAY);
}

#[test]
fn handlers_see_the_test_hosts_clock() {
    let host = TestHost::new(shop());
    assert_eq!(host.now(), SystemTime::UNIX_EPOCH + TestHost::START);
    host.advance(MINUTE);
    placed(&host, "o1", MINUTE);
    let events = host.events::<Order>("o1");
    assert_eq!(events[0].data["at_ms"], ms(host.now()));
    let later = TestHost::new(shop()).starting_at(SystemTime::UNIX_EPOCH + DAY);
    assert_eq!(later.now(), SystemTime::UNIX_EPOCH + DAY);
}

#[test]
fn a_cancelled_schedule_never_fires() {
    let host = TestHost::new(shop());
    placed(&host, "o1", MINUTE);
    placed(&host, "o2", MINUTE);
    host.handle_command("orders", &Pay { order: "o1".into() })
        .unwrap();
    let keys: Vec<String> = host.scheduled().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, ["shop::remind-o2"], "only o1's is cancelled");
    assert_eq!(host.advance(DAY), [remind_command("o2")]);
}

#[test]
fn scheduling_a_key_again_moves_its_due_time() {
    let host = TestHost::new(shop());
    let start = host.now();
    placed(&host, "o1", 10 * MINUTE);
    host.advance(5 * MINUTE);
    placed(&host, "o1", 10 * MINUTE);
    let pending = host.scheduled();
    assert_eq!(pending.len(), 1, "the key names one schedule");
    assert_eq!(pending[0].due, start + 15 * MINUTE);
    assert!(
        host.advance(5 * MINUTE).is_empty(),
        "the first due time is gone"
    );
    assert_eq!(host.advance(5 * MINUTE), [remind_command("o1")]);
}

#[test]
fn schedules_due_together_fire_in_due_order_then_in_the_order_they_were_set() {
    let host = TestHost::new(shop());
    placed(&host, "late", 3 * MINUTE);
    placed(&host, "first", MINUTE);
    placed(&host, "second", MINUTE);
    let fired = host.advance(DAY);
    let orders: Vec<&str> = fired
        .iter()
        .map(|p| p.data["order"].as_str().unwrap())
        .collect();
    assert_eq!(orders, ["first", "second", "late"]);
}

#[test]
fn a_scheduled_event_is_appended_to_its_aggregates_stream_at_its_time() {
    let host = TestHost::new(shop());
    let event = Placed {
        order: "o1".into(),
        at_ms: ms(host.now()),
    };
    host.handle_event("expiry", "o1", &event).unwrap();
    let pending = host.scheduled();
    assert_eq!(pending[0].key, "shop::expire-o1");
    assert_eq!(pending[0].kind, MessageKind::Event);
    assert_eq!(pending[0].due, host.now() + DAY);
    assert!(host.events::<Order>("o1").is_empty());
    let fired = host.advance(DAY);
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].stream, "shop::order-o1");
    assert_eq!(fired[0].message_type, "Shop.Expired.v1");
    assert_eq!(host.events::<Order>("o1"), fired);
    assert!(host.commands().is_empty());
}

#[test]
fn a_failed_call_drops_its_schedules_and_cancels() {
    let host = TestHost::new(shop());
    placed(&host, "some-other", MINUTE);
    let error = host
        .handle_command("orders", &PlaceBadly { order: "o1".into() })
        .unwrap_err();
    assert_eq!(error.message(), "placed badly");
    let keys: Vec<String> = host.scheduled().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, ["shop::remind-some-other"]);
}

#[test]
fn a_schedule_a_host_cannot_keep_is_refused() {
    fn long_key(_: Pay, ctx: &mut Context) -> HandlerResult {
        let key = "k".repeat(200);
        ctx.schedule(&key)
            .after(MINUTE)
            .send(&Remind { order: "o".into() })
    }
    fn too_far(_: Remind, ctx: &mut Context) -> HandlerResult {
        ctx.schedule("k")
            .after(Duration::MAX)
            .send(&Remind { order: "o".into() })
    }
    let domain = Domain::new("Shop").command_handler(
        CommandHandler::<Order>::new("orders")
            .on(long_key)
            .on(too_far),
    );
    let host = TestHost::new(domain);
    let error = host
        .handle_command("orders", &Pay { order: "o".into() })
        .unwrap_err();
    assert!(
        error.message().contains("is 206 bytes, over the 200"),
        "the domain's prefix counts: {error}"
    );
    let error = host
        .handle_command("orders", &Remind { order: "o".into() })
        .unwrap_err();
    assert!(!error.is_retryable());
    assert!(error.message().contains("past any time"), "{error}");
    assert!(host.scheduled().is_empty());
}

#[test]
fn a_process_manager_sets_a_timeout_for_its_instance_when_it_starts() {
    let host = TestHost::new(shop());
    let start = host.now();
    let event = Placed {
        order: "o1".into(),
        at_ms: 0,
    };
    host.handle_event("delivery", "o1", &event).unwrap();
    let pending = host.scheduled();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].key, "shop::pm::delivery::o1::late");
    assert_eq!(pending[0].due, start + 2 * DAY);
    let fired = host.advance(2 * DAY);
    assert_eq!(fired[0].message_type, "Shop.Escalate.v1");
    assert_eq!(fired[0].stream, "shop::order:command-o1");
}

#[test]
fn a_later_step_resets_or_cancels_the_instances_timeout() {
    let host = TestHost::new(shop());
    let start = host.now();
    for order in ["o1", "o2"] {
        let event = Placed {
            order: order.into(),
            at_ms: 0,
        };
        host.handle_event("delivery", order, &event).unwrap();
    }
    host.advance(DAY);
    let paid = |order: &str| {
        host.handle_event(
            "delivery",
            order,
            &Paid {
                order: order.into(),
            },
        )
        .unwrap()
    };
    paid("o1");
    let due: Vec<(String, SystemTime)> = host
        .scheduled()
        .into_iter()
        .map(|s| (s.key, s.due))
        .collect();
    assert_eq!(
        due,
        [
            ("shop::pm::delivery::o2::late".to_owned(), start + 2 * DAY),
            ("shop::pm::delivery::o1::late".to_owned(), start + 3 * DAY),
        ],
        "o1's timeout is reset, o2's untouched"
    );
    paid("o1");
    let keys: Vec<String> = host.scheduled().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, ["shop::pm::delivery::o2::late"]);
    let fired = host.advance(2 * DAY);
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].data["order"], "o2");
}

#[test]
fn ending_an_instance_cancels_its_pending_timeouts() {
    let host = TestHost::new(shop());
    for order in ["o1", "o2"] {
        let event = Placed {
            order: order.into(),
            at_ms: 0,
        };
        host.handle_event("delivery", order, &event).unwrap();
    }
    let shipped = Shipped { order: "o1".into() };
    host.handle_event("delivery", "o1", &shipped).unwrap();
    let keys: Vec<String> = host.scheduled().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, ["shop::pm::delivery::o2::late"]);
    let fired = host.advance(3 * DAY);
    assert_eq!(fired.len(), 1, "only the instance still running times out");
    assert_eq!(fired[0].data["order"], "o2");
}

#[test]
fn a_timeout_outside_a_process_manager_step_fails_for_good() {
    let host = TestHost::new(shop());
    let error = host
        .handle_event("misplaced", "o1", &Paid { order: "o1".into() })
        .unwrap_err();
    assert!(!error.is_retryable());
    assert!(
        error.message().contains("only in a process-manager step"),
        "{error}"
    );
    assert!(host.scheduled().is_empty());
}
