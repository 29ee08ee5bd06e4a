//! Ordered subscriptions: what per-key ordering costs against the unordered stream subscription on the
//! same entries in the same run, and how fast a dead replica's keys are served again.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use anyhow::Context;
use protean_host::{
    message::{wire_json, Kind},
    store::{SqliteStore, Store},
    unit_of_work::NewMessage,
};
use serde_json::json;

use crate::{run_measured, server, store_ticks, Measured, Redis, Row};

/// `events` ticks on 1,000 streams published once, then consumed from fresh stores by the no-op
/// handler twice: unordered (consumer group) and ordered by stream (1,000 keys). Best of three each.
pub(crate) fn ordered_vs_unordered(
    host: &Path,
    fixture: &Path,
    events: usize,
) -> anyhow::Result<Row> {
    let redis = Redis::start()?;
    let config = format!(
        "[brokers.default]\nuri = \"redis://127.0.0.1:{}/0\"\n",
        redis.port
    );
    let run = |instance: &str, dir: &Path| -> anyhow::Result<Measured> {
        std::fs::write(dir.join("protean.toml"), &config)?;
        run_measured(server(
            host,
            dir,
            &format!("{}:{instance}", fixture.display()),
        ))
    };
    let publisher = tempfile::tempdir()?;
    store_ticks(publisher.path(), events, true)?;
    run("empty", publisher.path())?;
    let (mut unordered, mut ordered): (Option<Measured>, Option<Measured>) = (None, None);
    for _ in 0..3 {
        // A fresh store each time: the processed markers of an earlier run would be skipped, not handled.
        for (instance, best) in [("noop", &mut unordered), ("ordered_noop", &mut ordered)] {
            crate::redis_cli(&redis, &["DEL", "protean:ordered:noop:positions"])?;
            crate::redis_cli(&redis, &["XGROUP", "DESTROY", "probe::probe", "noop"])?;
            let dir = tempfile::tempdir()?;
            let measured = run(instance, dir.path())?;
            if best.as_ref().is_none_or(|b| measured.elapsed < b.elapsed) {
                *best = Some(measured);
            }
        }
    }
    let (ordered, unordered) = (ordered.context("no run")?, unordered.context("no run")?);
    let rate = |m: &Measured| events as f64 / m.elapsed.as_secs_f64();
    let cpu = |m: &Measured| m.cpu.as_secs_f64() * 1e6 / events as f64;
    let ratio = rate(&ordered) / rate(&unordered);
    Ok(Row {
        scenario: "Ordered consume, no-op handler, 1,000 keys".into(),
        setup: format!("{events} entries on one stream over 1,000 streams (keys); one replica, 32 partitions; unordered consumer group in the same run; whole process, best of 3 each"),
        result: format!(
            "{:.0} messages/s ordered against {:.0} unordered ({:.0}%); CPU {:.1} against {:.1} µs per message",
            rate(&ordered),
            rate(&unordered),
            100.0 * ratio,
            cpu(&ordered),
            cpu(&unordered)
        ),
        target: "≥ 70% of unordered".into(),
        ok: ratio >= 0.7,
    })
}

/// Two replicas of the fixture's ordered `recorder` share 1,000 keys; one is killed with SIGKILL and
/// a message is published for every key at once: the time until every key has handled it.
pub(crate) fn rebalance(host: &Path, fixture: &Path) -> anyhow::Result<Row> {
    const KEYS: usize = 1000;
    let lease = Duration::from_millis(3000);
    let redis = Redis::start()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("protean.toml"),
        format!(
            "[brokers.default]\nuri = \"redis://127.0.0.1:{}/0\"\n[server.ordering]\nlease_ttl_ms = {}\n",
            redis.port,
            lease.as_millis()
        ),
    )?;
    let domain = format!("{}:sequencing", fixture.display());
    let mut replicas = vec![
        Replica::start(host, dir.path(), &domain)?,
        Replica::start(host, dir.path(), &domain)?,
    ];
    for replica in &mut replicas {
        replica.wait_for("partitions taken", Duration::from_secs(30))?;
    }
    let store = SqliteStore::open(&dir.path().join(".protean/store.db"))?;
    publish_seq(&redis, KEYS, 1)?;
    wait_recorded(&store, KEYS, 1, Duration::from_secs(60))?;
    let killed = Instant::now();
    replicas[0].kill();
    publish_seq(&redis, KEYS, 2)?;
    wait_recorded(&store, KEYS, 2, Duration::from_secs(60))?;
    let served = killed.elapsed();
    let target = lease + Duration::from_secs(1);
    Ok(Row {
        scenario: "Ordered rebalance after a replica dies".into(),
        setup: format!("2 replicas, {KEYS} keys, 32 partitions, lease {} ms; SIGKILL one, then one message per key: until every key handled it", lease.as_millis()),
        result: format!("{:.2} s", served.as_secs_f64()),
        target: format!("≤ lease + 1 s ({:.1} s)", target.as_secs_f64()),
        ok: served <= target,
    })
}

/// A server whose log lines can be waited for.
struct Replica {
    child: Child,
    lines: Receiver<String>,
}

impl Replica {
    fn start(host: &Path, dir: &Path, domain: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(host)
            .current_dir(dir)
            .args(["--domain", domain, "--log-level", "info"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start protean-host")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, lines })
    }

    fn wait_for(&mut self, needle: &str, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let Ok(line) = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                anyhow::bail!(
                    "no {needle:?} in the server's log within {limit:?}; it logged:\n{}",
                    seen.join("\n")
                );
            };
            if line.contains(needle) {
                return Ok(());
            }
            seen.push(line);
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `Numbered` message `seq` for each of `keys` keys, published in one pipeline.
fn publish_seq(redis: &Redis, keys: usize, seq: u64) -> anyhow::Result<()> {
    let mut conn =
        redis::Client::open(format!("redis://127.0.0.1:{}/0", redis.port))?.get_connection()?;
    let mut pipe = redis::pipe();
    for k in 0..keys {
        let data = json!({ "key": format!("k{k}"), "seq": seq });
        let stream = format!("sequencing::sequence-k{k}");
        let message = NewMessage::new(
            Kind::Event,
            &stream,
            "Sequencing.Numbered.v1",
            &data,
            None,
            None,
            None,
        );
        let global = (seq - 1) * keys as u64 + k as u64 + 1;
        let wire = wire_json(&message.data, &message.metadata, seq - 1, global)?;
        pipe.cmd("XADD")
            .arg("sequencing::sequence")
            .arg("*")
            .arg("data")
            .arg(wire)
            .ignore();
    }
    pipe.query::<()>(&mut conn)?;
    Ok(())
}

/// Wait until every key's record ends with `seq`.
fn wait_recorded(store: &dyn Store, keys: usize, seq: u64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut next = 0;
    while next < keys {
        let last = store
            .document("records", &format!("k{next}"))?
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|doc| doc["seqs"].as_array()?.last()?.as_u64());
        if last == Some(seq) {
            next += 1;
            continue;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "key k{next} did not handle #{seq} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
