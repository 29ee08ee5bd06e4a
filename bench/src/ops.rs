//! What watching the server costs: the SQLite no-op run with `/metrics` and `/readyz` scraped every
//! 100 ms against the same run unscraped (target: at most 5% slower).
//!
//! Test mode turns the health server off by default; both runs turn it on explicitly
//! (`[server.health] enabled = true`), so that the only difference between them is the scraping. Runs
//! alternate (unscraped, scraped, ...) on copies of one store, and the medians are compared. On a shared
//! machine the wall time is noisy, so the CPU time the server used (user + system) is printed beside it.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;

use super::{server, store_ticks, wait4, Row};

const RUNS: usize = 5;
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
        plain.push(run(host, template.path(), &domain, false)?);
        let measured = run(host, template.path(), &domain, true)?;
        scrapes += measured.scrapes;
        scraped.push(measured);
    }
    let (plain, scraped) = (Medians::of(&plain, events), Medians::of(&scraped, events));
    let slower = 100.0 * (plain.rate - scraped.rate) / plain.rate;
    let more_cpu = 100.0 * (scraped.cpu_us - plain.cpu_us) / plain.cpu_us;
    Ok(vec![Row {
        scenario: "SQLite no-op, /metrics + /readyz every 100 ms".into(),
        setup: format!(
            "{events} events, median of {RUNS} runs each, alternating; unscraped {:.0}/s, scraped {:.0}/s ({scrapes} scrape pairs in all); server CPU per message {:.2} µs vs {:.2} µs ({more_cpu:+.1}%)",
            plain.rate, scraped.rate, plain.cpu_us, scraped.cpu_us
        ),
        result: format!("{slower:.1}% slower when scraped"),
        target: "≤ 5% slower".into(),
        ok: slower <= 5.0,
    }])
}

/// One run: its wall time, the CPU time the server used, and the scrape pairs answered during it.
struct Measured {
    elapsed: Duration,
    cpu: Duration,
    scrapes: u64,
}

/// Medians over runs: messages per second (wall time) and CPU microseconds per message.
struct Medians {
    rate: f64,
    cpu_us: f64,
}

impl Medians {
    fn of(runs: &[Measured], events: usize) -> Self {
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let elapsed = median(runs.iter().map(|r| r.elapsed).collect());
        let cpu = median(runs.iter().map(|r| r.cpu).collect());
        Self {
            rate: events as f64 / elapsed.as_secs_f64(),
            cpu_us: cpu.as_secs_f64() * 1e6 / events as f64,
        }
    }
}

/// One test-mode run on a copy of the template store; with `scrape`, a thread scrapes both endpoints
/// every 100 ms until the run ends.
fn run(host: &Path, template: &Path, domain: &str, scrape: bool) -> anyhow::Result<Measured> {
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
    let measured = run_server(server(host, dir.path(), domain));
    done.store(true, Ordering::SeqCst);
    if let Some(scraper) = scraper {
        let _ = scraper.join();
    }
    let (elapsed, cpu) = measured?;
    Ok(Measured {
        elapsed,
        cpu,
        scrapes: answered.load(Ordering::SeqCst),
    })
}

/// Run the server to completion: its wall time and the CPU time (user + system) it used.
fn run_server(mut command: Command) -> anyhow::Result<(Duration, Duration)> {
    command.stdout(Stdio::null()).stderr(Stdio::null());
    let started = Instant::now();
    let child = command.spawn().context("start protean-host")?;
    let (status, usage) = wait4(child.id() as i32)?;
    let elapsed = started.elapsed();
    anyhow::ensure!(status == 0, "protean-host exited with status {status}");
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok((elapsed, time(usage.ru_utime) + time(usage.ru_stime)))
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
    fetch(port, path).is_some_and(|answer| {
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.1 503")
    })
}

/// One GET: the whole answer, status line and headers included; `None` when the server did not answer.
pub(crate) fn fetch(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    stream.write_all(request.as_bytes()).ok()?;
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}
