use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

struct Order;

#[derive(Serialize, Deserialize, Event)]
#[event(aggregate = Order)]
struct OrderPlaced {
    order_id: String,
}

fn main() {}
