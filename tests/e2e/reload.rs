//! Hot reload: the real binary with `--reload`, under a steady stream of orders, while the library
//! file is replaced the way cargo replaces it (a new file renamed over the old one).

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use protean_host::store::Store;
use serde_json::Value;

use crate::ops::{sample, scrape};
use crate::support::{
    assert_probe_gone, bad_build, each_order_exactly_once, host, incompatible_fixture,
    reload_fixture, sample_domain, send_orders, sqlite, wait_until, BadBuild, Incompatibility,
    RedisServer, ReloadBuild,
};

/// Put `from` at `to` as cargo does: write a new file beside it, then rename it over.
fn replace(from: &Path, to: &Path) {
    let staged = to.with_extension("so.new");
    std::fs::copy(from, &staged).unwrap();
    std::fs::rename(&staged, to).unwrap();
}

/// Sends orders in small batches, one `protean-host send` at a time, until stopped.
struct Sender {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Sender {
    /// Sends with the sample domain from its build path: the watched copy is broken for a while.
    fn start(dir: &Path) -> Self {
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let dir = dir.to_owned();
        let thread = std::thread::spawn({
            let (stop, sent) = (stop.clone(), sent.clone());
            move || {
                while !stop.load(Ordering::SeqCst) {
                    let from = sent.load(Ordering::SeqCst);
                    send_orders(&dir, from, 10);
                    sent.store(from + 10, Ordering::SeqCst);
                }
            }
        });
        Self { stop, sent, thread }
    }

    /// Stop sending; how many orders were sent.
    fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        self.sent.load(Ordering::SeqCst)
    }
}

