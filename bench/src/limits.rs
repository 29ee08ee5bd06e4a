//! Memory per message: the peak resident memory a whole `protean-host` process gains handling one
//! message of 1, 5 and 20 MB (under a raised `server.max_message_bytes`), over the same run with a
//! message of a few bytes, divided by the message's size. On SQLite (an event-store subscription reads
//! it), and on Redis: publishing it from the outbox, then consuming it from the stream.
//!
//! The message is an event of many small objects (order lines), the shape that costs most when decoded
//! into a tree; the no-op handler decodes only its two small fields, so what is measured is the host's
//! share (a handler that decodes everything adds its own).

use std::path::Path;

use protean_host::{
    message::Kind,
    store::{SqliteStore, Store},
    unit_of_work::{NewMessage, UnitOfWork},
};
use serde_json::Value;

use crate::{redis_cli, run_measured, server, Measured, Redis, Row};

const MB: usize = 1_000_000;

/// The sizes measured, in MB.
const SIZES: [usize; 3] = [1, 5, 20];

/// A raised limit, so that every size measured is handled.
const CONFIG: &str = "[server]\nmax_message_bytes = 67108864\n";

/// The factor a message may cost, as peak growth over its size.
const TARGET: f64 = 4.0;

pub(crate) fn rows(host: &Path, fixture: &Path) -> anyhow::Result<Vec<Row>> {
    let mut rows = vec![sqlite(host, fixture)?];
    rows.extend(redis(host, fixture)?);
    Ok(rows)
}

/// A `Ticked` event whose data is about `bytes` long: order lines of about 50 bytes each.
fn event(bytes: usize) -> Value {
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
    serde_json::from_str(&data).expect("the generated event is JSON")
}

/// Store one event of about `bytes` (0: a small one) in `dir/.protean/store.db`, with its outbox row
/// when `publish`; its size as stored (data and metadata).
fn store_one(dir: &Path, bytes: usize, publish: bool) -> anyhow::Result<usize> {
    let store = SqliteStore::open(&dir.join(".protean/store.db"))?;
    let message = NewMessage::new(
        Kind::Event,
        "probe::probe-1",
        "Probe.Ticked.v1",
        &event(bytes),
        None,
        None,
        None,
    );
    let size = message.data.len() + message.metadata.len();
    store.commit(&UnitOfWork {
        messages: vec![message],
        publish,
        ..UnitOfWork::default()
    })?;
    Ok(size)
}

/// The peak growth per size as "1 MB: +2.1 MB (2.1×)", and whether every factor met the target.
fn figures(base: &Measured, runs: &[(usize, Measured)]) -> (String, bool) {
    let mut ok = true;
    let text = runs
        .iter()
        .map(|(size, run)| {
            let growth = run.rss_kib.saturating_sub(base.rss_kib) as f64 * 1024.0;
            let factor = growth / *size as f64;
            ok &= factor <= TARGET;
            format!(
                "{:.0} MB: +{:.1} MB ({factor:.1}×)",
                *size as f64 / MB as f64,
                growth / MB as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    (format!("{text}; baseline peak {:.1} MB", base.rss_mb()), ok)
}

fn sqlite(host: &Path, fixture: &Path) -> anyhow::Result<Row> {
    let domain = format!("{}:noop", fixture.display());
    let run = |bytes: usize| -> anyhow::Result<(usize, Measured)> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("protean.toml"), CONFIG)?;
        let size = store_one(dir.path(), bytes, false)?;
        let measured = run_measured(server(host, dir.path(), &domain))?;
        anyhow::ensure!(
            crate::handled_in(&measured.stdout) == 1,
            "the message was not handled:\n{}",
            measured.stdout
        );
        Ok((size, measured))
    };
    let (_, base) = run(0)?;
    let runs = SIZES
        .iter()
        .map(|mb| run(mb * MB))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (result, ok) = figures(&base, &runs);
    Ok(Row {
        scenario: "Memory per message, SQLite".into(),
        setup: "one event of many small objects read by an event-store subscription, no-op handler; peak RSS growth over a run with a small event, / message size".into(),
        result,
        target: format!("≤ {TARGET:.0}×"),
        ok,
    })
}

/// Publishing (outbox to stream, a domain without handlers) and consuming (a fresh store, the
/// stream's entry read by a consumer group) measured apart, each over its own small-message run.
fn redis(host: &Path, fixture: &Path) -> anyhow::Result<Vec<Row>> {
    let redis = Redis::start()?;
    let config = format!(
        "{CONFIG}[brokers.default]\nuri = \"redis://127.0.0.1:{}/0\"\n",
        redis.port
    );
    let run = |bytes: usize| -> anyhow::Result<(usize, Measured, Measured)> {
        redis_cli(&redis, &["FLUSHALL"])?;
        let publisher = tempfile::tempdir()?;
        std::fs::write(publisher.path().join("protean.toml"), &config)?;
        let size = store_one(publisher.path(), bytes, true)?;
        let publish = run_measured(server(
            host,
            publisher.path(),
            &format!("{}:empty", fixture.display()),
        ))?;
        let consumer = tempfile::tempdir()?;
        std::fs::write(consumer.path().join("protean.toml"), &config)?;
        let consume = run_measured(server(
            host,
            consumer.path(),
            &format!("{}:noop", fixture.display()),
        ))?;
        anyhow::ensure!(
            crate::handled_in(&consume.stdout) == 1,
            "the consumer did not handle the message:\n{}",
            consume.stdout
        );
        Ok((size, publish, consume))
    };
    let (_, base_publish, base_consume) = run(0)?;
    let mut published = Vec::new();
    let mut consumed = Vec::new();
    for mb in SIZES {
        let (size, publish, consume) = run(mb * MB)?;
        published.push((size, publish));
        consumed.push((size, consume));
    }
    let (publish_result, publish_ok) = figures(&base_publish, &published);
    let (consume_result, consume_ok) = figures(&base_consume, &consumed);
    Ok(vec![
        Row {
            scenario: "Memory per message, Redis publish".into(),
            setup: "one stored event of many small objects published by the outbox (no handlers); peak RSS growth over a small event's run, / message size".into(),
            result: publish_result,
            target: format!("≤ {TARGET:.0}×"),
            ok: publish_ok,
        },
        Row {
            scenario: "Memory per message, Redis consume".into(),
            setup: "the same entry read by a stream subscription's consumer group, no-op handler; peak RSS growth over a small event's run, / message size".into(),
            result: consume_result,
            target: format!("≤ {TARGET:.0}×"),
            ok: consume_ok,
        },
    ])
}
