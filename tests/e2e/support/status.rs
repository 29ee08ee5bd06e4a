//! `subscriptions status --json` of the real binary, and its rows.

use std::path::Path;

use serde_json::Value;

use super::host;

/// The status of the subscriptions of `domain` (`library:instance`) on the store in `dir`.
pub fn status_json(dir: &Path, domain: &str) -> Value {
    let out = host(dir)
        .args(["subscriptions", "status", "--json", "--domain", domain])
        .output()
        .expect_code(0);
    serde_json::from_str(&out.stdout()).unwrap()
}

/// The row of subscription `name` in a status (or a readiness answer, which has the same rows).
#[track_caller]
pub fn subscription<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no subscription {name} in {body}"))
}
