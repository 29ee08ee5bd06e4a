//! The peer in the same run: the sample order flow on Python Protean 0.18.0 with its Redis broker
//! (`bench/python/protean_flow.py`), installed from PyPI into a virtual environment of the
//! benchmark's own (`target/bench/protean-venv`), run against a fresh private redis-server.
//! Reported as messages/s and orders/s, so that the lead can put our own sample flow on Redis beside
//! it as a ratio.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::{Redis, Row};

/// What the Python script measured: one JSON line on its stdout.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PeerFigure {
    /// Orders placed.
    pub orders: usize,
    /// Orders the projection saw shipped (the script fails unless it is `orders`).
    pub shipped: usize,
    /// Handler invocations: a message handled by three handlers counts three times.
    pub messages: usize,
    /// Each command and event once (7 per shipped order).
    pub distinct_messages: usize,
    /// From the first `PlaceOrder` handled to the last order seen shipped.
    pub seconds: f64,
    pub messages_per_s: f64,
    pub orders_per_s: f64,
}

/// Make the venv if missing (or left half-made), install the pinned requirements, run the flow.
pub(crate) fn python_protean(
    bench_dir: &Path,
    redis_port: u16,
    orders: usize,
) -> anyhow::Result<PeerFigure> {
    let script = crate::workspace().join("bench/python/protean_flow.py");
    let venv = bench_dir.join("protean-venv");
    let python = venv_python(&venv)?;
    let out = Command::new(&python)
        .arg(&script)
        .args(["--redis-port", &redis_port.to_string()])
        .args(["--orders", &orders.to_string()])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // The script's last stderr line says how far the flow got; the rest is Protean's warnings.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr.lines().last().unwrap_or("no output");
        bail!(
            "Python Protean flow failed ({}): {reason}\n{stdout}",
            out.status
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("the Python flow printed no JSON line")?;
    let figure: PeerFigure =
        serde_json::from_str(line).with_context(|| format!("unreadable figures: {line}"))?;
    anyhow::ensure!(
        figure.shipped == figure.orders && figure.orders == orders,
        "Python flow: {} of {} orders shipped",
        figure.shipped,
        orders
    );
    Ok(figure)
}

/// The venv's python, creating the venv and installing `requirements.txt` when its marker (the
/// requirements as last installed) is missing or differs.
fn venv_python(venv: &Path) -> anyhow::Result<PathBuf> {
    let requirements = crate::workspace().join("bench/python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("read {}", requirements.display()))?;
    let python = venv.join("bin/python");
    let marker = venv.join("installed-requirements.txt");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) && python.is_file()
    {
        return Ok(python);
    }
    if !python.is_file() {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv)
            .status()
            .context("run python3 -m venv: the peer scenario needs Python 3.11 or later with venv (apt-get install python3 python3-venv)")?;
        if !status.success() {
            bail!(
                "python3 -m venv {} failed ({status}): install python3-venv (apt-get install python3-venv), or skip the scenario with --only",
                venv.display()
            );
        }
    }
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements)
        .output()
        .context("run pip")?;
    if !out.status.success() {
        bail!(
            "pip install -r {} failed: PyPI (or a configured index) must be reachable to install protean==0.18.0 into {}; \
             set PIP_INDEX_URL for a mirror, or skip the peer scenario with --only\n{}",
            requirements.display(),
            venv.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::write(&marker, &wanted)?;
    Ok(python)
}

/// The peer scenario on a fresh private Redis: its row, and the figures for the ratio of our own flow
/// to Protean's.
pub(crate) fn peer(orders: usize) -> anyhow::Result<(Row, PeerFigure)> {
    let bench_dir = crate::workspace().join("target/bench");
    std::fs::create_dir_all(&bench_dir)?;
    let redis = Redis::start()?;
    let figure = python_protean(&bench_dir, redis.port, orders)?;
    let row = Row {
        scenario: "Python Protean 0.18, order flow on Redis".into(),
        setup: format!(
            "{} orders PlaceOrder to shipped; Protean's Engine: outbox to Redis Streams, stream subscriptions, \
             commands handled in-process, SQLite database, memory event store; {} handler calls ({} messages) in {:.2} s",
            figure.orders, figure.messages, figure.distinct_messages, figure.seconds
        ),
        result: format!(
            "{:.1} messages/s, {:.2} orders/s",
            figure.messages_per_s, figure.orders_per_s
        ),
        target: "ours ≥ 50× (ratio by the sample flow on Redis)".into(),
        ok: true,
    };
    println!(
        "Python Protean 0.18, order flow on Redis: {:.1} messages/s, {:.2} orders/s ({} orders in {:.2} s)",
        figure.messages_per_s, figure.orders_per_s, figure.orders, figure.seconds
    );
    Ok((row, figure))
}
