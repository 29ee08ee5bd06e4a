//! Memory per message: how much a running `protean-host` grows handling one message of 1, 5 and
//! 20 MB (under a raised `server.max_message_bytes`), divided by the message's size. On SQLite (an
//! event-store subscription reads it), and on Redis: publishing it from the outbox, and consuming it
//! from the stream.
//!
//! The server is started on an empty store and left to settle (loading the library reads the whole
//! file, a transient larger than the smaller messages); then its peak RSS is reset to its current RSS
//! (`/proc/PID/clear_refs`), the message is written by this process, and the peak is read once the
//! message is handled or published. The growth is the peak over the RSS at the reset.
//!
//! The message is an event of many small objects (order lines), the shape that costs most when decoded
//! into a tree; the no-op handler decodes only its two small fields, so what is measured is the host's
//! share (a handler that decodes everything adds its own).

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use protean_host::{
    message::{wire_json, Kind},
    store::{SqliteStore, Store},
    unit_of_work::{NewMessage, UnitOfWork},
};
use serde_json::Value;

use crate::{Redis, Row};

const MB: usize = 1_000_000;

/// The sizes measured, in MB.
const SIZES: [usize; 3] = [1, 5, 20];

/// A raised limit, so that every size measured is handled; an idle subscription polls often (the
/// message comes from another process); no health server (its port would be shared).
const CONFIG: &str = "[server]\nmax_message_bytes = 67108864\npoll_interval_ms = 20\n[server.health]\nenabled = false\n";

/// The factor a message may cost, as peak growth over its size.
const TARGET: f64 = 4.0;

/// The subscription of the fixture's no-op handler, and the identity of the one message measured.
const SUBSCRIPTION: &str = "noop";
const STREAM: &str = "probe::probe-1";
const IDENTITY: &str = "probe::probe-1@0";

pub(crate) fn rows(host: &Path, fixture: &Path) -> anyhow::Result<Vec<Row>> {
    let sqlite = SIZES
        .iter()
        .map(|mb| sqlite(host, fixture, mb * MB))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let redis = Redis::start()?;
    let published = SIZES
        .iter()
        .map(|mb| publish(host, fixture, &redis, mb * MB))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let consumed = SIZES
        .iter()
        .map(|mb| consume(host, fixture, &redis, mb * MB))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let growth = "peak RSS growth of a settled server (peak reset first) / message size";
    Ok(vec![
        row("Memory per message, SQLite", &format!("one event of many small objects, written by another process, read by an event-store subscription with a no-op handler; {growth}"), &sqlite),
        row("Memory per message, Redis publish", &format!("the event, committed with its outbox row by another process, published by the outbox (no handlers); {growth}"), &published),
        row("Memory per message, Redis consume", &format!("the event's entry, added by another client, read by a stream subscription with a no-op handler; {growth}"), &consumed),
    ])
}

/// What one message cost: its size, and the growth of the server's peak RSS.
struct Cost {
    size: usize,
    growth_kib: u64,
}

impl Cost {
    fn factor(&self) -> f64 {
        self.growth_kib as f64 * 1024.0 / self.size as f64
    }
}

