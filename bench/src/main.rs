//! `protean-bench`: measures what the issues promise and prints a table (also written as Markdown to
//! `target/bench/results.md`). Run it with `scripts/bench`, which builds everything in release mode first.
//!
//! Scenarios:
//! - ABI call overhead: one handler call through the plugin ABI against a direct Rust call of the same
//!   work (decode the event, call a function that does nothing), per message, at batch sizes 1 and 100;
//! - `protean-host inspect` on the sample domain, whole process;
//! - SQLite end to end: N stored events through one handler that does nothing, whole process, with its
//!   peak memory;
//! - the sample flow: N orders from `PlaceOrder` to shipped on SQLite, whole process, peak memory;
//! - Redis: the XADD ceiling (`redis-benchmark`), outbox publishing alone, consuming alone, both at
//!   once, each as a ratio to the ceiling;
//! - latency from commit to handled at a steady 1,000 messages/s on PostgreSQL + Redis, and on Redis
//!   with SQLite (p50, p95, p99) (`latency.rs`);
//! - instructions per message (callgrind) for the SQLite no-op and the Redis consume paths;
//! - PostgreSQL: appending in batches, and a subscription end to end (`postgres.rs`); the commit ceiling
//!   of a minimal client for transactions shaped like the host's (`pg_ceiling.rs`);
//! - ordered subscriptions against unordered ones, and rebalancing after a replica dies (`ordered.rs`);
//! - isolated mode (the domain in a worker process) against in-process, SQLite no-op (`isolation.rs`);
//! - schedules: firing lateness at 1,000 due/s, the cost of 100,000 pending, 30 virtual days in test
//!   mode (`schedules.rs`);
//! - memory per message: peak RSS growth handling one message of 1, 5 and 20 MB, over its size, on
//!   SQLite and Redis (`limits.rs`).
//!
//! `--pg-statements` adds to the postgres group the statements the sample flow spent the database's time
//! in (`pg_stat_statements`, which then runs during the flow; off by default, as it costs a little).
//!
//! `--only word,word` runs the groups whose names contain a word (abi, inspect, sqlite, isolation,
//! sample, redis, ordered, latency, callgrind, ops, reload, postgres, pgceiling, peer, limits, schedules).
#![allow(missing_docs, unreachable_pub)]

mod callgrind;
mod ceiling;
mod isolation;
mod latency;
mod limits;
mod ops;
mod ordered;
mod peer;
mod pg_ceiling;
mod postgres;
mod reload;
mod schedules;

