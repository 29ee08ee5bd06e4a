use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Default, Aggregate)]
struct Order;

#[derive(Serialize, Deserialize, Command)]
#[command(aggregate = Order, target = id)]
struct PlaceOrder {
    order_id: String,
    sku: String,
}

fn main() {}
