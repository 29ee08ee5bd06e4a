//! Loading real plugin libraries: every load error, instance choice, panics and logs across the ABI.

use std::{
    cell::RefCell,
    path::PathBuf,
    time::{Duration, Instant},
};

use protean_host::plugin::{Delivery, HostServices, Library};

use crate::support::{
    assert_probe_gone, bad_build, fixture_domain, host, incompatible_fixture, sample_domain,
    BadBuild, Incompatibility,
};

fn libc() -> PathBuf {
    [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/aarch64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .expect("a libc.so.6 to use as a shared library that is not a plugin")
}

/// The deadline of a direct call: a call in process is only watched, never stopped.
const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn a_shared_library_that_is_not_a_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path())
        .args(["--domain"])
        .args([libc()])
        .output()
        .expect_code(1);
    assert_eq!(run.error_lines(), [format!(
        "error: {} is not a protean domain plugin (it exports no PROTEAN_ABI_TAG); build a cdylib that calls protean_plugin_api::export_domains!",
        libc().display()
    )]);
}

#[test]
fn a_file_that_is_not_a_library() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("libfake.so"), "not an ELF file").unwrap();
    let run = host(dir.path())
        .args(["--domain", "libfake.so"])
        .output()
        .expect_code(1);
    let line = &run.error_lines()[0];
    assert!(line.contains("libfake.so as a shared library"), "{line}");
    assert!(line.contains("pass the path of a domain cdylib"), "{line}");
    assert!(
        !line.contains("protean-host-"),
        "the private copy's name stays hidden: {line}"
    );
}

/// The dynamic loader maps a cut-short library and the process dies of SIGBUS on first touch; the host
/// checks the segments first and says so in one line.
#[test]
fn a_truncated_library_is_one_line_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let whole = std::fs::read(sample_domain()).unwrap();
    std::fs::write(dir.path().join("libcut.so"), &whole[..4096]).unwrap();
    let run = host(dir.path())
        .args(["--domain", "libcut.so"])
        .output()
        .expect_code(1);
    let line = &run.error_lines()[0];
    assert!(
        line.contains("libcut.so is not a whole shared library"),
        "{line}"
    );
    assert!(line.contains("wait for the build to finish"), "{line}");
}

#[test]
fn a_plugin_of_another_abi_generation_names_both_versions() {
    let lib = incompatible_fixture(Incompatibility::NextTag);
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path())
        .args(["--domain"])
        .args([&lib])
        .output()
        .expect_code(1);
    assert_eq!(run.error_lines(), [format!(
        "error: {} was built against plugin-api 0.2.0-abi-test (ABI 2), but this host speaks ABI 1 (plugin-api 0.1.0); rebuild the plugin against plugin-api 0.1.0",
        lib.display()
    )]);
}

#[test]
fn a_layout_mismatch_is_one_sentence_and_the_report_is_for_debug() {
    let lib = incompatible_fixture(Incompatibility::Layout);
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path())
        .args(["--domain"])
        .args([&lib])
        .output()
        .expect_code(1);
    assert_eq!(run.error_lines(), [format!(
        "error: {} has the right ABI tag but its plugin-api type layouts differ from this host's; rebuild the plugin against plugin-api 0.1.0 (--debug shows the full report)",
        lib.display()
    )]);
    assert_eq!(run.stderr().lines().count(), 1, "{}", run.stderr());
    let debug = host(dir.path())
        .args(["--debug", "--domain"])
        .args([&lib])
        .output()
        .expect_code(1);
    assert!(
        debug.stderr().contains("abi_stable layout report"),
        "{}",
        debug.stderr()
    );
    assert!(debug.stderr().lines().count() > 10);
}

#[test]
fn a_constructor_that_errors_or_panics() {
    let dir = tempfile::tempdir().unwrap();
    let run = host(dir.path())
        .args(["--domain"])
        .args([format!("{}:broken", fixture_domain().display())])
        .output()
        .expect_code(1);
    assert_eq!(run.error_lines(), [format!(
        "error: domain instance \"broken\" of {} failed to start: domain \"broken\" is invalid: two handlers are named \"twice\"; handler names must be unique",
        fixture_domain().display()
    )]);
    let run = host(dir.path())
        .args(["--domain"])
        .args([format!("{}:panicking", fixture_domain().display())])
        .output()
        .expect_code(1);
    let line = &run.error_lines()[0];
    assert!(line.contains("\"panicking\""), "{line}");
    assert!(
        line.contains(
            "the domain constructor panicked: panicked at tests/fixture-domain/src/lib.rs"
        ),
        "{line}"
    );
    assert!(line.contains("panics on purpose"), "{line}");
}