use std::{
    hint::black_box,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use ceiling::ServerTime;
use protean_host::{
    message::Kind,
    plugin::{Delivery, HostServices, Library},
    store::{SqliteStore, Store},
    unit_of_work::{NewMessage, UnitOfWork},
};
use serde::Deserialize;
use serde_json::json;

struct Row {
    scenario: String,
    setup: String,
    result: String,
    target: String,
    ok: bool,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    // Where cargo put the release build: CARGO_TARGET_DIR when the build was directed elsewhere.
    let release = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from)
        .join("release");
    let host = release.join("protean-host");
    let fixture = release.join("libfixture_domain.so");
    let sample = release.join("libsample_domain.so");
    for path in [&host, &fixture, &sample] {
        if !path.is_file() {
            bail!(
                "{} is missing; run scripts/bench (it builds the release artifacts first)",
                path.display()
            );
        }
    }
    // `--only abi,redis` runs the groups whose names contain one of the words.
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_owned).collect());
    let wanted = |group: &str| {
        only.as_ref()
            .is_none_or(|words| words.iter().any(|w| group.contains(w.as_str())))
    };
    let (events, orders) = (arg("--events", 100_000), arg("--orders", 10_000));
    // `--store-ticks DIR`: only the store the Redis rows start from (`--events` ticks with outbox
    // rows, in DIR/.protean/store.db), to profile a host's run on it by hand.
    if let Some(i) = args.iter().position(|a| a == "--store-ticks") {
        let dir = args.get(i + 1).context(
            "--store-ticks needs the directory to write the store in: --store-ticks DIR",
        )?;
        store_ticks(Path::new(dir), events, true)?;
        return Ok(());
    }
    let mut rows = Vec::new();
    if wanted("abi") {
        rows.extend(abi_overhead(&fixture)?);
    }
    if wanted("inspect") {
        rows.push(inspect(&host, &sample)?);
    }
    if wanted("sqlite") {
        rows.push(sqlite_noop(&host, &fixture, events)?);
    }
    if wanted("isolation") {
        rows.extend(isolation::call_overhead(&host, &fixture)?);
        rows.push(isolation::noop(&host, &fixture, events)?);
    }
    // Orders per second of the sample flow on Redis, for the ratio to the peer.
    let mut on_redis = None;
    if wanted("sample") || wanted("peer") {
        let redis = Redis::start()?;
        let (row, rate) = sample_flow_sqlite(&host, &sample, orders, Some(&redis))?;
        on_redis = Some(rate);
        if wanted("sample") {
            let (alone, _) = sample_flow_sqlite(&host, &sample, orders, None)?;
            rows.push(alone);
            rows.push(row);
        }
    }
    if wanted("redis") {
        rows.extend(redis_noop(&host, &fixture, events)?);
    }
    if wanted("ordered") {
        rows.push(ordered::ordered_vs_unordered(&host, &fixture, events)?);
        rows.push(ordered::rebalance(&host, &fixture)?);
    }
    if wanted("callgrind") {
        rows.extend(callgrind::hot_path(&host, &fixture, 5000)?);
    }
    if wanted("latency") {
        rows.extend(latency::rows(&host, &fixture)?);
    }
    if wanted("reload") {
        let variant = workspace().join("target/reload-bench/release/libfixture_domain.so");
        if !variant.is_file() {
            bail!(
                "{} is missing; run scripts/bench (it builds it)",
                variant.display()
            );
        }
        rows.extend(reload::swap(&host, &sample, &variant)?);
    }
    if wanted("peer") {
        // Python Protean's flow slows as its memory event store grows: a modest count (see peer.rs).
        let (row, peer) = peer::peer(arg("--peer-orders", 50))?;
        rows.push(row);
        let ours = on_redis.context("the sample flow on Redis ran first")?;
        let theirs = peer.orders_per_s;
        rows.push(Row {
            scenario: "Sample flow on Redis against Python Protean".into(),
            setup: format!(
                "orders/s of our flow ({orders} orders) over Protean's ({} orders), same run, same machine",
                peer.orders
            ),
            result: format!(
                "{:.0}× ({ours:.0} against {theirs:.1} orders/s)",
                ours / theirs
            ),
            target: "≥ 50×".into(),
            ok: ours >= 50.0 * theirs,
        });
    }
    if wanted("ops") {
        rows.extend(ops::scraped_vs_unscraped(
            &host,
            &fixture,
            arg("--ops-events", 300_000),
        )?);
    }
    if wanted("postgres") {
        let statements = args.iter().any(|a| a == "--pg-statements");
        let on_sqlite = || Ok(sample_flow_sqlite(&host, &sample, orders, None)?.1);
        let (measured, flows) = postgres::rows(
            &host, &fixture, &sample, events, orders, statements, &on_sqlite,
        )?;
        rows.extend(measured);
        let share = flows.share();
        let [before, after] = flows.sqlite;
        rows.push(Row {
            scenario: "Sample flow on PostgreSQL against SQLite".into(),
            setup: format!("orders/s of the flow ({orders} orders) on PostgreSQL (durable commits) over the same on SQLite, run right before and right after it (their geometric mean)"),
            result: format!("{share:.0}% ({:.0} against {before:.0} and {after:.0} orders/s)", flows.postgres),
            target: "≥ 50%".into(),
            ok: share >= 50.0,
        });
    }
    if wanted("pgceiling") {
        rows.extend(pg_ceiling::rows()?);
    }
    if wanted("limits") {
        rows.extend(limits::rows(&host, &fixture)?);
    }
    if wanted("schedules") {
        rows.extend(schedules::rows(&host, &fixture)?);
    }
    report(&rows)
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ sits in the workspace")
        .to_owned()
}

