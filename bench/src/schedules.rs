//! Schedules (`--only schedules`), on SQLite with the fixture's no-op handler:
//! - firing lateness at 1,000 due schedules a second: from each schedule's due time to the start of
//!   the commit that fired it (both read from the store afterwards), p50/p99;
//! - what 100,000 pending schedules cost a running server: its resident memory and its CPU while idle,
//!   against the same server with none pending;
//! - a test-mode run spanning 30 virtual days (one schedule a day) on the virtual clock, whole process.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use protean_host::{
    message::Kind,
    store::{schedules::ScheduleWrite, ScheduleQuery, ScheduleState, SqliteStore, Store},
    unit_of_work::{NewMessage, UnitOfWork},
};
use serde_json::json;

use super::Row;

const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Set schedules of ticks for the no-op handler, `n` of them, the `i`th due at `due(i)`.
fn schedule_ticks(store: &dyn Store, n: usize, due: impl Fn(usize) -> i64) -> anyhow::Result<()> {
    let tick = |i: usize| {
        let data = json!({"n": i, "label": "scheduled"});
        let stream = format!("probe::probe-{}", i % 1000);
        NewMessage::new(
            Kind::Event,
            &stream,
            "Probe.Ticked.v1",
            &data,
            None,
            None,
            None,
        )
    };
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let schedules = chunk
            .iter()
            .map(|&i| ScheduleWrite::Set {
                key: format!("tick-{i}"),
                due_ms: due(i),
                message: tick(i),
            })
            .collect();
        store.commit(&UnitOfWork {
            schedules,
            ..UnitOfWork::default()
        })?;
    }
    Ok(())
}

fn noop_server(host: &Path, dir: &Path, fixture: &Path) -> anyhow::Result<Child> {
    std::fs::write(
        dir.join("protean.toml"),
        "[server.scheduler]\npoll_interval_ms = 1000\n[server.health]\nenabled = false\n",
    )?;
    Command::new(host)
        .current_dir(dir)
        .args(["--log-level", "warn", "--domain"])
        .arg(format!("{}:noop", fixture.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting protean-host")
}

#[allow(unsafe_code)]
fn stop(mut child: Child) -> anyhow::Result<()> {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait()?;
    if !status.success() {
        bail!("protean-host exited with {status}");
    }
    Ok(())
}

pub fn rows(host: &Path, fixture: &Path) -> anyhow::Result<Vec<Row>> {
    Ok(vec![
        lateness(host, fixture, 10_000)?,
        pending_cost(host, fixture, 100_000)?,
        thirty_virtual_days(host, fixture)?,
    ])
}

/// `n` schedules due 1 ms apart (1,000 a second), starting 3 s after the server starts.
fn lateness(host: &Path, fixture: &Path, n: usize) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&dir.path().join(".protean/store.db"))?;
    let first = now_ms() + 3_000;
    schedule_ticks(&store, n, |i| first + i as i64)?;
    let server = noop_server(host, dir.path(), fixture)?;
    let limit = Instant::now() + Duration::from_secs(60 + n as u64 / 1000);
    while store.schedules().counts(i64::MAX)?.pending > 0 {
        if Instant::now() > limit {
            bail!("schedules still pending after the time limit");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop(server)?;
    let all = store.schedules().list(&ScheduleQuery {
        state: Some(ScheduleState::Fired),
        limit: usize::MAX,
    })?;
    if all.len() != n {
        bail!("{} of {n} schedules fired", all.len());
    }
    let mut late: Vec<i64> = all
        .iter()
        .map(|s| s.settled_ms.unwrap_or(i64::MAX) - s.due_ms)
        .collect();
    late.sort_unstable();
    let at = |q: f64| late[((late.len() - 1) as f64 * q) as usize];
    let p99 = at(0.99);
    Ok(Row {
        scenario: "Schedule firing lateness at 1,000 due/s".into(),
        setup: format!(
            "{n} schedules due 1 ms apart on SQLite, one server; due time to the firing commit, read from the store; p50 {} ms, max {} ms",
            at(0.5),
            late[late.len() - 1]
        ),
        result: format!("p99 {p99} ms"),
        target: "p99 ≤ 50 ms".into(),
        ok: p99 <= 50,
    })
}

/// Resident memory (kB) and CPU time (user + system, clock ticks) of `pid`.
fn usage(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok((rss, ticks))
}

/// A server's memory once settled, and its CPU over `idle` after that.
#[allow(unsafe_code)]
fn idle_server(
    host: &Path,
    fixture: &Path,
    pending: usize,
    idle: Duration,
) -> anyhow::Result<(u64, f64)> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&dir.path().join(".protean/store.db"))?;
    let later = now_ms() + DAY_MS;
    schedule_ticks(&store, pending, |i| later + i as i64)?;
    let server = noop_server(host, dir.path(), fixture)?;
    // Settled: started, every subscription read to the head, a few scheduler polls done.
    std::thread::sleep(Duration::from_secs(3));
    let (_, before) = usage(server.id())?;
    std::thread::sleep(idle);
    let (rss, after) = usage(server.id())?;
    stop(server)?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_share = (after - before) as f64 / hz / idle.as_secs_f64();
    Ok((rss, cpu_share))
}

