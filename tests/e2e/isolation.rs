//! Isolated mode (`[server] isolation = "process"`): the real binary runs the fixture domain in worker
//! processes; every way a handler can kill its process costs that call and that worker, never the host.

use std::{collections::BTreeMap, path::Path, time::Duration};

use protean_host::store::Store;
use serde_json::json;

use crate::support::{
    assert_probe_gone, bad_build, each_order_exactly_once, fixture_domain, host, reload_fixture,
    sample_domain, send_orders, sqlite, wait_until, BadBuild, ReloadBuild,
};

const LIMIT: Duration = Duration::from_secs(120);

/// One message per call, so that a crash is the culprit's alone whatever the engine does with a call
/// that crashed; fast retries; a short deadline; a memory limit.
const ISOLATED: &str = "[server]
isolation = \"process\"
messages_per_tick = 1
max_retries = 1
retry_delay_ms = 10
max_retry_delay_ms = 20
handler_timeout_ms = 2000
[server.worker]
memory_limit_mb = 256
";

fn probe_lib() -> String {
    format!("{}:probe", fixture_domain().display())
}

/// A directory with `config` as its protean.toml.
fn configured(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("protean.toml"), config).unwrap();
    dir
}

/// Send `Run { id, behaviour }` with `protean-host send` (which, configured so, asks a worker for the
/// command's stream).
fn run(dir: &Path, id: &str, behaviour: &str) {
    let data = json!({ "id": id, "behaviour": behaviour }).to_string();
    host(dir)
        .args(["send", "--domain", &probe_lib(), "Probe.Run.v1", &data])
        .output()
        .expect_code(0);
}

/// Whether probe `id` ran to completion (its `Ran` event is stored).
fn ran(store: &dyn Store, id: &str) -> bool {
    !store
        .read_stream(&format!("probe::probe-{id}"), 0)
        .unwrap()
        .is_empty()
}

/// The pids of the worker processes started, from the log.
fn workers_started(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("worker process started"))
        .filter_map(|l| {
            l.split("pid=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z")
        })
        .unwrap_or(false)
}

#[test]
fn each_crash_costs_its_call_and_a_worker_never_the_host() {
    let dir = configured(ISOLATED);
    let crashes = [
        ("abort", "abort", "died handling this call (SIGABRT)"),
        ("segfault", "segfault", "died handling this call (SIGSEGV)"),
        ("exit", "exit:3", "exited with code 3 handling this call"),
        (
            "spin",
            "spin",
            "passed its deadline of 2000 ms handling this call and was killed",
        ),
        (
            "alloc",
            "alloc",
            "it wrote: memory allocation of 16777216 bytes failed",
        ),
    ];
    run(dir.path(), "good-0", "ok");
    for (n, (id, behaviour, _)) in crashes.iter().enumerate() {
        run(dir.path(), id, behaviour);
        run(dir.path(), &format!("good-{}", n + 1), "ok");
    }
    let done = host(dir.path())
        .args(["--test-mode", "--domain", &probe_lib()])
        .output()
        .expect_code(0);
    assert!(done.stdout().contains("completed"), "{}", done.stdout());
    let log = done.stderr();
    let store = sqlite(dir.path());
    for n in 0..=crashes.len() {
        assert!(
            ran(store.as_ref(), &format!("good-{n}")),
            "good-{n}:\n{log}"
        );
    }
    let dead: BTreeMap<String, String> = store
        .dead_letters(None)
        .unwrap()
        .into_iter()
        .map(|d| (d.stream.replace("probe::probe:command-", ""), d.error))
        .collect();
    for (id, _, reason) in crashes {
        assert!(!ran(store.as_ref(), id), "{id} never completes");
        let error = dead
            .get(id)
            .unwrap_or_else(|| panic!("{id} dead-lettered: {dead:?}"));
        assert!(error.contains(reason), "{id}: {error}");
    }
    assert_eq!(dead.len(), crashes.len(), "{dead:?}");
    // Every crash (two attempts each) lost its worker; the next call started another.
    let started = workers_started(&log);
    assert!(started.len() > 2 * crashes.len(), "{started:?}\n{log}");
    // The plugin's own log lines come through the worker, with the plugin named as in-process.
    assert!(
        log.contains("probe good-0 attempt 1: ok plugin=\"libfixture_domain.so\""),
        "{log}"
    );
}

#[test]
fn unbounded_allocation_under_a_memory_limit_kills_only_the_worker() {
    let dir = configured(ISOLATED);
    run(dir.path(), "hoard", "alloc");
    let mut server = host(dir.path()).args(["--domain", &probe_lib()]).spawn();
    server.wait_for(&["worker process lost", "memory allocation of"], LIMIT);
    // The host never held that memory: its peak is a fraction of the worker's limit.
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(peak_kib < 200 * 1024, "host peak {peak_kib} KiB");
    run(dir.path(), "after", "ok");
    let store = sqlite(dir.path());
    wait_until(LIMIT, "a message after the crash handled", || {
        ran(store.as_ref(), "after")
    });
    server.signal(libc::SIGTERM);
    let (code, _) = server.wait();
    assert_eq!(code, Some(0));
}