/// A build that aborts while it loads (an ELF initialiser, its constructor), or whose constructor never
/// returns, is loaded by a probe process first: the server says so in one line and exits 1, instead of
/// dying with it (exit 134, nothing said) or hanging. The hung probe is killed at the time limit.
#[test]
fn a_build_that_crashes_or_hangs_while_loading_is_one_line_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        "[server]\nprobe_timeout_seconds = 3\n",
    )
    .unwrap();
    let pid_file = dir.path().join("probe.pid");
    for which in BadBuild::ALL {
        let lib = bad_build(which);
        let started = Instant::now();
        let run = host(dir.path())
            .env("BAD_DOMAIN_PID_FILE", &pid_file)
            .args(["--domain"])
            .args([lib])
            .output()
            .expect_code(1);
        let took = started.elapsed();
        assert_eq!(
            run.stderr().lines().count(),
            1,
            "{which:?}: {}",
            run.stderr()
        );
        let line = &run.error_lines()[0];
        assert!(
            line.starts_with(&format!("error: {}: {}", lib.display(), which.refusal())),
            "{which:?}: {line}"
        );
        assert!(
            line.contains("so the build was not loaded; "),
            "names the fix: {line}"
        );
        if which == BadBuild::HangInConstructor {
            assert!(
                took >= Duration::from_secs(3) && took < Duration::from_secs(20),
                "the 3 s limit ends the probe: {took:?}"
            );
            assert_probe_gone(&pid_file);
        }
    }
}

/// The probe process reports the build id the host gives it (the host hashed the copy it wrote and read
/// back, so the child does not read and hash it again); run by hand without one, it hashes the file.
#[test]
fn the_probe_reports_the_build_it_was_given_or_the_one_it_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let lib = fixture_domain();
    let loaded = |extra: &[&str]| -> String {
        let run = host(dir.path())
            .args(["__probe"])
            .args([lib.as_os_str()])
            .args(["--instance", "empty"])
            .args(extra)
            .output()
            .expect_code(0);
        let lines: Vec<serde_json::Value> = run
            .stdout()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.last(), Some(&serde_json::json!({"done": true})));
        let constructed = lines.iter().filter(|l| l.get("constructed").is_some());
        assert_eq!(constructed.count(), 1, "{lines:?}");
        lines
            .iter()
            .find_map(|l| l["loaded"]["build_id"].as_str())
            .unwrap()
            .to_owned()
    };
    assert_eq!(loaded(&["--build", "0a1b2c3d4e5f"]), "0a1b2c3d4e5f");
    let bytes = std::fs::read(lib).unwrap();
    let hashed: String = blake3::hash(&bytes).as_bytes()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(loaded(&[]), hashed);
}

#[test]
fn an_unknown_instance_lists_the_available_ones() {
    let dir = tempfile::tempdir().unwrap();
    let lib = sample_domain().display().to_string();
    let run = host(dir.path())
        .args(["--domain", &format!("{lib}:nope")])
        .output()
        .expect_code(1);
    assert_eq!(run.error_lines(), [format!(
        "error: {lib} has no domain instance \"nope\"; available: domain, reporting; choose one with --domain={lib}:NAME"
    )]);
}

#[test]
fn several_instances_and_none_named_is_ambiguous() {
    let dir = tempfile::tempdir().unwrap();
    let lib = fixture_domain().display().to_string();
    let run = host(dir.path())
        .args(["--domain", &lib])
        .output()
        .expect_code(1);
    assert_eq!(run.error_lines(), [format!(
        "error: {lib} declares several domain instances (probe, broken, panicking, empty, noop, ordered_noop, sequencing, probe_ordered, timers) and none is named domain or subdomain; choose one with --domain={lib}:NAME"
    )]);
}

#[test]
fn plugin_log_lines_reach_the_host_logs_with_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let lib = format!("{}:empty", fixture_domain().display());
    let run = host(dir.path())
        .args(["inspect", "--log-format", "json", "--domain", &lib])
        .output()
        .expect_code(0);
    let line = run
        .stderr()
        .lines()
        .find(|l| l.contains("empty domain created"))
        .map(str::to_owned);
    let line = line.unwrap_or_else(|| panic!("no plugin log line in:\n{}", run.stderr()));
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["target"], "plugin");
    assert_eq!(record["level"], "INFO");
    assert_eq!(record["plugin"], "libfixture_domain.so");
    assert_eq!(record["module"], "fixture_domain");
}

/// Records what a handler asked the host to do: the events it raised, and what it read (and said it
/// would read first, `ahead: ...`).
#[derive(Default)]
struct Recorder {
    events: RefCell<Vec<(u32, String, String)>>,
    reads: RefCell<Vec<String>>,
}