fn warehouses(store: &dyn Store) -> Vec<String> {
    store
        .find_documents("reservations", "sku", &Value::from("book"))
        .unwrap()
        .iter()
        .map(|doc| {
            serde_json::from_str::<Value>(&doc.data).unwrap()["warehouse"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

fn shipped(store: &dyn Store) -> usize {
    crate::support::count_of(store, "fulfilment::order", "Fulfilment.OrderShipped.v1")
}

/// The whole story on one backend: a touch does nothing; broken builds (truncated, another ABI, a
/// panicking constructor) are refused while the running one carries on; a good build takes over within
/// 2 s; rebuilds in quick succession reload cleanly; every order is handled exactly once.
fn reload_under_load(config: &str) {
    // Built first: building them is not part of what the test times.
    let next_build = reload_fixture(ReloadBuild::Variant);
    let broken_builds = [
        (
            reload_fixture(ReloadBuild::Panicking).to_owned(),
            "panicked",
        ),
        (incompatible_fixture(Incompatibility::NextTag), "ABI"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{config}\n[server.health]\nport = 0\n");
    std::fs::write(dir.path().join("protean.toml"), config).unwrap();
    let lib_dir = dir.path().join("lib");
    std::fs::create_dir(&lib_dir).unwrap();
    let library: PathBuf = lib_dir.join("libsample_domain.so");
    std::fs::copy(sample_domain(), &library).unwrap();
    let mut server = host(dir.path())
        .args(["--reload", "--domain", &library.display().to_string()])
        .spawn();
    server.wait_for(&["watching the domain library"], Duration::from_secs(60));
    let address = server.health_address();
    server.wait_for(&["engine started"], Duration::from_secs(60));
    let store = sqlite(dir.path());
    let sender = Sender::start(dir.path());
    wait_until(Duration::from_secs(60), "the first shipments", || {
        shipped(store.as_ref()) > 0
    });

    replace(sample_domain(), &library);
    server.wait_for(
        &["rewritten with the same build; nothing to reload"],
        Duration::from_secs(10),
    );

    let truncated = dir.path().join("truncated.so");
    let whole = std::fs::read(sample_domain()).unwrap();
    std::fs::write(&truncated, &whole[..4096]).unwrap();
    for (broken, why) in [(truncated, "cut short")].into_iter().chain(broken_builds) {
        replace(&broken, &library);
        let refused = server.wait_for(
            &["reload failed; the running build carries on"],
            Duration::from_secs(10),
        );
        assert!(
            refused.contains("ERROR") && refused.contains(why),
            "{why}: {refused}"
        );
    }
    let before = shipped(store.as_ref());
    wait_until(
        Duration::from_secs(30),
        "shipments after the refused build",
        || shipped(store.as_ref()) > before + 10,
    );

    let swapped_at = Instant::now();
    replace(next_build, &library);
    let warned = server.wait_for(
        &["a new subscription starts from the beginning"],
        Duration::from_secs(10),
    );
    assert!(
        warned.contains("WARN") && warned.contains("audit") && !warned.contains("messages=0"),
        "{warned}"
    );
    let reloaded = server.wait_for(&["reloaded", "generation=2"], Duration::from_secs(10));
    assert!(
        reloaded.contains("audit"),
        "the new build's handler is added: {reloaded}"
    );
    wait_until(
        Duration::from_secs(10),
        "a reservation by the new build",
        || warehouses(store.as_ref()).iter().any(|w| w == "north"),
    );
    let shown = swapped_at.elapsed();
    assert!(
        shown < Duration::from_secs(2),
        "the new behaviour showed after {shown:?}"
    );
    let metrics = scrape(&address);
    assert_eq!(sample(&metrics, "protean_plugin_generation", &[]), 2.0);
    assert_eq!(sample(&metrics, "protean_plugin_reloads_total", &[]), 1.0);

    let sent = sender.finish();
    wait_until(Duration::from_secs(120), "every order shipped", || {
        shipped(store.as_ref()) >= sent
    });
    replace(sample_domain(), &library);
    let back = server.wait_for(&["reloaded", "generation=3"], Duration::from_secs(10));
    assert!(back.contains(r#"removed=["audit"]"#), "{back}");

    // Rebuilds in quick succession: one or more clean reloads, ending on the last build.
    for build in [next_build, sample_domain(), next_build] {
        replace(build, &library);
    }
    let variant_id = protean_host::plugin::Library::load(next_build)
        .unwrap()
        .build_id()
        .to_owned();
    server.wait_for(
        &["reloaded", &format!("build=\"{variant_id}\"")],
        Duration::from_secs(10),
    );
    server.signal(libc::SIGTERM);
    let (code, logs) = server.wait();
    assert_eq!(code, Some(0), "{logs}");
    each_order_exactly_once(store.as_ref(), sent);
    let by_build = warehouses(store.as_ref());
    assert!(by_build.iter().any(|w| w == "main") && by_build.iter().any(|w| w == "north"));
}

#[test]
fn reload_on_sqlite_switches_builds_under_load_without_losing_or_doubling() {
    reload_under_load("[server]\npoll_interval_ms = 50\n");
}

#[test]
fn reload_on_redis_switches_builds_under_load_without_losing_or_doubling() {
    let redis = RedisServer::start();
    reload_under_load(&format!(
        "[server]\npoll_interval_ms = 50\n{}",
        redis.config()
    ));
}

/// New builds that abort (an ELF initialiser, the constructor) or hang (the constructor) while they load
/// are loaded by a probe process first and refused, each with one ERROR line, while the running build
/// carries on: an order sent after each refusal is handled. The hung probe is killed at the time limit.
#[test]
fn reload_refuses_builds_that_crash_or_hang_and_the_running_build_carries_on() {
    for which in BadBuild::ALL {
        bad_build(which);
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        "[server]\npoll_interval_ms = 50\nprobe_timeout_seconds = 3\n[server.health]\nport = 0\n",
    )
    .unwrap();
    let lib_dir = dir.path().join("lib");
    std::fs::create_dir(&lib_dir).unwrap();
    let library = lib_dir.join("libsample_domain.so");
    std::fs::copy(sample_domain(), &library).unwrap();
    let pid_file = dir.path().join("probe.pid");
    let mut server = host(dir.path())
        .env("BAD_DOMAIN_PID_FILE", &pid_file)
        .args(["--reload", "--domain", &library.display().to_string()])
        .spawn();
    server.wait_for(&["watching the domain library"], Duration::from_secs(60));
    server.wait_for(&["engine started"], Duration::from_secs(60));
    let store = sqlite(dir.path());
    for (n, which) in BadBuild::ALL.into_iter().enumerate() {
        replace(bad_build(which), &library);
        let refused = server.wait_for(
            &["reload failed; the running build carries on"],
            Duration::from_secs(20),
        );
        assert!(
            refused.contains("ERROR") && refused.contains(which.refusal()),
            "{which:?}: {refused}"
        );
        if which == BadBuild::HangInConstructor {
            assert_probe_gone(&pid_file);
        }
        send_orders(dir.path(), n, 1);
        wait_until(
            Duration::from_secs(30),
            "the running build to ship the order sent after the refusal",
            || shipped(store.as_ref()) > n,
        );
    }
    server.signal(libc::SIGTERM);
    let (code, logs) = server.wait();
    assert_eq!(code, Some(0), "{logs}");
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(
        errors.len(),
        3,
        "one ERROR line per refused build:\n{}",
        errors.join("\n")
    );
    each_order_exactly_once(store.as_ref(), 3);
}

#[test]
fn reload_and_test_mode_together_are_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let lib = sample_domain().display().to_string();
    let out = host(dir.path())
        .args(["--reload", "--test-mode", "--domain", &lib])
        .output()
        .expect_code(2);
    assert!(
        out.stderr().contains("--reload") && out.stderr().contains("--test-mode"),
        "{}",
        out.stderr()
    );
}

/// Programs that embed the engine reload through `Engine::reload`, which says what will change.
#[test]
fn the_engine_api_reports_what_a_reload_changes_and_refuses_it_in_test_mode() {
    use protean_host::{
        config::Config,
        engine::{Engine, EngineError, EngineOptions},
        plugin::Library,
        store::MemoryStore,
    };
    let load = |path: &Path| {
        Library::load(path)
            .unwrap()
            .instantiate("domain", 2)
            .unwrap()
    };
    let engine = |test_mode| {
        let options = EngineOptions {
            test_mode,
            config: Config::default(),
            ..EngineOptions::default()
        };
        Engine::with_store(
            load(sample_domain()),
            Arc::new(MemoryStore::default()),
            options,
        )
        .unwrap()
    };
    let running = engine(false);
    let changes = running
        .reload(load(reload_fixture(ReloadBuild::Variant)))
        .unwrap();
    assert_eq!(changes.added, ["audit"]);
    assert!(changes.removed.is_empty() && changes.changed.is_empty());
    assert!(matches!(
        engine(true).reload(load(reload_fixture(ReloadBuild::Variant))),
        Err(EngineError::ReloadInTestMode)
    ));
}
