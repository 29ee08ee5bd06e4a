//! The command line itself: help, version, usage errors, inspect output.

use crate::support::{host, sample_domain};

#[test]
fn help_and_version_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let help = host(dir.path()).args(["--help"]).output().expect_code(0);
    assert!(help.stdout().contains("--domain"), "{}", help.stdout());
    assert!(help.stdout().contains("inspect"));
    let version = host(dir.path()).args(["--version"]).output().expect_code(0);
    assert!(
        version.stdout().starts_with("protean-host 0.1.0"),
        "{}",
        version.stdout()
    );
}

#[test]
fn usage_errors_exit_two_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--log-level", "loud"][..],
        &["--no-such-flag"],
        &["inspect", "--test-mode"],
        &["frobnicate"],
    ] {
        let run = host(dir.path()).args(args).output().expect_code(2);
        assert_eq!(run.error_lines().len(), 1, "{args:?}: {}", run.stderr());
    }
}

#[test]
fn inspect_lists_handlers_and_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path())
        .args(["inspect", "--domain"])
        .args([sample_domain()])
        .output()
        .expect_code(0);
    let out = run.stdout();
    assert!(out.contains("instance domain (selected)"), "{out}");
    assert!(out.contains("instance reporting"), "{out}");
    for needle in [
        "orders           command handler  fulfilment::order:command",
        "Fulfilment.PlaceOrder.v1",
        "fulfilment       process manager",
        "commands:fulfilment::order",
        "order_summary-fulfilment::payment",
        "totals-fulfilment::order",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
}

#[test]
fn inspect_json_is_machine_readable() {
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path())
        .args(["inspect", "--json", "--domain"])
        .args([sample_domain()])
        .output()
        .expect_code(0);
    let report: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    assert_eq!(report["selected"], "domain");
    let domain = &report["instances"][0];
    assert_eq!(domain["name"], "domain");
    let kinds: Vec<&str> = domain["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "command_handler",
            "command_handler",
            "event_handler",
            "event_handler",
            "process_manager",
            "projector"
        ]
    );
    let subscriptions = domain["subscriptions"].as_array().unwrap();
    let commands = subscriptions
        .iter()
        .find(|s| s["name"] == "commands:fulfilment::order")
        .unwrap();
    assert_eq!(commands["routes"]["Fulfilment.ShipOrder.v1"], "orders");
    assert_eq!(report["build_id"].as_str().unwrap().len(), 12);
}