impl HostServices for Recorder {
    fn raise_event(
        &self,
        index: u32,
        stream: &str,
        message_type: &str,
        _: &[u8],
        _: Option<i64>,
    ) -> Result<(), String> {
        self.events
            .borrow_mut()
            .push((index, stream.into(), message_type.into()));
        Ok(())
    }
    fn send_command(&self, _: u32, _: &str, _: &str, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn read_stream(&self, stream: &str, _: u64) -> Result<Vec<u8>, String> {
        self.reads.borrow_mut().push(format!("read {stream}"));
        Ok(b"[]".to_vec())
    }
    fn get_document(&self, collection: &str, id: &str) -> Result<Option<Vec<u8>>, String> {
        self.reads
            .borrow_mut()
            .push(format!("get {collection}/{id}"));
        Ok(None)
    }
    fn put_document(&self, _: u32, _: &str, _: &str, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn delete_document(&self, _: u32, _: &str, _: &str) -> Result<(), String> {
        Ok(())
    }
    fn find_documents(&self, _: &str, _: &str, _: &[u8]) -> Result<Vec<u8>, String> {
        Ok(b"[]".to_vec())
    }
    fn schedule(&self, _: u32, _: protean_plugin_api::ScheduledMessage<'_>) -> Result<(), String> {
        Ok(())
    }
    fn prefetch(&self, documents: &[(&str, &str)], streams: &[&str], finds: &[(&str, &str, &str)]) {
        let mut reads: Vec<String> = documents
            .iter()
            .map(|(c, i)| format!("get {c}/{i}"))
            .collect();
        reads.extend(streams.iter().map(|s| format!("read {s}")));
        reads.extend(finds.iter().map(|(c, f, v)| format!("find {c}.{f} = {v}")));
        self.reads
            .borrow_mut()
            .push(format!("ahead: {}", reads.join(", ")));
    }
}

fn run_command(id: &str, behaviour: &str) -> String {
    serde_json::json!({ "id": id, "behaviour": behaviour }).to_string()
}

fn delivery<'a>(data: &'a str, stream: &'a str) -> Delivery<'a> {
    Delivery {
        id: "m1",
        stream,
        message_type: "Probe.Run.v1",
        position: 0,
        global_position: 1,
        data: data.as_bytes(),
        metadata: b"{}",
    }
}

#[test]
fn a_panicking_handler_returns_an_error_and_the_host_carries_on() {
    let library = Library::load(fixture_domain()).unwrap();
    let plugin = library.instantiate("probe", 3).unwrap();
    let recorder = Recorder::default();
    let (ok, panics) = (run_command("p-ok", "ok"), run_command("p-panic", "panic"));
    let batch = [
        delivery(&ok, "probe::probe:command-p-ok"),
        delivery(&panics, "probe::probe:command-p-panic"),
        delivery(&ok, "x"),
    ];
    let outcome = plugin.handle_batch("runner", &batch, &recorder, LIMIT);
    assert_eq!(
        outcome.handled, 1,
        "the batch stops at the panicking message"
    );
    let failure = outcome.failure.expect("the panic is reported as a failure");
    assert!(failure.retryable);
    assert!(
        failure.message.contains("handler panicked")
            && failure.message.contains("was told to panic"),
        "{}",
        failure.message
    );
    assert!(
        failure.message.contains("tests/fixture-domain/src/lib.rs"),
        "names where: {}",
        failure.message
    );

    let again = plugin.handle_batch(
        "runner",
        &[delivery(&run_command("p-after", "ok"), "s")],
        &recorder,
        LIMIT,
    );
    assert_eq!(
        (again.handled, again.failure),
        (1, None),
        "the plugin still works after a panic"
    );
    let events = recorder.events.borrow();
    assert_eq!(
        events.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(),
        ["probe::probe-p-ok", "probe::probe-p-after"]
    );
    assert!(events.iter().all(|e| e.0 == 0 && e.2 == "Probe.Ran.v1"));
}

#[test]
fn a_rejection_is_not_retryable() {
    let plugin = Library::load(fixture_domain())
        .unwrap()
        .instantiate("probe", 3)
        .unwrap();
    let reject = run_command("p-reject", "reject");
    let outcome = plugin.handle_batch(
        "runner",
        &[delivery(&reject, "s")],
        &Recorder::default(),
        LIMIT,
    );
    let failure = outcome.failure.unwrap();
    assert_eq!((outcome.handled, failure.retryable), (0, false));
    assert_eq!(failure.message, "probe p-reject rejected");
}

#[test]
fn reloading_the_same_path_after_a_rename_loads_the_new_library() {
    // glibc returns an already-loaded image for a path it knows; private copies make the new file load.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libdomain.so");
    std::fs::copy(sample_domain(), &path).unwrap();
    let first = Library::load(&path).unwrap();
    let staged = dir.path().join("libdomain.so.new");
    std::fs::copy(fixture_domain(), &staged).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    let second = Library::load(&path).unwrap();
    assert_eq!(first.instances(), ["domain", "reporting"]);
    assert_eq!(
        second.instances(),
        [
            "probe",
            "broken",
            "panicking",
            "empty",
            "noop",
            "ordered_noop",
            "sequencing",
            "probe_ordered",
            "timers"
        ]
    );
    assert_ne!(first.build_id(), second.build_id());
    assert_eq!(
        first
            .instantiate("domain", 3)
            .unwrap()
            .registrations()
            .len(),
        6,
        "the old generation still works"
    );
}

/// Through the ABI, a process manager's batch says first which instances it will read, a command
/// handler's which aggregates it will load, a projector's which documents it declared it reads and an
/// event handler's which aggregates it declared it loads (the host reads them in one round trip); a
/// batch of one says nothing.
#[test]
fn a_batch_says_what_its_handlers_will_read_before_they_read_it() {
    let library = Library::load(sample_domain()).unwrap();
    let plugin = library.instantiate("domain", 1).unwrap();
    let orders: Vec<String> = (1..=3)
        .map(|n| serde_json::json!({"order_id": format!("o{n}"), "customer": "ada", "sku": "book", "quantity": 1, "total": 10.0}).to_string())
        .collect();
    let streams: Vec<String> = (1..=3)
        .map(|n| format!("fulfilment::order:command-o{n}"))
        .collect();
    let batch = |message_type: &'static str, count: usize| -> Vec<Delivery<'_>> {
        (0..count)
            .map(|i| Delivery {
                message_type,
                ..delivery(&orders[i], &streams[i])
            })
            .collect()
    };
    let reads_of = |handler: &str, deliveries: &[Delivery<'_>]| {
        let recorder = Recorder::default();
        let outcome = plugin.handle_batch(handler, deliveries, &recorder, LIMIT);
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
        recorder.reads.into_inner()
    };
    let manager = reads_of("fulfilment", &batch("Fulfilment.OrderPlaced.v1", 3));
    let gets: Vec<String> = (1..=3)
        .map(|n| format!("get pm::fulfilment/o{n}"))
        .collect();
    assert_eq!(
        manager[0],
        format!("ahead: {}", gets.join(", ")),
        "{manager:?}"
    );
    assert_eq!(manager[1..], gets[..], "then reads just those");

    let handler = reads_of("orders", &batch("Fulfilment.PlaceOrder.v1", 2));
    let loads = ["read fulfilment::order-o1", "read fulfilment::order-o2"];
    assert_eq!(
        handler[0],
        format!("ahead: {}", loads.join(", ")),
        "{handler:?}"
    );
    assert_eq!(handler[1..], loads[..]);

    // The projector said which document each event reads (`reads_document`), for every event type.
    let projector = reads_of("order_summary", &batch("Fulfilment.OrderShipped.v1", 2));
    let summaries = ["get order_summaries/o1", "get order_summaries/o2"];
    assert_eq!(
        projector[0],
        format!("ahead: {}", summaries.join(", ")),
        "{projector:?}"
    );
    assert_eq!(projector[1..], summaries[..]);
    // A message without the field is left out of the hint (its call then fails on its own).
    let no_id = serde_json::json!({"customer": "ada"}).to_string();
    let mixed = [
        batch("Fulfilment.OrderShipped.v1", 1).remove(0),
        Delivery {
            message_type: "Fulfilment.OrderShipped.v1",
            ..delivery(&no_id, &streams[1])
        },
    ];
    let recorder = Recorder::default();
    plugin.handle_batch("order_summary", &mixed, &recorder, LIMIT);
    assert_eq!(
        recorder.reads.into_inner(),
        ["ahead: get order_summaries/o1", "get order_summaries/o1"]
    );

    // Billing declared the reservations it finds (`finds`) and the order it loads
    // (`reads_aggregate`); the recorder finds no reservation, so its first call fails after the hint
    // was given.
    let recorder = Recorder::default();
    plugin.handle_batch(
        "billing",
        &batch("Fulfilment.StockReserved.v1", 2),
        &recorder,
        LIMIT,
    );
    let reads = recorder.reads.into_inner();
    assert_eq!(
        reads.first().map(String::as_str),
        Some(concat!(
            "ahead: read fulfilment::order-o1, read fulfilment::order-o2, ",
            r#"find reservations.order_id = "o1", find reservations.order_id = "o2""#
        )),
        "{reads:?}"
    );

    let alone = reads_of("orders", &batch("Fulfilment.PlaceOrder.v1", 1));
    assert_eq!(alone, ["read fulfilment::order-o1"]);
}
