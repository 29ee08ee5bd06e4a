use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Default, Aggregate)]
struct Order;

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
struct OrderPlaced {
    order_id: String,
}

fn reserve(_: &mut Context, _: OrderPlaced) -> HandlerResult {
    Ok(())
}

fn main() {
    let _ = Domain::new("Shop").event_handler(EventHandler::new("inventory").on(reserve));
}
