//! Compatibility the host proves (docs/compatibility.md): `tests/compat-domain` built against the
//! oldest plugin-api this host accepts, and built with a second Rust toolchain, loads into today's
//! host, runs the same flow and stores exactly what the build with today's plugin-api stores.

use std::path::Path;

use serde_json::Value;

use crate::support::{compat_build, host, sqlite, CompatBuild, OLDEST_PLUGIN_API};

/// What one run of the flow stored, in a form comparable across builds: every message of the account
/// category in store order (stream, type, data), the balances, and the subscriptions of dead letters.
#[derive(Debug, PartialEq)]
struct Effects {
    messages: Vec<(String, String, Value)>,
    balances: Vec<Value>,
    dead_letters: Vec<String>,
}

/// Deposits (one rejected, two large enough to be reviewed) with `library`, then the server in test
/// mode until everything is handled.
fn run_flow(library: &Path) -> Effects {
    let dir = tempfile::tempdir().unwrap();
    let domain = format!("--domain={}", library.display());
    for (account, amount) in [("a1", 50), ("a1", 150), ("a2", 200), ("a1", 0), ("a2", 5)] {
        let data = format!(r#"{{"account": "{account}", "amount": {amount}}}"#);
        host(dir.path())
            .args([domain.as_str(), "send", "Compat.Deposit.v1", &data])
            .output()
            .expect_code(0);
    }
    host(dir.path())
        .args([domain.as_str(), "--test-mode"])
        .output()
        .expect_code(0);
    let store = sqlite(dir.path());
    let read = |category: &str| {
        store
            .read_categories(&[category.into()], 0, usize::MAX)
            .unwrap()
    };
    let messages = read("compat::account")
        .into_iter()
        .map(|m| {
            (
                m.stream,
                m.message_type,
                serde_json::from_str(&m.data).unwrap(),
            )
        })
        .collect();
    let mut balances: Vec<Value> = store
        .find_documents("balances", "currency", &Value::from("EUR"))
        .unwrap()
        .iter()
        .map(|doc| serde_json::from_str(&doc.data).unwrap())
        .collect();
    balances.sort_by_key(|b| b["account"].to_string());
    let dead_letters = store
        .dead_letters(None)
        .unwrap()
        .into_iter()
        .map(|d| d.subscription)
        .collect();
    Effects {
        messages,
        balances,
        dead_letters,
    }
}

/// The reference, checked against what the flow must do so that two builds that both do nothing
/// cannot pass.
fn reference() -> Effects {
    let effects = run_flow(compat_build(CompatBuild::Today));
    let types: Vec<&str> = effects.messages.iter().map(|m| m.1.as_str()).collect();
    assert_eq!(
        types,
        [
            "Compat.Deposited.v1",
            "Compat.Deposited.v1",
            "Compat.Deposited.v1",
            "Compat.Deposited.v1",
            "Compat.Reviewed.v1",
            "Compat.Reviewed.v1"
        ],
        "{effects:#?}"
    );
    assert_eq!(effects.balances.len(), 2, "{effects:#?}");
    assert_eq!(effects.balances[0]["balance"], 200);
    assert_eq!(effects.balances[1]["balance"], 205);
    assert_eq!(effects.dead_letters, ["commands:compat::account"]);
    effects
}

#[test]
fn a_domain_built_against_the_oldest_accepted_plugin_api_does_what_todays_build_does() {
    let oldest = compat_build(CompatBuild::OldestApi);
    assert_eq!(
        run_flow(oldest),
        reference(),
        "built against plugin-api as of {OLDEST_PLUGIN_API}"
    );
}

#[test]
fn a_domain_built_with_the_nightly_toolchain_does_what_the_stable_build_does() {
    let nightly = compat_build(CompatBuild::Nightly);
    let bytes = std::fs::read(nightly).unwrap();
    assert!(
        bytes.windows(8).any(|w| w == b"-nightly"),
        "the build's .comment names a nightly rustc"
    );
    assert_eq!(run_flow(nightly), reference());
}
