//! `protean-host new`: a new user's three commands, as the README and the command itself print them,
//! from nothing to a passing test and a running domain.

use std::path::Path;

use crate::support::{cargo, count_of, host, sqlite, workspace};

/// Run `cargo ARGS` in the new crate, as its author would: its own target directory (`./target`), not
/// the one this test process was given.
fn author_runs_cargo(dir: &Path, args: &[&str]) -> String {
    let output = cargo(dir)
        .args(args)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("cargo runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "cargo {args:?} failed:\n{text}");
    text
}

#[test]
fn a_new_domain_passes_its_test_builds_and_runs_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let created = host(dir.path())
        .args(["new", "shop"])
        .output()
        .expect_code(0);
    let shop = dir.path().join("shop");
    let printed = created.stdout();
    for step in [
        "cd shop",
        "cargo test",
        "cargo build && protean-host --domain=shop",
    ] {
        assert!(
            printed.contains(&format!("\n  {step}\n")),
            "{step:?} in:\n{printed}"
        );
    }
    // The crate is built where its author would build it, but from a directory kept between runs (a
    // build of plugin-api and its dependencies takes a minute), and with the versions this workspace
    // has locked, so the test needs no registry and does not change under it.
    let kept = workspace().join("target/template-fixture");
    std::fs::create_dir_all(&kept).unwrap();
    std::os::unix::fs::symlink(&kept, shop.join("target")).unwrap();
    std::fs::copy(workspace().join("Cargo.lock"), shop.join("Cargo.lock")).unwrap();

    let tested = author_runs_cargo(&shop, &["test"]);
    assert!(tested.contains("test result: ok. 2 passed"), "{tested}");
    author_runs_cargo(&shop, &["build"]);

    host(&shop)
        .args([
            "--domain=shop",
            "send",
            "Shop.PlaceOrder.v1",
            r#"{"order_id": "o1", "item": "book"}"#,
        ])
        .output()
        .expect_code(0);
    let ran = host(&shop)
        .args(["--domain=shop", "--test-mode"])
        .output()
        .expect_code(0);
    assert!(
        ran.stderr().contains("order o1 placed for book"),
        "{}",
        ran.stderr()
    );
    let store = sqlite(&shop);
    assert_eq!(
        count_of(store.as_ref(), "shop::order", "Shop.OrderPlaced.v1"),
        1
    );
}

#[test]
fn new_refuses_a_directory_that_exists() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("shop")).unwrap();
    let refused = host(dir.path())
        .args(["new", "shop"])
        .output()
        .expect_code(1);
    assert_eq!(
        refused.error_lines(),
        ["error: shop already exists; choose another name or remove it"]
    );
}
