//! Isolated mode against in-process: the SQLite no-op row run both ways, alternately, on the same
//! stored events. The difference per message is what a worker process costs: each batch of 100
//! crosses a pipe to the worker and its outcome comes back.

use std::{path::Path, time::Duration};

use crate::{run_measured, server, store_ticks, Measured, Row};

/// Runs of each mode; the best of each counts (a shared machine only ever makes a run slower).
const ROUNDS: usize = 3;

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
