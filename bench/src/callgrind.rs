//! Instruction counts of the per-message hot path, under callgrind: stable on a noisy machine, so a
//! change's effect shows without timing noise. Each figure is the difference between a run with N
//! messages and the same run with none (start-up and shutdown cancel out), divided by N.

use std::{path::Path, process::Command};

use anyhow::Context;

use crate::{redis_cli, server, store_ticks, Redis, Row};

/// Instructions of one whole `protean-host` run under callgrind. With `CALLGRIND_KEEP=DIR` the output
/// is kept there as `NAME.out`, for `callgrind_annotate` to say where the instructions go.
fn instructions(command: Command, dir: &Path, name: &str) -> anyhow::Result<u64> {
    let out = match std::env::var_os("CALLGRIND_KEEP") {
        Some(keep) => {
            std::fs::create_dir_all(&keep)?;
            Path::new(&keep).join(format!("{name}.out"))
        }
        None => dir.join("callgrind.out"),
    };
    let program = command.get_program().to_owned();
    let args: Vec<_> = command.get_args().map(ToOwned::to_owned).collect();
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(program)
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("run valgrind (apt-get install valgrind)")?;
    anyhow::ensure!(
        status.success(),
        "protean-host under callgrind failed: {status}"
    );
    let text = std::fs::read_to_string(&out)?;
    let total = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .context("no summary in the callgrind output")?;
    Ok(total.trim().parse()?)
}

fn per_message(with: u64, without: u64, events: usize) -> f64 {
    with.saturating_sub(without) as f64 / events as f64
}

/// SQLite no-op, Redis outbox publishing and Redis consume, per message.
pub(crate) fn hot_path(host: &Path, fixture: &Path, events: usize) -> anyhow::Result<Vec<Row>> {
    let noop = format!("{}:noop", fixture.display());
    let sqlite = |n: usize| -> anyhow::Result<u64> {
        let dir = tempfile::tempdir()?;
        store_ticks(dir.path(), n, false)?;
        instructions(
            server(host, dir.path(), &noop),
            dir.path(),
            &format!("sqlite-{n}"),
        )
    };
    let sqlite = per_message(sqlite(events)?, sqlite(0)?, events);
    let redis = Redis::start()?;
    let config = format!(
        "[brokers.default]\nuri = \"redis://127.0.0.1:{}/0\"\n",
        redis.port
    );
    let consume = |n: usize| -> anyhow::Result<u64> {
        redis_cli(&redis, &["FLUSHALL"])?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("protean.toml"), &config)?;
        store_ticks(dir.path(), n, true)?;
        // Publish first, outside callgrind: the counted run only consumes.
        let status = server(host, dir.path(), &format!("{}:empty", fixture.display()))
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "publishing run failed: {status}");
        instructions(
            server(host, dir.path(), &noop),
            dir.path(),
            &format!("consume-{n}"),
        )
    };
    let consume = per_message(consume(events)?, consume(0)?, events);
    // A domain with no handlers: the run claims, XADDs and deletes the published rows, then ends.
    let publish = |n: usize| -> anyhow::Result<u64> {
        redis_cli(&redis, &["FLUSHALL"])?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("protean.toml"), &config)?;
        store_ticks(dir.path(), n, true)?;
        let empty = format!("{}:empty", fixture.display());
        instructions(
            server(host, dir.path(), &empty),
            dir.path(),
            &format!("publish-{n}"),
        )
    };
    let publish = per_message(publish(events)?, publish(0)?, events);
    Ok(vec![
        Row {
            scenario: "Instructions per message, SQLite no-op".into(),
            setup: format!("callgrind, {events} stored events minus none, whole process"),
            result: format!("{sqlite:.0} instructions/message"),
            target: "-".into(),
            ok: true,
        },
        Row {
            scenario: "Instructions per message, Redis outbox publishing".into(),
            setup: format!(
                "callgrind, {events} outbox rows minus none: claim, XADD, delete the published rows"
            ),
            result: format!("{publish:.0} instructions/message"),
            target: "-".into(),
            ok: true,
        },
        Row {
            scenario: "Instructions per message, Redis consume".into(),
            setup: format!(
                "callgrind, {events} entries minus none: read, decode, handle, commit, ack"
            ),
            result: format!("{consume:.0} instructions/message"),
            target: "-".into(),
            ok: true,
        },
    ])
}
