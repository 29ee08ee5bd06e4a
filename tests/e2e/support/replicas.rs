//! Orders for the sample domain, sent and handled by real `protean-host` replicas, and waiting for
//! their effects.

use std::{path::Path, time::Duration};

use serde_json::{json, Value};

use super::{host, sample_domain, server::Server};

/// The `PlaceOrder` data of order `n`.
pub fn place(n: usize) -> Value {
    json!({ "order_id": format!("o{n}"), "customer": "ada", "sku": "book", "quantity": 1, "total": 10.0 })
}

/// Orders `first..first + n`, one JSON object a line (for `send ... -`).
pub fn orders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| place(i).to_string() + "\n")
        .collect()
}

/// Send orders `first..first + n` with `protean-host send`, configured by `dir/protean.toml`.
#[track_caller]
pub fn send_orders(dir: &Path, first: usize, n: usize) {
    let lib = sample_domain().display().to_string();
    host(dir)
        .args(["send", "--domain", &lib, "Fulfilment.PlaceOrder.v1", "-"])
        .output_with_stdin(&orders(first, n))
        .expect_code(0);
}

/// Start `n` servers of the sample domain in `dir`, each past "engine started".
#[track_caller]
pub fn start_replicas(dir: &Path, n: usize) -> Vec<Server> {
    start_servers(dir, n, &sample_domain().display().to_string())
}

/// Start `n` servers of `domain` (`library[:instance]`) in `dir`, each past "engine started".
#[track_caller]
pub fn start_servers(dir: &Path, n: usize, domain: &str) -> Vec<Server> {
    let mut replicas: Vec<Server> = (0..n)
        .map(|_| host(dir).args(["--domain", domain]).spawn())
        .collect();
    for replica in &mut replicas {
        replica.wait_for(&["engine started"], Duration::from_secs(60));
    }
    replicas
}
