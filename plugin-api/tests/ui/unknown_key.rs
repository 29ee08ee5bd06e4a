use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Default, Aggregate)]
struct Order;

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Order, category = "orders")]
struct OrderPlaced {
    order_id: String,
}

fn main() {}
