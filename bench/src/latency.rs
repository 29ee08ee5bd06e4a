//! Latency from commit to handled at a steady rate, on Redis: the bench adds `Step` commands to the
//! command stream at a fixed rate; the probe domain's command handler raises `Hopped` (a commit with
//! an outbox row); the outbox publishes it; the `chain` event handler handles it and commits its
//! processed marker. Latency is that marker's time minus the time the event was raised, both taken by
//! the server's clock, so it covers the commit, the outbox, Redis and the handler.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use protean_host::{message, message::Kind, unit_of_work::NewMessage};
use serde_json::json;

use crate::{Redis, Row};

pub(crate) fn redis_latency(
    host: &Path,
    fixture: &Path,
    rate: u32,
    count: usize,
) -> anyhow::Result<Row> {
    let redis = Redis::start()?;
    let dir = tempfile::tempdir()?;
    let uri = format!("redis://127.0.0.1:{}/0", redis.port);
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("[brokers.default]\nuri = \"{uri}\"\n"),
    )?;
    let server = Command::new(host)
        .current_dir(dir.path())
        .args([
            "--log-level",
            "warn",
            "--domain",
            &format!("{}:probe", fixture.display()),
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("start protean-host")?;
    let peak = crate::peak_memory(server.id());
    let mut conn = redis::Client::open(uri.as_str())?.get_connection()?;
    wait_for_groups(&mut conn)?;
    send_steadily(&mut conn, rate, count)?;
    let store = dir.path().join(".protean/store.db");
    let latencies = wait_for_handled(&store, count);
    // SAFETY: kill(2) on our own child; SIGTERM asks for a graceful stop.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(server.id() as i32, libc::SIGTERM)
    };
    crate::wait4(server.id() as i32)?;
    let rss_mb = peak.join().unwrap_or(0) as f64 / 1024.0;
    let mut latencies = latencies?;
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    let (p50, p95, p99) = (at(0.50), at(0.95), at(0.99));
    Ok(Row {
        scenario: "Redis latency, commit to handled".into(),
        setup: format!("{count} events at a steady {rate}/s: command handler commits, outbox publishes, event handler commits; server clock"),
        result: format!("p50 {p50:.2} ms, p95 {p95:.2} ms, p99 {p99:.2} ms; server peak memory {rss_mb:.1} MB"),
        target: "p99 ≤ 5 ms".into(),
        ok: p99 <= 5.0,
    })
}

/// The server is ready when both consumer groups exist.
fn wait_for_groups(conn: &mut redis::Connection) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for stream in ["probe::probe:command", "probe::probe"] {
        while redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query::<redis::Value>(conn)
            .is_err()
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the server did not create its groups"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// One command every 1/rate seconds, on schedule (a late one does not delay the next ones).
fn send_steadily(conn: &mut redis::Connection, rate: u32, count: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    for i in 0..count {
        let due = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
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

/// Wait until the event handler has handled `count` events; their latencies in microseconds.
fn wait_for_handled(store: &Path, count: usize) -> anyhow::Result<Vec<i64>> {
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
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {handled} of {count} events handled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut statement = db.prepare(
        "SELECT m.time, p.processed_at FROM processed p JOIN messages m ON m.id = p.message_id \
         WHERE p.subscription = 'chain'",
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
            anyhow::bail!("unreadable times {raised:?}, {handled:?}");
        };
        latencies.push((handled - raised).num_microseconds().unwrap_or(i64::MAX));
    }
    Ok(latencies)
}
