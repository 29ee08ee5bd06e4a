//! Every form of `--domain` / `PROTEAN_DOMAIN`, through the real binary.

use std::path::Path;

use crate::support::{host, sample_domain};

fn copy_sample(to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(sample_domain(), to).unwrap();
}

/// Which library and instance `inspect` selected, from its JSON.
fn selected(cwd: &Path, args: &[&str], env: Option<&str>) -> (String, String) {
    let mut command = host(cwd).args(["inspect", "--json"]).args(args);
    if let Some(value) = env {
        command = command.env("PROTEAN_DOMAIN", value);
    }
    let run = command.output().expect_code(0);
    let report: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    (
        report["library"].as_str().unwrap().to_owned(),
        report["selected"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn a_path_and_a_path_with_instance() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libshop.so");
    copy_sample(&lib);
    let (library, instance) = selected(dir.path(), &["--domain", "libshop.so"], None);
    assert_eq!(
        (library.as_str(), instance.as_str()),
        (lib.to_str().unwrap(), "domain")
    );
    let (_, instance) = selected(dir.path(), &["--domain=./libshop.so:reporting"], None);
    assert_eq!(instance, "reporting");
}

#[test]
fn a_colon_in_a_directory_is_not_an_instance() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("odd:dir").join("libshop.so");
    copy_sample(&lib);
    let (library, instance) = selected(dir.path(), &["--domain", "odd:dir/libshop.so"], None);
    assert_eq!(
        (library.as_str(), instance.as_str()),
        (lib.to_str().unwrap(), "domain")
    );
    let (library, instance) = selected(
        dir.path(),
        &["--domain", "odd:dir/libshop.so:reporting"],
        None,
    );
    assert_eq!(
        (library.as_str(), instance.as_str()),
        (lib.to_str().unwrap(), "reporting")
    );
}

#[test]
fn a_crate_name_is_found_in_cwd_then_release_then_debug() {
    let dir = tempfile::tempdir().unwrap();
    let debug = dir.path().join("target/debug/libmy_shop.so");
    let release = dir.path().join("target/release/libmy_shop.so");
    let here = dir.path().join("libmy_shop.so");
    copy_sample(&debug);
    assert_eq!(
        selected(dir.path(), &["--domain", "my-shop"], None).0,
        debug.to_str().unwrap()
    );
    copy_sample(&release);
    assert_eq!(
        selected(dir.path(), &["--domain", "my_shop"], None).0,
        release.to_str().unwrap()
    );
    copy_sample(&here);
    let (library, instance) = selected(dir.path(), &["--domain", "my_shop:reporting"], None);
    assert_eq!(
        (library.as_str(), instance.as_str()),
        (here.to_str().unwrap(), "reporting")
    );
}

#[test]
fn no_domain_means_libdomain_then_libsubdomain() {
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path()).args(["inspect"]).output().expect_code(1);
    assert!(
        run.stderr().contains("libdomain.so") && run.stderr().contains("libsubdomain.so"),
        "{}",
        run.stderr()
    );
    assert!(
        run.stderr().contains("--domain"),
        "the error names the fix: {}",
        run.stderr()
    );
    copy_sample(&dir.path().join("libsubdomain.so"));
    assert!(selected(dir.path(), &[], None)
        .0
        .ends_with("/libsubdomain.so"));
    copy_sample(&dir.path().join("libdomain.so"));
    assert!(selected(dir.path(), &[], None).0.ends_with("/libdomain.so"));
}

#[test]
fn protean_domain_wins_over_the_flag_unless_empty() {
    let dir = tempfile::tempdir().unwrap();
    copy_sample(&dir.path().join("liba.so"));
    copy_sample(&dir.path().join("libb.so"));
    let (library, instance) = selected(
        dir.path(),
        &["--domain", "liba.so"],
        Some("libb.so:reporting"),
    );
    assert!(library.ends_with("/libb.so"), "{library}");
    assert_eq!(instance, "reporting");
    let (library, _) = selected(dir.path(), &["--domain", "liba.so"], Some(""));
    assert!(library.ends_with("/liba.so"), "{library}");
}

#[test]
fn a_missing_file_names_the_resolved_path() {
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path())
        .args(["--domain", "nowhere/libshop.so"])
        .output()
        .expect_code(1);
    let expected = dir.path().join("nowhere/libshop.so");
    assert_eq!(
        run.error_lines(),
        [format!(
            "error: domain library not found: {}; build it (cargo build) or fix the --domain path",
            expected.display()
        )]
    );
}

#[test]
fn a_missing_crate_lists_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path())
        .args(["inspect", "--domain", "shop"])
        .output()
        .expect_code(1);
    let line = &run.error_lines()[0];
    for place in [
        "/libshop.so",
        "target/release/libshop.so",
        "target/debug/libshop.so",
    ] {
        assert!(line.contains(place), "{line}");
    }
}

#[test]
fn an_empty_instance_name_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path())
        .args(["inspect", "--domain", "libx.so:"])
        .output()
        .expect_code(1);
    assert!(
        run.error_lines()[0].contains("empty instance name"),
        "{}",
        run.stderr()
    );
}
