use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
struct OrderPlaced {
    order_id: String,
}

fn main() {}