fn row(scenario: &str, setup: &str, costs: &[Cost]) -> Row {
    let result = costs
        .iter()
        .map(|c| {
            format!(
                "{:.0} MB: +{:.1} MB ({:.1}×)",
                c.size as f64 / MB as f64,
                c.growth_kib as f64 * 1024.0 / MB as f64,
                c.factor()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    Row {
        scenario: scenario.into(),
        setup: setup.into(),
        result,
        target: format!("≤ {TARGET:.0}×"),
        ok: costs.iter().all(|c| c.factor() <= TARGET),
    }
}

/// A `Ticked` event of stream [`STREAM`] whose data is about `bytes` long: order lines of about 50
/// bytes each.
fn event(bytes: usize) -> NewMessage {
    let mut data = String::with_capacity(bytes + 64);
    data.push_str(r#"{"n":1,"label":"big","lines":["#);
    let mut line = 0;
    while data.len() < bytes {
        if line > 0 {
            data.push(',');
        }
        data.push_str(&format!(
            r#"{{"sku":"sku-{line:07}","quantity":{},"price":{}.5}}"#,
            line % 7 + 1,
            line % 100
        ));
        line += 1;
    }
    data.push_str("]}");
    let data: Value = serde_json::from_str(&data).expect("the generated event is JSON");
    NewMessage::new(
        Kind::Event,
        STREAM,
        "Probe.Ticked.v1",
        &data,
        None,
        None,
        None,
    )
}

/// A settled server: `protean-host` running `instance` of the fixture in `dir`, once it logged
/// `ready` (a line its start ends with).
struct Server {
    child: Child,
    /// The RSS (KiB) when its peak was reset.
    base_kib: u64,
}

impl Server {
    fn start(
        host: &Path,
        fixture: &Path,
        dir: &Path,
        instance: &str,
        ready: &str,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(host)
            .current_dir(dir)
            .args(["--log-level", "info", "--domain"])
            .arg(format!("{}:{instance}", fixture.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start protean-host")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (lines, seen) = mpsc::channel();
        // Read to the end, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match seen.recv_timeout(left) {
                Ok(line) if line.contains(ready) => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    bail!("protean-host did not log {ready:?} within 30 s");
                }
            }
        }
        let pid = child.id();
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
            .context("reset the peak RSS (/proc/PID/clear_refs)")?;
        let base_kib = status_kib(pid, "VmRSS:")?;
        Ok(Self { child, base_kib })
    }

    /// Wait until `done`, then the peak's growth since the reset; the server is stopped.
    fn cost(
        mut self,
        size: usize,
        mut done: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<Cost> {
        let deadline = Instant::now() + Duration::from_secs(120);
        // Polled: the store and Redis are another process's, with nothing to wait on.
        while !done()? {
            if Instant::now() > deadline {
                bail!("the message was not handled within 120 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let peak = status_kib(self.child.id(), "VmHWM:")?;
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(Cost {
            size,
            growth_kib: peak.saturating_sub(self.base_kib),
        })
    }
}

/// A `/proc/PID/status` figure in KiB.
fn status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

fn open_store(dir: &Path) -> anyhow::Result<SqliteStore> {
    Ok(SqliteStore::open(&dir.join(".protean/store.db"))?)
}

fn sqlite(host: &Path, fixture: &Path, bytes: usize) -> anyhow::Result<Cost> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("protean.toml"), CONFIG)?;
    let store = open_store(dir.path())?;
    let message = event(bytes);
    let size = message.size();
    let server = Server::start(host, fixture, dir.path(), "noop", "subscription started")?;
    store.commit(&UnitOfWork {
        messages: vec![message],
        ..UnitOfWork::default()
    })?;
    server.cost(size, || {
        Ok(!store.processed(SUBSCRIPTION, &[IDENTITY])?.is_empty())
    })
}

fn broker_config(redis: &Redis) -> String {
    format!(
        "{CONFIG}[brokers.default]\nuri = \"redis://127.0.0.1:{}/0\"\n",
        redis.port
    )
}

/// A domain without handlers: the server only publishes what is committed with outbox rows.
fn publish(host: &Path, fixture: &Path, redis: &Redis, bytes: usize) -> anyhow::Result<Cost> {
    crate::redis_cli(redis, &["FLUSHALL"])?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("protean.toml"), broker_config(redis))?;
    let store = open_store(dir.path())?;
    let message = event(bytes);
    let size = message.size();
    let server = Server::start(
        host,
        fixture,
        dir.path(),
        "empty",
        "outbox processor started",
    )?;
    store.commit(&UnitOfWork {
        messages: vec![message],
        publish: true,
        ..UnitOfWork::default()
    })?;
    let outbox = store.outbox().context("the SQLite store keeps an outbox")?;
    // Committed before the server looks: nothing pending means published.
    server.cost(size, || Ok(outbox.counts(10)?.pending == 0))
}

fn consume(host: &Path, fixture: &Path, redis: &Redis, bytes: usize) -> anyhow::Result<Cost> {
    crate::redis_cli(redis, &["FLUSHALL"])?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("protean.toml"), broker_config(redis))?;
    let store = open_store(dir.path())?;
    let message = event(bytes);
    let size = message.size();
    let wire = wire_json(&message.data, &message.metadata, 0, 1)?;
    drop(message);
    let server = Server::start(
        host,
        fixture,
        dir.path(),
        "noop",
        "stream subscription started",
    )?;
    let mut conn =
        redis::Client::open(format!("redis://127.0.0.1:{}/0", redis.port))?.get_connection()?;
    redis::cmd("XADD")
        .arg("probe::probe")
        .arg("*")
        .arg("data")
        .arg(&wire)
        .query::<String>(&mut conn)?;
    server.cost(size, || {
        Ok(!store.processed(SUBSCRIPTION, &[IDENTITY])?.is_empty())
    })
}