/// The event the fixture's `noop` handler decodes.
#[derive(Deserialize)]
#[allow(dead_code)]
struct Ticked {
    n: u64,
    label: String,
}

#[inline(never)]
fn noop(event: Ticked) -> Result<(), String> {
    black_box(event);
    Ok(())
}

pub(crate) struct NullHost;

impl HostServices for NullHost {
    fn raise_event(
        &self,
        _: u32,
        _: &str,
        _: &str,
        _: &[u8],
        _: Option<i64>,
    ) -> Result<(), String> {
        Ok(())
    }
    fn send_command(&self, _: u32, _: &str, _: &str, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn read_stream(&self, _: &str, _: u64) -> Result<Vec<u8>, String> {
        Ok(b"[]".to_vec())
    }
    fn get_document(&self, _: &str, _: &str) -> Result<Option<Vec<u8>>, String> {
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
}

fn abi_overhead(fixture: &Path) -> anyhow::Result<Vec<Row>> {
    let plugin = Library::load(fixture)?.instantiate("noop", 2)?;
    let data: Vec<String> = (0..100)
        .map(|n| json!({"n": n, "label": "tick"}).to_string())
        .collect();
    let deliveries: Vec<Delivery<'_>> = data
        .iter()
        .map(|d| Delivery {
            id: "m",
            stream: "probe::probe-1",
            message_type: "Probe.Ticked.v1",
            position: 0,
            global_position: 1,
            data: d.as_bytes(),
            metadata: b"{}",
        })
        .collect();
    let mut rows = Vec::new();
    for batch in [1usize, 100] {
        let messages = 2_000_000;
        let calls = messages / batch;
        let per_message = |elapsed: Duration| elapsed.as_nanos() as f64 / messages as f64;
        let direct = time(|| {
            for _ in 0..calls {
                for d in &deliveries[..batch] {
                    let event: Ticked = serde_json::from_slice(black_box(d.data)).expect("valid");
                    noop(event).expect("noop");
                }
            }
        });
        let abi = time(|| {
            for _ in 0..calls {
                let outcome = plugin.handle_batch(
                    "noop",
                    black_box(&deliveries[..batch]),
                    &NullHost,
                    Duration::from_secs(30),
                );
                assert_eq!(outcome.handled, batch);
            }
        });
        let overhead = per_message(abi) - per_message(direct);
        rows.push(Row {
            scenario: format!("ABI call overhead, batch {batch}"),
            setup: format!("{messages} messages; handler decodes a 2-field event; direct call {:.0} ns/msg, ABI {:.0} ns/msg", per_message(direct), per_message(abi)),
            result: format!("{overhead:.0} ns/message"),
            target: if batch == 100 { "≤ 200 ns/message".into() } else { "-".into() },
            ok: batch != 100 || overhead <= 200.0,
        });
    }
    Ok(rows)
}

fn time(f: impl FnOnce()) -> Duration {
    let started = Instant::now();
    f();
    started.elapsed()
}

fn inspect(host: &Path, sample: &Path) -> anyhow::Result<Row> {
    let mut times: Vec<Duration> = (0..21)
        .map(|_| {
            let started = Instant::now();
            let out = Command::new(host)
                .arg("inspect")
                .arg("--domain")
                .arg(sample)
                .output()
                .expect("inspect runs");
            assert!(
                out.status.success(),
                "inspect failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            started.elapsed()
        })
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    Ok(Row {
        scenario: "protean-host inspect, whole process".into(),
        setup: "sample domain (release), median of 21 runs".into(),
        result: format!("{:.1} ms", median.as_secs_f64() * 1000.0),
        target: "≤ 50 ms".into(),
        ok: median <= Duration::from_millis(50),
    })
}

/// What one run of the binary took.
struct Measured {
    elapsed: Duration,
    /// Peak resident memory.
    rss_kib: u64,
    /// User and system time: what the run cost the machine, less sensitive than wall time to
    /// whatever else the machine is doing.
    cpu: Duration,
    /// The system part of `cpu`: the kernel's work for it (syscalls, wake-ups, I/O).
    system: Duration,
    /// Bytes it wrote to files (`ru_oublock`), page by page as the kernel counts them: with a store
    /// on disk, what its commits cost in writes.
    written: u64,
    stdout: String,
}

impl Measured {
    fn rss_mb(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
}

/// Run the binary to completion.
fn run_measured(mut command: Command) -> anyhow::Result<Measured> {
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let started = Instant::now();
    let mut child = command.spawn().context("start protean-host")?;
    let peak = peak_memory(child.id());
    let stdout = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let (status, rusage) = wait4(child.id() as i32)?;
    let elapsed = started.elapsed();
    let out = reader.join().unwrap_or_default();
    if status != 0 {
        bail!("protean-host exited with status {status}: {out}");
    }
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Measured {
        elapsed,
        rss_kib: peak.join().unwrap_or(0),
        cpu: time(rusage.ru_utime) + time(rusage.ru_stime),
        system: time(rusage.ru_stime),
        written: rusage.ru_oublock as u64 * 512,
        stdout: out,
    })
}

/// The peak resident memory (KiB) of the process `pid` once it runs `protean-host`, read from
/// `/proc/PID/status` (VmHWM) every 10 ms until it exits. Not `ru_maxrss`: that also counts the
/// bench's own memory, which a child shares until its exec.
fn peak_memory(pid: u32) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                return peak;
            };
            if comm.trim() == "protean-host" {
                let hwm = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
                match hwm {
                    Some(kib) => peak = peak.max(kib),
                    // A zombie has no memory left to measure.
                    None => return peak,
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

#[allow(unsafe_code)]
fn wait4(pid: i32) -> anyhow::Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; zeroed is a valid initial value.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid out-pointers.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
    if reaped != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    Ok((libc::WEXITSTATUS(status), rusage))
}

fn server(host: &Path, dir: &Path, domain: &str) -> Command {
    let mut command = Command::new(host);
    command
        .current_dir(dir)
        .args(["--test-mode", "--log-level", "warn", "--domain", domain]);
    command
}

/// Tick `n`, for the fixture's no-op handler: an event of one of 1000 streams.
pub(crate) fn tick(n: usize) -> NewMessage {
    NewMessage::new(
        Kind::Event,
        &format!("probe::probe-{}", n % 1000),
        "Probe.Ticked.v1",
        &json!({"n": n, "label": "tick"}),
        None,
        None,
        None,
    )
}

/// Store `events` ticks for the no-op handler in `dir/.protean/store.db` (with outbox rows when
/// `publish`); returns one of them as it travels on the wire.
fn store_ticks(dir: &Path, events: usize, publish: bool) -> anyhow::Result<String> {
    let store = SqliteStore::open(&dir.join(".protean/store.db"))?;
    for chunk in (0..events).collect::<Vec<_>>().chunks(1000) {
        let messages = chunk.iter().map(|&n| tick(n)).collect();
        store.commit(&UnitOfWork {
            messages,
            publish,
            ..UnitOfWork::default()
        })?;
    }
    let sample = tick(0);
    Ok(protean_host::message::wire_json(
        &sample.data,
        &sample.metadata,
        0,
        1,
    )?)
}

fn sqlite_noop(host: &Path, fixture: &Path, events: usize) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    store_ticks(dir.path(), events, false)?;
    let run = run_measured(server(
        host,
        dir.path(),
        &format!("{}:noop", fixture.display()),
    ))?;
    let rate = events as f64 / run.elapsed.as_secs_f64();
    let rss_mb = run.rss_mb();
    Ok(Row {
        scenario: "SQLite end to end, no-op handler".into(),
        setup: format!("{events} stored events, one event handler that only decodes, 100 per batch, whole process"),
        result: format!("{rate:.0} messages/s, peak memory {rss_mb:.1} MB"),
        target: "≥ 50,000 messages/s, ≤ 64 MB".into(),
        ok: rate >= 50_000.0 && rss_mb <= 64.0,
    })
}

/// The sample flow on the embedded store alone, or with a broker (outbox, streams) when `redis` is
/// given.
fn sample_flow_sqlite(
    host: &Path,
    sample: &Path,
    orders: usize,
    redis: Option<&Redis>,
) -> anyhow::Result<(Row, f64)> {
    let dir = tempfile::tempdir()?;
    let config = redis.map_or(String::new(), |r| {
        format!(
            "[brokers.default]\nuri = \"redis://127.0.0.1:{}/0\"\n",
            r.port
        )
    });
    let store = SqliteStore::open(&dir.path().join(".protean/store.db"))?;
    let backend = if redis.is_some() { "Redis" } else { "SQLite" };
    let flow = Flow {
        backend,
        store: &store,
        config: &config,
        database_cpu: None,
    };
    sample_flow(host, sample, orders, &flow, dir.path())
}

/// Where a sample flow runs.
struct Flow<'a> {
    /// Its name in the rows.
    backend: &'a str,
    store: &'a dyn Store,
    /// protean.toml (TOML; a broker means outbox and streams).
    config: &'a str,
    /// The CPU time a database server in processes of its own has used so far, to print what the
    /// flow cost it beside the host's own CPU.
    database_cpu: Option<&'a dyn Fn() -> Duration>,
}

/// The sample flow from `orders` `PlaceOrder` commands stored in the flow's store to every order
/// shipped, by a whole `protean-host` process in `dir`. The row, and the orders per second.
fn sample_flow(
    host: &Path,
    sample: &Path,
    orders: usize,
    flow: &Flow,
    dir: &Path,
) -> anyhow::Result<(Row, f64)> {
    let Flow {
        backend,
        store,
        config,
        ..
    } = *flow;
    std::fs::write(dir.join("protean.toml"), config)?;
    let publish = config.contains("[brokers.default]");
    for chunk in (0..orders).collect::<Vec<_>>().chunks(1000) {
        let messages = chunk
            .iter()
            .map(|n| {
                let data = json!({"order_id": format!("o{n}"), "customer": "ada", "sku": "book", "quantity": 1, "total": 10.0});
                NewMessage::new(Kind::Command, &format!("fulfilment::order:command-o{n}"), "Fulfilment.PlaceOrder.v1", &data, None, None, None)
            })
            .collect();
        store.commit(&UnitOfWork {
            messages,
            publish,
            ..UnitOfWork::default()
        })?;
    }
    let database_before = flow.database_cpu.map(|cpu| cpu());
    let Measured {
        elapsed,
        rss_kib,
        cpu,
        stdout: out,
        ..
    } = run_measured(timed(server(host, dir, &sample.display().to_string())))?;
    let per_order = |d: Duration| d.as_secs_f64() * 1e6 / orders as f64;
    let mut cpu = format!("host CPU {:.0} µs/order", per_order(cpu));
    if let (Some(now), Some(before)) = (flow.database_cpu, database_before) {
        let database = now().saturating_sub(before);
        cpu += &format!(", {backend} CPU {:.0} µs/order", per_order(database));
    }
    let shipped = store
        .read_categories(&["fulfilment::order".into()], 0, usize::MAX)?
        .iter()
        .filter(|m| m.message_type == "Fulfilment.OrderShipped.v1")
        .count();
    if shipped != orders {
        bail!("only {shipped} of {orders} orders shipped:\n{out}");
    }
    let rate = orders as f64 / elapsed.as_secs_f64();
    let messages = handled_in(&out);
    let (target, min) = match backend {
        "SQLite" => ("≥ 5,000 orders/s", 5000.0),
        _ => ("-", 0.0),
    };
    let row = Row {
        scenario: format!("Sample flow on {backend}, PlaceOrder to shipped"),
        setup: format!("{orders} orders ({messages} handler calls), 8 subscriptions, 100 per batch, whole process; time of all subscriptions by phase: {}", where_time_went(&out)),
        result: format!(
            "{rate:.0} orders/s, {:.0} messages/s ({:.2} s), {cpu}, peak memory {:.1} MB",
            messages as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            rss_kib as f64 / 1024.0
        ),
        target: target.into(),
        ok: rate >= min,
    };
    println!("Sample flow on {backend}: {}", timings_of(&out));
    Ok((row, rate))
}

/// A test-mode run that also prints where each subscription's time went (`--timings`).
fn timed(mut command: Command) -> Command {
    command.arg("--timings");
    command
}

/// The `--timings` lines of a test-mode run's output.
fn timings_of(out: &str) -> String {
    out.lines()
        .skip_while(|l| !l.starts_with("time by subscription"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The phases of every subscription of a `--timings` run added up, busiest first, as shares of the
/// whole: `commit 41%, handler_reads 22%, ...`.
fn where_time_went(out: &str) -> String {
    let mut phases: Vec<(String, f64)> = Vec::new();
    for line in timings_of(out).lines().skip(1) {
        let Some((_, parts)) = line.split_once(": ") else {
            continue;
        };
        for part in parts.split(", ") {
            let mut words = part.split_whitespace();
            let (Some(phase), Some(ms)) = (
                words.next(),
                words.next().and_then(|m| m.parse::<f64>().ok()),
            ) else {
                continue;
            };
            match phases.iter_mut().find(|(p, _)| p == phase) {
                Some((_, total)) => *total += ms,
                None => phases.push((phase.to_owned(), ms)),
            }
        }
    }
    let total: f64 = phases
        .iter()
        .map(|(_, ms)| ms)
        .sum::<f64>()
        .max(f64::EPSILON);
    phases.sort_by(|a, b| b.1.total_cmp(&a.1));
    phases
        .iter()
        .map(|(phase, ms)| format!("{phase} {:.0}%", 100.0 * ms / total))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Handler calls in a test-mode run, from its summary on stdout (`  handled  N  Type` lines).
fn handled_in(summary: &str) -> u64 {
    summary
        .lines()
        .filter_map(|l| l.trim().strip_prefix("handled"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A redis-server of the benchmark's own on a free loopback port, stopped when dropped.
struct Redis {
    port: u16,
    child: std::process::Child,
}

impl Redis {
    fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("start redis-server (apt-get install redis-server)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { port, child })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `redis-benchmark` XADD of a message-sized entry on the same server: what Redis itself allows.
fn xadd_ceiling(redis: &Redis, payload: &str) -> anyhow::Result<f64> {
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &redis.port.to_string(),
            "-q",
            "-n",
            "200000",
            "-P",
            "100",
            "XADD",
            "ceiling",
            "*",
            "data",
            payload,
        ])
        .output()
        .context("run redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("requests per second"))
        .context("no figure from redis-benchmark")?;
    // The command (with its JSON payload) precedes the figure: take the number right before the unit.
    let before = line
        .split(" requests per second")
        .next()
        .unwrap_or_default();
    let figure = before
        .rsplit([' ', ':', '\r'])
        .next()
        .context("unreadable redis-benchmark line")?;
    Ok(figure.parse()?)
}

/// Rounds of [`redis_noop`]. With three, and the client measured after the host only, the median
/// round's consume share ranged over 64-84% in twelve runs of one build; with five, and the client on
/// both sides of the host (its two runs differed by up to 36%), over 65-74% in six runs of two builds.
const REDIS_ROUNDS: usize = 5;

/// Redis, three ways on one server: outbox publishing alone (a domain with no handlers, so the run
/// ends when the outbox is drained), consuming alone (the entries that run left, read by the no-op
/// handler), and both at once from a fresh store; each beside the XADD ceiling and the minimal client.
/// [`REDIS_ROUNDS`] rounds. Rates are the best round's: wall time on a shared machine only ever gets
/// worse than what the code allows. Ratios are the median round's, each of a host run and the
/// reference run beside it (the minimal client: right before and right after): the 2-core VM's speed
/// swings twofold within a minute, and a ratio of runs a minute apart swung with it.
fn redis_noop(host: &Path, fixture: &Path, events: usize) -> anyhow::Result<Vec<Row>> {
    let redis = Redis::start()?;
    let config = format!(
        "[brokers.default]\nuri = \"redis://127.0.0.1:{}/0\"\n",
        redis.port
    );
    let run = |dir: &Path, instance: &str| {
        std::fs::write(dir.join("protean.toml"), &config)?;
        run_measured(timed(server(
            host,
            dir,
            &format!("{}:{instance}", fixture.display()),
        )))
    };
    let (mut rounds, mut sample) = (Vec::new(), String::new());
    for _ in 0..REDIS_ROUNDS {
        redis_cli(&redis, &["FLUSHALL"])?;
        let split = tempfile::tempdir()?;
        sample = store_ticks(split.path(), events, true)?;
        let publish = run(split.path(), "empty")?;
        redis_cli(&redis, &["DEL", "ceiling"])?;
        let ceiling = xadd_ceiling(&redis, &sample)?;
        // The client runs right before the host's consume and right after: its rate beside the
        // host's is the mean of the two, so that a machine slowing down or speeding up over the
        // round (this VM's speed swings within seconds) tilts the share neither way.
        ServerTime::reset(&redis)?;
        let before = ceiling::minimal_client(&redis, &sample, events)?;
        let client_server = ServerTime::since_reset(&redis)?;
        ServerTime::reset(&redis)?;
        let consume = run(split.path(), "noop")?;
        let host_server = ServerTime::since_reset(&redis)?;
        let after = ceiling::minimal_client(&redis, &sample, events)?;
        let client = ceiling::ClientCeiling::around(before, after);
        redis_cli(&redis, &["FLUSHALL"])?;
        let fresh = tempfile::tempdir()?;
        store_ticks(fresh.path(), events, true)?;
        let both = run(fresh.path(), "noop")?;
        rounds.push(RedisRound {
            ceiling,
            client,
            publish,
            consume,
            both,
            host_server,
            client_server,
        });
    }
    let rate = |m: &Measured| events as f64 / m.elapsed.as_secs_f64();
    let median = |f: &dyn Fn(&RedisRound) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let best = |f: &dyn Fn(&RedisRound) -> &Measured| {
        rounds
            .iter()
            .map(f)
            .min_by_key(|m| m.elapsed)
            .expect("rounds were run")
    };
    let (publish, consume, both) = (
        best(&|r| &r.publish),
        best(&|r| &r.consume),
        best(&|r| &r.both),
    );
    let ceiling = median(&|r| r.ceiling);
    let (publish_share, consume_share) = (
        median(&|r| 100.0 * rate(&r.publish) / r.ceiling),
        median(&|r| 100.0 * rate(&r.consume) / r.client.consume),
    );
    let both_share = median(&|r| 100.0 * rate(&r.both) / r.ceiling);
    let cpu = |m: &Measured| {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / events as f64;
        format!(
            "{:.1} µs CPU ({:.1} system), {:.1} KiB written",
            per(m.cpu),
            per(m.system),
            m.written as f64 / 1024.0 / events as f64
        )
    };
    let each = |f: &dyn Fn(&RedisRound) -> f64| {
        rounds
            .iter()
            .map(|r| format!("{:.0}", f(r)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(vec![
        Row {
            scenario: "Redis XADD ceiling (redis-benchmark)".into(),
            setup: format!("same server, {} byte entries, pipeline 100; median of the rounds ({})", sample.len(), each(&|r| r.ceiling)),
            result: format!("{ceiling:.0} XADD/s"),
            target: "-".into(),
            ok: true,
        },
        Row {
            scenario: "Redis minimal Rust client".into(),
            setup: format!("same server, {} byte entries: XADD pipelined 100 at a time; XREADGROUP 100 + XACK; in each round run right before and right after the host's consume, and the geometric mean of the two taken", sample.len()),
            result: format!("{:.0} XADD/s, {:.0} read and acked/s (best round; rounds, before/after the host: {})", rounds.iter().map(|r| r.client.xadd).fold(0.0, f64::max), rounds.iter().map(|r| r.client.consume).fold(0.0, f64::max), rounds.iter().map(|r| format!("{:.0}/{:.0}", r.client.before, r.client.after)).collect::<Vec<_>>().join(", ")),
            target: "-".into(),
            ok: true,
        },
        Row {
            scenario: "Redis outbox publishing".into(),
            setup: format!("{events} stored events with outbox rows, no handlers: claim, XADD, delete the published rows; 500 per round; whole process; best of {REDIS_ROUNDS} rounds, share the median round's (rounds: {}%)", each(&|r| 100.0 * rate(&r.publish) / r.ceiling)),
            result: format!("{:.0} events/s ({publish_share:.0}% of the XADD ceiling), {} per event", rate(publish), cpu(publish)),
            target: "≥ 100,000 events/s, ≥ 40% of the ceiling".into(),
            ok: rate(publish) >= 100_000.0 && publish_share >= 40.0,
        },
        Row {
            scenario: "Redis consume, no-op handler".into(),
            setup: format!("{events} entries on the stream: XREADGROUP, handle, commit markers, XACK; 100 per batch; whole process; best of {REDIS_ROUNDS} rounds, share the median round's (rounds: {}%); time by phase: {}; {}", each(&|r| 100.0 * rate(&r.consume) / r.client.consume), where_time_went(&consume.stdout), server_time(&rounds, events)),
            result: format!("{:.0} messages/s ({consume_share:.0}% of the minimal client's consume), {} per message, peak memory {:.1} MB", rate(consume), cpu(consume), consume.rss_mb()),
            target: "≥ 100,000 messages/s, ≥ 70% of the minimal client".into(),
            ok: rate(consume) >= 100_000.0 && consume_share >= 70.0,
        },
        Row {
            scenario: "Redis end to end, no-op handler".into(),
            setup: format!("{events} stored events: outbox publish and consume at once in one process, best of {REDIS_ROUNDS} rounds"),
            result: format!("{:.0} messages/s ({both_share:.0}% of the XADD ceiling), peak memory {:.1} MB", rate(both), both.rss_mb()),
            target: "-".into(),
            ok: true,
        },
    ])
}

/// Redis's own command time in the median round (by the host's share): in the host's consume and in
/// the minimal client's run before it, each as a share of that run's time.
fn server_time(rounds: &[RedisRound], events: usize) -> String {
    let host_share = |r: &RedisRound| r.host_server.seconds() / r.consume.elapsed.as_secs_f64();
    let mut sorted: Vec<&RedisRound> = rounds.iter().collect();
    sorted.sort_by(|a, b| host_share(a).total_cmp(&host_share(b)));
    let Some(r) = sorted.get(sorted.len() / 2) else {
        return String::new();
    };
    let client_loop = events as f64 / r.client.before;
    format!(
        "Redis's own command time, median round: {:.2} s in the host's run ({:.0}% of it; {}), {:.2} s in the client's ({:.0}%; {})",
        r.host_server.seconds(),
        100.0 * host_share(r),
        r.host_server.per_call(),
        r.client_server.seconds(),
        100.0 * r.client_server.seconds() / client_loop,
        r.client_server.per_call()
    )
}

/// One round of [`redis_noop`]: the host's runs and the references measured beside them.
struct RedisRound {
    ceiling: f64,
    client: ceiling::ClientCeiling,
    publish: Measured,
    consume: Measured,
    both: Measured,
    /// Redis's own command time in the host's consume, and in the client's run before it.
    host_server: ServerTime,
    client_server: ServerTime,
}

fn redis_cli(redis: &Redis, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .context("run redis-cli")?;
    anyhow::ensure!(status.success(), "redis-cli {args:?} failed");
    Ok(())
}

fn report(rows: &[Row]) -> anyhow::Result<()> {
    let mut markdown =
        String::from("| scenario | setup | result | target | met |\n|---|---|---|---|---|\n");
    for r in rows {
        let met = if r.ok { "yes" } else { "NO" };
        println!(
            "{:<46} {:<36} {:<18} {}\n    {}",
            r.scenario, r.result, r.target, met, r.setup
        );
        markdown.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.scenario, r.setup, r.result, r.target, met
        ));
    }
    let out = workspace().join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.md"), markdown)?;
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| json!({"scenario": r.scenario, "setup": r.setup, "result": r.result, "target": r.target, "met": r.ok}))
        .collect();
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!(
        "\nwritten to {} and results.json",
        out.join("results.md").display()
    );
    Ok(())
}