#[test]
fn a_call_past_its_handlers_deadline_is_killed_and_its_worker_reaped() {
    // The handler's own deadline, not the server's, decides when its worker is killed.
    let config = ISOLATED
        .replace("max_retries = 1", "max_retries = 0")
        .replace("handler_timeout_ms = 2000", "handler_timeout_ms = 600000")
        + "[server.handlers.runner]\nhandler_timeout_ms = 1500\n";
    let dir = configured(&config);
    run(dir.path(), "forever", "spin");
    let mut server = host(dir.path()).args(["--domain", &probe_lib()]).spawn();
    let first = server.wait_for(&["worker process started"], LIMIT);
    let lost = server.wait_for(
        &["worker process lost", "passed its deadline of 1500 ms"],
        LIMIT,
    );
    let pid = workers_started(&first)[0];
    assert!(lost.contains(&format!("pid={pid}")), "{lost}");
    assert!(!alive(pid), "the spinning worker {pid} is gone");
    run(dir.path(), "next", "ok");
    let next = server.wait_for(&["worker process started"], LIMIT);
    assert_ne!(workers_started(&next), vec![pid], "a new worker");
    let store = sqlite(dir.path());
    wait_until(LIMIT, "the next message handled", || {
        ran(store.as_ref(), "next")
    });
    server.signal(libc::SIGTERM);
    let (code, _) = server.wait();
    assert_eq!(code, Some(0));
}

#[test]
fn a_call_past_its_cpu_limit_is_killed_by_the_kernel() {
    let config = ISOLATED
        .replace("max_retries = 1", "max_retries = 0")
        .replace("handler_timeout_ms = 2000", "handler_timeout_ms = 60000")
        + "cpu_limit_seconds = 1\n";
    let dir = configured(&config);
    run(dir.path(), "burn", "spin");
    host(dir.path())
        .args(["--test-mode", "--domain", &probe_lib()])
        .output()
        .expect_code(0);
    let dead = sqlite(dir.path()).dead_letters(None).unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .error
            .contains("died handling this call (SIGXCPU: past its CPU time limit)"),
        "{}",
        dead[0].error
    );
}

#[test]
fn a_killed_host_leaves_no_worker_behind() {
    let dir =
        configured(&ISOLATED.replace("handler_timeout_ms = 2000", "handler_timeout_ms = 600000"));
    run(dir.path(), "busy", "spin");
    let mut server = host(dir.path()).args(["--domain", &probe_lib()]).spawn();
    let started = server.wait_for(&["worker process started"], LIMIT);
    server.wait_for(&["probe busy attempt 1"], LIMIT);
    let pid = workers_started(&started)[0];
    assert!(alive(pid));
    server.signal(libc::SIGKILL);
    server.wait();
    wait_until(
        Duration::from_secs(10),
        "the worker to die with its host",
        || !alive(pid),
    );
}

#[test]
fn the_sample_flow_runs_isolated_with_its_host_services_answered_by_the_host() {
    let dir = configured("[server]\nisolation = \"process\"\n");
    send_orders(dir.path(), 0, 20);
    let done = host(dir.path())
        .args(["--test-mode", "--domain"])
        .args([sample_domain()])
        .output()
        .expect_code(0);
    assert!(done.stderr().contains("isolated=true"), "{}", done.stderr());
    each_order_exactly_once(sqlite(dir.path()).as_ref(), 20);
}

#[test]
fn a_reload_starts_a_new_worker_and_stops_the_old_one_after_its_calls() {
    let next_build = reload_fixture(ReloadBuild::Variant);
    let dir = configured("[server]\nisolation = \"process\"\n[server.health]\nport = 0\n");
    let lib_dir = dir.path().join("lib");
    std::fs::create_dir(&lib_dir).unwrap();
    let library = lib_dir.join("libsample_domain.so");
    std::fs::copy(sample_domain(), &library).unwrap();
    let mut server = host(dir.path())
        .args(["--reload", "--domain", &library.display().to_string()])
        .spawn();
    let first = server.wait_for(&["worker process started"], LIMIT);
    server.wait_for(&["engine started"], LIMIT);
    send_orders(dir.path(), 0, 5);
    let store = sqlite(dir.path());
    wait_until(LIMIT, "the first orders shipped", || {
        crate::support::count_of(
            store.as_ref(),
            "fulfilment::order",
            "Fulfilment.OrderShipped.v1",
        ) == 5
    });
    let staged = library.with_extension("so.new");
    std::fs::copy(next_build, &staged).unwrap();
    std::fs::rename(&staged, &library).unwrap();
    let second = server.wait_for(&["worker process started"], LIMIT);
    assert_ne!(workers_started(&first), workers_started(&second));
    server.wait_for(&["reloaded", "generation=2"], LIMIT);
    let old = workers_started(&first)[0];
    server.wait_for(&["worker process stopped", &format!("pid={old}")], LIMIT);
    send_orders(dir.path(), 5, 5);
    wait_until(LIMIT, "the next orders shipped by the new build", || {
        crate::support::count_of(
            store.as_ref(),
            "fulfilment::order",
            "Fulfilment.OrderShipped.v1",
        ) == 10
    });
    server.signal(libc::SIGTERM);
    let (code, _) = server.wait();
    assert_eq!(code, Some(0));
    each_order_exactly_once(store.as_ref(), 10);
}

