//! What watching the server costs: the SQLite no-op run with `/metrics` and `/readyz` scraped every
//! 100 ms against the same run unscraped (target: at most 5% slower).
//!
//! Test mode turns the health server off by default; both runs turn it on explicitly
//! (`[server.health] enabled = true`), so that the only difference between them is the scraping. Runs
//! alternate (unscraped, scraped, ...) on copies of one store, and the medians are compared.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;

use super::{run_measured, server, store_ticks, Row};

const RUNS: usize = 3;
const INTERVAL: Duration = Duration::from_millis(100);

/// Scraped against unscraped, `events` stored ticks through the no-op handler.
pub fn scraped_vs_unscraped(
    host: &Path,
    fixture: &Path,
    events: usize,
) -> anyhow::Result<Vec<Row>> {
    let template = tempfile::tempdir()?;
    store_ticks(template.path(), events, false)?;
    let domain = format!("{}:noop", fixture.display());
    let (mut plain, mut scraped, mut scrapes) = (Vec::new(), Vec::new(), 0);
    for _ in 0..RUNS {
        plain.push(run(host, template.path(), &domain, false)?.0);
        let (elapsed, count) = run(host, template.path(), &domain, true)?;
        scraped.push(elapsed);
        scrapes += count;
    }
    let rate = |times: &mut Vec<Duration>| {
        times.sort();
        events as f64 / times[times.len() / 2].as_secs_f64()
    };
    let (plain, scraped) = (rate(&mut plain), rate(&mut scraped));
    let slower = 100.0 * (plain - scraped) / plain;
    Ok(vec![Row {
        scenario: "SQLite no-op, /metrics + /readyz every 100 ms".into(),
        setup: format!("{events} events, median of {RUNS} runs each, alternating; unscraped {plain:.0}/s, scraped {scraped:.0}/s ({scrapes} scrape pairs in all)"),
        result: format!("{slower:.1}% slower when scraped"),
        target: "≤ 5% slower".into(),
        ok: slower <= 5.0,
    }])
}

/// One test-mode run on a copy of the template store; with `scrape`, a thread scrapes both endpoints
/// every 100 ms until the run ends. Returns the run's time and the number of scrape pairs answered.
fn run(
    host: &Path,
    template: &Path,
    domain: &str,
    scrape: bool,
) -> anyhow::Result<(Duration, u64)> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join(".protean"))?;
    for file in ["store.db", "store.db-wal", "store.db-shm"] {
        let from = template.join(".protean").join(file);
        if from.exists() {
            std::fs::copy(&from, dir.path().join(".protean").join(file))?;
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("[server.health]\nenabled = true\nport = {port}\n"),
    )?;
    let done = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let scraper = scrape.then(|| {
        let (done, answered) = (done.clone(), answered.clone());
        std::thread::spawn(move || scrape_until(port, &done, &answered))
    });
    let measured = run_measured(server(host, dir.path(), domain)).context("bench run");
    done.store(true, Ordering::SeqCst);
    if let Some(scraper) = scraper {
        let _ = scraper.join();
    }
    let (elapsed, _, _) = measured?;
    Ok((elapsed, answered.load(Ordering::SeqCst)))
}

/// Bounded by the run: stops when `done` is set (the server exited).
fn scrape_until(port: u16, done: &AtomicBool, answered: &AtomicU64) {
    while !done.load(Ordering::SeqCst) {
        let metrics = get(port, "/metrics");
        let ready = get(port, "/readyz");
        if metrics && ready {
            answered.fetch_add(1, Ordering::SeqCst);
        }
        std::thread::sleep(INTERVAL);
    }
}

/// One GET; whether the server answered it (before it listens, or after it exits, it does not).
fn get(port: u16, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && (answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.1 503"))
}
