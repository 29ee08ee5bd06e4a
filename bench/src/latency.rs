//! Latency from commit to handled at a steady 1,000 messages/s, on a long-running server (not test
//! mode), measured from what the store holds at the end, never from the host's own counters.
//!
//! - PostgreSQL + Redis (what issue #21 asks): a writer in this process commits `Ticked` events with
//!   their outbox rows into a durable PostgreSQL cluster, as a client's writes would; the server's
//!   outbox publishes them to Redis; the `noop` event handler handles them and commits its processed
//!   markers. Latency is a marker's `processed_at` (the server's clock as the handler's unit began to
//!   commit) minus the message's `time` (stamped just before the writer's commit began, so the
//!   writer's own commit is inside the figure). The entry's id (Redis's clock) splits it in two. Run
//!   with the default `poll_interval_ms` and with 1 ms: the writer is another process, so the server's
//!   outbox learns of its rows only by polling (see the row's setup).
//! - Redis with the SQLite store: the bench adds `Step` commands to the command stream on Redis
//!   (the `runner` handler moved to it); the command handler raises `Hopped` (a commit with an outbox
//!   row, which wakes the server's own outbox); the `chain` event handler handles it. Latency is its
//!   marker's time minus the time the event was raised, both by the server's clock.

use std::{
    fs::File,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use protean_host::{
    message,
    message::Kind,
    store::{PostgresStore, Store},
    unit_of_work::{NewMessage, UnitOfWork},
};
use serde_json::json;

use crate::{postgres::cluster::PgServer, Redis, Row};

/// Messages per second.
const RATE: u32 = 1000;
/// Messages measured: several seconds at `RATE`.
const COUNT: usize = 5000;
/// Messages sent first and not measured: the server's connections and statements warm up.
const WARMUP: usize = 500;

pub(crate) fn rows(host: &Path, fixture: &Path) -> anyhow::Result<Vec<Row>> {
    Ok(vec![
        pg_redis_latency(host, fixture, None)?,
        pg_redis_latency(host, fixture, Some(1))?,
        redis_latency(host, fixture)?,
    ])
}

/// A `protean-host` server, stopped when dropped (also when a measurement fails half-way).
struct Server {
    child: Child,
    peak: Option<std::thread::JoinHandle<u64>>,
    log: std::path::PathBuf,
}

impl Server {
    /// `protean-host --domain DOMAIN` in `dir` (with its `protean.toml`), logging to `dir/server.log`.
    fn start(host: &Path, dir: &Path, domain: &str) -> anyhow::Result<Self> {
        let log = dir.join("server.log");
        let child = Command::new(host)
            .current_dir(dir)
            .args(["--log-level", "warn", "--domain", domain])
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("start protean-host")?;
        let peak = Some(crate::peak_memory(child.id()));
        Ok(Self { child, peak, log })
    }

    /// The server's user and system time so far (`/proc/PID/stat`), while it runs.
    fn cpu(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // The fields after the command's closing parenthesis; utime and stime are the 14th and 15th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("unreadable stat")?
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        // SAFETY: sysconf reads a constant of the system.
        #[allow(unsafe_code)]
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
    }

    /// Stop it gracefully; its peak memory in MB.
    fn stop(mut self) -> anyhow::Result<f64> {
        let status = self.terminate()?;
        if !status.success() {
            bail!("protean-host exited with {status}: {}", self.log_tail());
        }
        let peak = self.peak.take().map_or(0, |p| p.join().unwrap_or(0));
        Ok(peak as f64 / 1024.0)
    }

    /// SIGTERM, then SIGKILL if it has not stopped within its shutdown grace and some.
    fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: kill(2) on our own child, not yet reaped; SIGTERM asks for a graceful stop.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM)
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// The end of its log, for an error.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// PostgreSQL + Redis: `COUNT` events committed by this process at `RATE`, through the server's
/// outbox, Redis and the no-op handler. `poll_ms` sets `[server] poll_interval_ms` (default 1,000).
fn pg_redis_latency(host: &Path, fixture: &Path, poll_ms: Option<u64>) -> anyhow::Result<Row> {
    let pg = PgServer::durable();
    let redis = Redis::start()?;
    let store = PostgresStore::connect(&pg.store_config())?;
    store.setup()?;
    let dir = tempfile::tempdir()?;
    let uri = format!("redis://127.0.0.1:{}/0", redis.port);
    let poll = poll_ms.map_or(String::new(), |ms| format!("poll_interval_ms = {ms}\n"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    std::fs::write(
        dir.path().join("protean.toml"),
        format!(
            "[server]\n{poll}[server.health]\nport = {port}\n{}[brokers.default]\nuri = \"{uri}\"\n",
            pg.config()
        ),
    )?;
    let server = Server::start(host, dir.path(), &format!("{}:noop", fixture.display()))?;
    let mut conn = redis::Client::open(uri.as_str())?.get_connection()?;
    wait_for_groups(&mut conn, &["probe::probe"], &server)?;
    let mut db = postgres::Client::connect(&pg.uri(), postgres::NoTls)?;
    commit_steadily(&store, 0, WARMUP)?;
    wait_for_markers(&mut db, WARMUP, &server)?;
    let cpu_before = server.cpu()?;
    let loop_before = Loop::scrape(port)?;
    let started = Instant::now();
    let mut commits = commit_steadily(&store, WARMUP, COUNT)?;
    wait_for_markers(&mut db, WARMUP + COUNT, &server)?;
    let cpu = (server.cpu()? - cpu_before).as_secs_f64() / started.elapsed().as_secs_f64();
    let consumer = Loop::scrape(port)?.since(&loop_before);
    let rss_mb = server.stop()?;
    let stages = Stages::measure(&mut db, &mut conn, WARMUP)?;
    let mut handled = stages.handled;
    anyhow::ensure!(
        handled.len() == COUNT,
        "{} of {COUNT} messages have a marker and a stream entry",
        handled.len()
    );
    anyhow::ensure!(
        stages.outbox_rows == 0,
        "{} outbox rows are left after every message was handled (a published row is deleted)",
        stages.outbox_rows
    );
    let (p50, p95, p99, max) = (
        quantile(&mut handled, 0.50),
        quantile(&mut handled, 0.95),
        quantile(&mut handled, 0.99),
        quantile(&mut handled, 1.0),
    );
    let poll = poll_ms.map_or("default poll_interval_ms (1,000)".into(), |ms| {
        format!("poll_interval_ms = {ms}")
    });
    let split = [
        stage("commit → XADD", stages.added),
        stage("XADD → handled", stages.consumed),
    ]
    .join("; ");
    Ok(Row {
        scenario: format!("PostgreSQL + Redis latency, commit to handled, {poll}"),
        setup: format!(
            "{COUNT} events at a steady {RATE}/s (after {WARMUP} unmeasured), committed by another process with outbox rows (durable cluster; its commits p50 {:.2} ms, p99 {:.2} ms, included); server: outbox, Redis, no-op handler, marker commit; from the store: marker processed_at − message time; stages (XADD time from the entry id, ms): {split}; {consumer}",
            quantile(&mut commits, 0.50),
            quantile(&mut commits, 0.99),
        ),
        result: format!(
            "p50 {p50:.2} ms, p95 {p95:.2} ms, p99 {p99:.2} ms (max {max:.1} ms); server CPU {:.0}% of a core, peak memory {rss_mb:.1} MB",
            cpu * 100.0
        ),
        target: "p99 ≤ 10 ms".into(),
        ok: p99 <= 10.0,
    })
}

/// Where each measured message's time went, in ms, one value per message in each: from the
/// message's time (its commit) to handled (its marker's `processed_at`); to the XADD (Redis's clock,
/// the entry id, ms); from the XADD to handled. And the outbox rows left (none, once all is handled).
struct Stages {
    handled: Vec<f64>,
    added: Vec<f64>,
    consumed: Vec<f64>,
    outbox_rows: i64,
}

impl Stages {
    fn measure(
        db: &mut postgres::Client,
        conn: &mut redis::Connection,
        from: usize,
    ) -> anyhow::Result<Self> {
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg("probe::probe")
            .arg("-")
            .arg("+")
            .query(conn)?;
        let mut added = std::collections::HashMap::new();
        for entry in &entries.ids {
            let wire: String = entry.get("data").context("an entry without data")?;
            let wire: serde_json::Value = serde_json::from_str(&wire)?;
            let n = wire["data"]["n"].as_i64().context("an entry without n")?;
            let ms: f64 = entry
                .id
                .split('-')
                .next()
                .and_then(|ms| ms.parse().ok())
                .context("an entry id without time")?;
            added.insert(n, ms);
        }
        let rows = db.query(
            "SELECT (m.data->>'n')::bigint, \
                    (extract(epoch FROM m.time AT TIME ZONE 'utc') * 1000)::float8, \
                    (extract(epoch FROM p.processed_at) * 1000)::float8 \
             FROM message_store.messages m \
             JOIN protean.processed p ON p.message_id = m.stream_name || '@' || m.position \
             WHERE (m.data->>'n')::bigint >= $1",
            &[&(from as i64)],
        )?;
        let mut stages = Self {
            handled: Vec::new(),
            added: Vec::new(),
            consumed: Vec::new(),
            outbox_rows: db
                .query_one("SELECT count(*) FROM protean.outbox", &[])?
                .get(0),
        };
        for row in rows {
            let (n, time, handled): (i64, f64, f64) = (row.get(0), row.get(1), row.get(2));
            let Some(&xadd) = added.get(&n) else { continue };
            stages.handled.push(handled - time);
            stages.added.push(xadd - time);
            stages.consumed.push(handled - xadd);
        }
        Ok(stages)
    }
}

/// The consumer's loop, from the server's `/metrics`: batches committed, and time by phase (seconds).
struct Loop {
    batches: f64,
    phases: Vec<(String, f64)>,
}

impl Loop {
    fn scrape(port: u16) -> anyhow::Result<Self> {
        let answer =
            crate::ops::fetch(port, "/metrics").context("the server's /metrics did not answer")?;
        let mut scraped = Self {
            batches: 0.0,
            phases: Vec::new(),
        };
        for line in answer.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if name.starts_with("protean_batch_duration_seconds_count") {
                scraped.batches += value;
            } else if let Some(labels) = name.strip_prefix("protean_subscription_seconds_total{") {
                let phase = labels
                    .split_once("phase=\"")
                    .and_then(|(_, rest)| rest.split_once('"'))
                    .map_or("?", |(phase, _)| phase);
                match scraped.phases.iter_mut().find(|(p, _)| p == phase) {
                    Some((_, total)) => *total += value,
                    None => scraped.phases.push((phase.to_owned(), value)),
                }
            }
        }
        Ok(scraped)
    }

    /// What happened between `before` and this scrape.
    fn since(mut self, before: &Self) -> Self {
        self.batches -= before.batches;
        for (phase, seconds) in &mut self.phases {
            let earlier = before.phases.iter().find(|(p, _)| p == phase);
            *seconds -= earlier.map_or(0.0, |(_, s)| *s);
        }
        self
    }
}

impl std::fmt::Display for Loop {
    /// `consumer: 2,500 batches; per batch: commit 1.9 ms, idle 0.1 ms, ...`, busiest phase first.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut phases = self.phases.clone();
        phases.sort_by(|a, b| b.1.total_cmp(&a.1));
        let batches = self.batches.max(1.0);
        let per_batch: Vec<String> = phases
            .iter()
            .map(|(phase, s)| format!("{phase} {:.2} ms", s * 1e3 / batches))
            .collect();
        write!(
            f,
            "consumer: {:.0} batches, per batch: {}",
            self.batches,
            per_batch.join(", ")
        )
    }
}

/// `name p50 X ms, p99 Y ms`.
fn stage(name: &str, mut values: Vec<f64>) -> String {
    format!(
        "{name} p50 {:.1} ms, p99 {:.1} ms",
        quantile(&mut values, 0.50),
        quantile(&mut values, 0.99)
    )
}

/// The `q` quantile of `values`, in the values' unit.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    values
        .get(((values.len().max(1) - 1) as f64 * q) as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Commit ticks `from..from + count` at `RATE`, each when it is due: one unit of work holds the ticks
/// due by the time the previous commit returned (one, unless a commit took longer than 1/RATE), each
/// stamped as its unit is built. The commits' durations in ms.
fn commit_steadily(store: &PostgresStore, from: usize, count: usize) -> anyhow::Result<Vec<f64>> {
    let started = Instant::now();
    let mut sent = 0;
    let mut durations = Vec::new();
    while sent < count {
        let due = ((started.elapsed().as_secs_f64() * f64::from(RATE)) as usize + 1).min(count);
        if due <= sent {
            let next = started + Duration::from_secs_f64(sent as f64 / f64::from(RATE));
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            continue;
        }
        let messages = (from + sent..from + due).map(crate::tick).collect();
        let commit = Instant::now();
        store.commit(&UnitOfWork {
            messages,
            publish: true,
            ..UnitOfWork::default()
        })?;
        durations.push(commit.elapsed().as_secs_f64() * 1e3);
        sent = due;
    }
    Ok(durations)
}

/// Wait until the store holds `count` processed markers.
fn wait_for_markers(
    db: &mut postgres::Client,
    count: usize,
    server: &Server,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let markers: i64 = db
            .query_one("SELECT count(*) FROM protean.processed", &[])?
            .get(0);
        if markers as usize >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "only {markers} of {count} messages handled: {}",
                server.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Redis with the SQLite store: `COUNT` `Step` commands added to the command stream at `RATE`.
fn redis_latency(host: &Path, fixture: &Path) -> anyhow::Result<Row> {
    let redis = Redis::start()?;
    let dir = tempfile::tempdir()?;
    let uri = format!("redis://127.0.0.1:{}/0", redis.port);
    // Commands are read from the store by default; this row sends them through Redis.
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("[brokers.default]\nuri = \"{uri}\"\n[server.handlers.runner]\nsubscription_type = \"stream\"\n"),
    )?;
    let server = Server::start(host, dir.path(), &format!("{}:probe", fixture.display()))?;
    let mut conn = redis::Client::open(uri.as_str())?.get_connection()?;
    wait_for_groups(
        &mut conn,
        &["probe::probe:command", "probe::probe"],
        &server,
    )?;
    send_steadily(&mut conn, COUNT)?;
    let store = dir.path().join(".protean/store.db");
    let mut latencies = wait_for_handled(&store, COUNT, &server)?;
    let rss_mb = server.stop()?;
    let (p50, p95, p99) = (
        quantile(&mut latencies, 0.50),
        quantile(&mut latencies, 0.95),
        quantile(&mut latencies, 0.99),
    );
    Ok(Row {
        scenario: "Redis latency, commit to handled".into(),
        setup: format!("{COUNT} events at a steady {RATE}/s, SQLite store: a command handler (on Redis) commits, the outbox publishes, an event handler commits; server clock"),
        result: format!("p50 {p50:.2} ms, p95 {p95:.2} ms, p99 {p99:.2} ms; server peak memory {rss_mb:.1} MB"),
        target: "p99 ≤ 5 ms".into(),
        ok: p99 <= 5.0,
    })
}

/// The server is ready when the consumer groups of `streams` exist.
fn wait_for_groups(
    conn: &mut redis::Connection,
    streams: &[&str],
    server: &Server,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for stream in streams {
        while redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query::<Vec<redis::Value>>(conn)
            .map_or(true, |groups| groups.is_empty())
        {
            if Instant::now() > deadline {
                bail!(
                    "the server did not create a group on {stream}: {}",
                    server.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// One command every 1/RATE seconds, on schedule (a late one does not delay the next ones).
fn send_steadily(conn: &mut redis::Connection, count: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    for i in 0..count {
        let due = started + Duration::from_secs_f64(i as f64 / f64::from(RATE));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let chain = format!("lat{i}");
        let command = NewMessage::new(
            Kind::Command,
            &format!("probe::probe:command-{chain}-0"),
            "Probe.Step.v1",
            &json!({"chain": chain, "n": 0, "depth": 1}),
            None,
            None,
            None,
        );
        let wire = message::wire_json(&command.data, &command.metadata, 0, 0)?;
        redis::cmd("XADD")
            .arg("probe::probe:command")
            .arg("*")
            .arg("data")
            .arg(wire)
            .query::<String>(conn)?;
    }
    Ok(())
}

/// Wait until the event handler has handled `count` events; their latencies in ms.
fn wait_for_handled(store: &Path, count: usize, server: &Server) -> anyhow::Result<Vec<f64>> {
    let db =
        rusqlite::Connection::open_with_flags(store, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let handled: usize = db.query_row(
            "SELECT count(*) FROM processed WHERE subscription = 'chain'",
            [],
            |row| row.get(0),
        )?;
        if handled >= count {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {handled} of {count} events handled: {}",
                server.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut statement = db.prepare(
        "SELECT m.time, p.processed_at FROM processed p JOIN messages m \
         ON m.stream_name || '@' || m.position = p.message_id WHERE p.subscription = 'chain'",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
    })?;
    let mut latencies = Vec::with_capacity(count);
    for row in rows {
        let (raised, handled) = row?;
        let (Some(raised), Some(handled)) =
            (message::parse_time(&raised), message::parse_time(&handled))
        else {
            bail!("unreadable times {raised:?}, {handled:?}");
        };
        latencies.push((handled - raised).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3);
    }
    Ok(latencies)
}