fn pending_cost(host: &Path, fixture: &Path, n: usize) -> anyhow::Result<Row> {
    let idle = Duration::from_secs(10);
    let (rss_none, cpu_none) = idle_server(host, fixture, 0, idle)?;
    let (rss_many, cpu_many) = idle_server(host, fixture, n, idle)?;
    let extra_mb = rss_many.saturating_sub(rss_none) as f64 / 1024.0;
    let extra_cpu = 100.0 * (cpu_many - cpu_none);
    Ok(Row {
        scenario: format!("{n} pending schedules, idle server"),
        setup: format!(
            "SQLite, due in a day; RSS {:.1} MB against {:.1} MB with none; idle CPU over {} s {:.2}% against {:.2}% of a core",
            rss_many as f64 / 1024.0,
            rss_none as f64 / 1024.0,
            idle.as_secs(),
            100.0 * cpu_many,
            100.0 * cpu_none
        ),
        result: format!("+{extra_mb:.1} MB, {extra_cpu:+.2}% CPU"),
        target: "≤ 32 MB; no measurable idle CPU".into(),
        ok: extra_mb <= 32.0 && extra_cpu < 0.5,
    })
}

/// Thirty schedules, one a day, fired by a test-mode run on the virtual clock.
fn thirty_virtual_days(host: &Path, fixture: &Path) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&dir.path().join(".protean/store.db"))?;
    let start = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")?.timestamp_millis();
    schedule_ticks(&store, 30, |i| start + (i as i64 + 1) * DAY_MS)?;
    let began = Instant::now();
    let out = Command::new(host)
        .current_dir(dir.path())
        .args([
            "--test-mode",
            "--clock",
            "virtual@2026-01-01T00:00:00Z",
            "--log-level",
            "warn",
        ])
        .arg("--domain")
        .arg(format!("{}:noop", fixture.display()))
        .output()?;
    let elapsed = began.elapsed();
    let summary = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !summary.contains("virtual clock moved 30d") {
        bail!(
            "the 30-day run failed: {summary}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let fired = store.schedules().counts(i64::MAX)?.pending;
    if fired != 0 {
        bail!("{fired} schedules left pending");
    }
    Ok(Row {
        scenario: "Test mode through 30 virtual days".into(),
        setup: "30 schedules a day apart, SQLite, `--test-mode --clock virtual`, whole process (start, load, fire, handle, exit)".into(),
        result: format!("{} ms", elapsed.as_millis()),
        target: "< 1 s".into(),
        ok: elapsed < Duration::from_secs(1),
    })
}
