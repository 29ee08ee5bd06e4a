use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Default, Aggregate)]
#[aggregate(applies(OrderPlaced))]
struct Order {
    placed: bool,
}

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
struct OrderPlaced {
    order_id: String,
}

fn main() {}
