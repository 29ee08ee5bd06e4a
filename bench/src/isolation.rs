//! Isolated mode against in-process: the SQLite no-op row run both ways, alternately, on the same
//! stored events; and the call alone (`Plugin::handle_batch` with a host that does nothing), both ways.
//! The difference per message is what a worker process costs: each batch crosses a pipe to the worker
//! and its outcome comes back.

use std::{path::Path, time::Duration};

use protean_host::plugin::{self, isolated, Delivery, Isolation};
use serde_json::json;

use crate::{run_measured, server, store_ticks, time, Measured, NullHost, Row};

/// The call alone: one handler call per batch through the ABI in this process, and through a worker
/// process of `host`, per message, at batch sizes 1 and 100.
pub fn call_overhead(host: &Path, fixture: &Path) -> anyhow::Result<Vec<Row>> {
    let bytes = plugin::read(fixture)?;
    let here = plugin::start(
        fixture,
        &bytes,
        Some("noop"),
        2,
        &Isolation::InProcess,
        None,
    )?;
    let settings = isolated::Settings {
        program: host.to_owned(),
        timeout: Duration::from_secs(30),
        memory_limit_mb: None,
        cpu_limit_seconds: None,
    };
    let worker = plugin::start(
        fixture,
        &bytes,
        Some("noop"),
        2,
        &Isolation::Process(settings),
        None,
    )?;
    let data: Vec<String> = (0..100)
        .map(|n| json!({"n": n, "label": "tick"}).to_string())
        .collect();
    let metadata = json!({"headers": {"id": "m", "type": "Probe.Ticked.v1"}}).to_string();
    let deliveries: Vec<Delivery<'_>> = data
        .iter()
        .map(|d| Delivery {
            id: "m",
            stream: "probe::probe-1",
            message_type: "Probe.Ticked.v1",
            position: 0,
            global_position: 1,
            data: d.as_bytes(),
            metadata: metadata.as_bytes(),
        })
        .collect();
    let mut rows = Vec::new();
    for batch in [1usize, 100] {
        let messages = 200_000;
        let per_message = |elapsed: Duration| elapsed.as_nanos() as f64 / messages as f64;
        let calls = |plugin: &plugin::Plugin| {
            time(|| {
                for _ in 0..messages / batch {
                    let outcome =
                        plugin.handle_batch("noop", &deliveries[..batch], &NullHost, LIMIT);
                    assert_eq!(outcome.handled, batch);
                }
            })
        };
        let (ours, theirs) = (per_message(calls(&worker)), per_message(calls(&here)));
        rows.push(Row {
            scenario: format!("Isolated call overhead, batch {batch}"),
            setup: format!("{messages} messages to the no-op handler with a host that does nothing; in-process {theirs:.0} ns/message, through a worker process {ours:.0} ns/message"),
            result: format!("{:.0} ns/message ({:.1}×)", ours - theirs, ours / theirs),
            target: "-".into(),
            ok: true,
        });
    }
    Ok(rows)
}

/// Runs of each mode; the best of each counts (a shared machine only ever makes a run slower).
const ROUNDS: usize = 3;

/// The handler deadline of a measured call: far above any call's time.
const LIMIT: Duration = Duration::from_secs(30);

pub fn noop(host: &Path, fixture: &Path, events: usize) -> anyhow::Result<Row> {
    let domain = format!("{}:noop", fixture.display());
    let (mut in_process, mut isolated) = (Best::default(), Best::default());
    for _ in 0..ROUNDS {
        in_process.add(run(host, &domain, events, "")?);
        isolated.add(run(host, &domain, events, "isolation = \"process\"\n")?);
    }
    let per_message = |d: Duration| d.as_nanos() as f64 / events as f64 / 1000.0;
    let (ours, theirs) = (per_message(isolated.wall), per_message(in_process.wall));
    let (ours_cpu, theirs_cpu) = (per_message(isolated.cpu), per_message(in_process.cpu));
    let ratio = ours / theirs;
    Ok(Row {
        scenario: "SQLite no-op, isolated mode against in-process".into(),
        setup: format!("{events} stored events, one no-op event handler, 100 per batch (one round trip to the worker per batch), whole process, best of {ROUNDS} alternating runs each; CPU: host and its workers"),
        result: format!(
            "isolated {ours:.2} µs/message ({:.0}/s), in-process {theirs:.2} µs/message ({:.0}/s): {ratio:.2}×, {:+.2} µs/message; CPU {ours_cpu:.2} against {theirs_cpu:.2} µs/message ({:.2}×)",
            1e6 / ours,
            1e6 / theirs,
            ours - theirs,
            ours_cpu / theirs_cpu,
        ),
        target: "≤ 2× in-process".into(),
        ok: ratio <= 2.0,
    })
}

/// The shortest wall time and the least CPU time of several runs.
struct Best {
    wall: Duration,
    cpu: Duration,
}

impl Default for Best {
    fn default() -> Self {
        Self {
            wall: Duration::MAX,
            cpu: Duration::MAX,
        }
    }
}

impl Best {
    fn add(&mut self, run: Measured) {
        self.wall = self.wall.min(run.elapsed);
        self.cpu = self.cpu.min(run.cpu);
    }
}

/// One whole test-mode run over freshly stored ticks with `server_keys` (TOML lines under `[server]`).
fn run(host: &Path, domain: &str, events: usize, server_keys: &str) -> anyhow::Result<Measured> {
    let dir = tempfile::tempdir()?;
    store_ticks(dir.path(), events, false)?;
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("[server]\n{server_keys}"),
    )?;
    run_measured(server(host, dir.path(), domain))
}