#[test]
fn a_domain_that_cannot_start_in_its_worker_is_the_same_one_line_as_in_process() {
    let dir = configured("[server]\nisolation = \"process\"\n");
    let broken = host(dir.path())
        .args(["--test-mode", "--domain"])
        .args([format!("{}:broken", fixture_domain().display())])
        .output()
        .expect_code(1);
    assert_eq!(broken.error_lines(), [format!(
        "error: domain instance \"broken\" of {} failed to start: domain \"broken\" is invalid: two handlers are named \"twice\"; handler names must be unique",
        fixture_domain().display()
    )]);
    let lib = sample_domain().display().to_string();
    let unknown = host(dir.path())
        .args(["--test-mode", "--domain", &format!("{lib}:nope")])
        .output()
        .expect_code(1);
    assert_eq!(unknown.error_lines(), [format!(
        "error: {lib} has no domain instance \"nope\"; available: domain, reporting; choose one with --domain={lib}:NAME"
    )]);
}

/// Isolated too, a build that aborts while it loads (an ELF initialiser, its constructor) or whose
/// constructor never returns is probed first: one line naming how the probe died and exit code 1,
/// within `probe_timeout_seconds`, and no worker is started for it.
#[test]
fn a_build_that_crashes_or_hangs_while_loading_is_the_same_one_line_isolated() {
    let dir = configured("[server]\nisolation = \"process\"\nprobe_timeout_seconds = 3\n");
    let pid_file = dir.path().join("probe.pid");
    for which in BadBuild::ALL {
        let lib = bad_build(which);
        let started = std::time::Instant::now();
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
        if which == BadBuild::HangInConstructor {
            assert!(
                took >= Duration::from_secs(3) && took < Duration::from_secs(20),
                "the 3 s probe limit ends it, not the worker's 30 s start limit: {took:?}"
            );
            assert_probe_gone(&pid_file);
        }
    }
}

/// Under --reload in isolated mode, new builds that abort or hang while they load are refused, each
/// with one ERROR line, before any worker is started for them; the running build's workers carry on:
/// an order sent after each refusal is handled.
#[test]
fn reload_refuses_builds_that_crash_or_hang_and_the_running_workers_carry_on() {
    for which in BadBuild::ALL {
        bad_build(which);
    }
    let dir = configured(
        "[server]\nisolation = \"process\"\npoll_interval_ms = 50\nprobe_timeout_seconds = 3\n[server.health]\nport = 0\n",
    );
    let lib_dir = dir.path().join("lib");
    std::fs::create_dir(&lib_dir).unwrap();
    let library = lib_dir.join("libsample_domain.so");
    std::fs::copy(sample_domain(), &library).unwrap();
    let pid_file = dir.path().join("probe.pid");
    let mut server = host(dir.path())
        .env("BAD_DOMAIN_PID_FILE", &pid_file)
        .args(["--reload", "--domain", &library.display().to_string()])
        .spawn();
    server.wait_for(&["worker process started"], LIMIT);
    server.wait_for(&["engine started"], LIMIT);
    let store = sqlite(dir.path());
    let shipped = || {
        crate::support::count_of(
            store.as_ref(),
            "fulfilment::order",
            "Fulfilment.OrderShipped.v1",
        )
    };
    for (n, which) in BadBuild::ALL.into_iter().enumerate() {
        let staged = library.with_extension("so.new");
        std::fs::copy(bad_build(which), &staged).unwrap();
        std::fs::rename(&staged, &library).unwrap();
        let refused = server.wait_for(&["reload failed; the running build carries on"], LIMIT);
        assert!(
            refused.contains("ERROR") && refused.contains(which.refusal()),
            "{which:?}: {refused}"
        );
        if which == BadBuild::HangInConstructor {
            assert_probe_gone(&pid_file);
        }
        send_orders(dir.path(), n, 1);
        wait_until(
            LIMIT,
            "the running build's workers to ship the order sent after the refusal",
            || shipped() > n,
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
    assert!(
        !logs.contains("generation=2"),
        "no bad build replaced the running one:\n{logs}"
    );
    each_order_exactly_once(store.as_ref(), 3);
}

#[test]
fn a_bad_isolation_value_is_refused_in_one_line() {
    let dir = configured("[server]\nisolation = \"thread\"\n");
    let refused = host(dir.path())
        .args(["--test-mode", "--domain", &probe_lib()])
        .output()
        .expect_code(1);
    assert_eq!(
        refused.error_lines(),
        vec!["error: config file protean.toml: server.isolation: unknown variant `thread`, expected `none` or `process`"],
        "{}",
        refused.stderr()
    );
    assert_eq!(refused.stderr().lines().count(), 1, "{}", refused.stderr());
}
