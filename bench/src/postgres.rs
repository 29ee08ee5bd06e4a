//! PostgreSQL scenarios, on a durable cluster of their own (initdb in a temporary directory, every
//! commit flushed, as in production):
//! - appending events in batches of 1000 through the store, in-process;
//! - a subscription end to end: the stored events through one handler that does nothing, whole process
//!   (`protean-host --test-mode`), with its peak memory;
//! - the sample flow, orders to shipped, whole process.

use std::{path::Path, time::Instant};

use protean_host::{
    store::{PostgresStore, Store},
    unit_of_work::{NewMessage, UnitOfWork},
};

use super::{run_measured, server, Row};

#[path = "../../tests/e2e/support/postgres.rs"]
#[allow(dead_code)]
pub(crate) mod cluster;

const BATCH: usize = 1000;

/// The rows; `events` are appended, then handled; then the sample flow runs `orders` orders. Its rate
/// is returned too, with what `beside` (the same flow on SQLite) gave right before it and right after.
pub fn rows(
    host: &Path,
    fixture: &Path,
    sample: &Path,
    events: usize,
    orders: usize,
    statements: bool,
    beside: &dyn Fn() -> anyhow::Result<f64>,
) -> anyhow::Result<(Vec<Row>, Flows)> {
    let settings: &[&str] = if statements {
        &[
            "shared_preload_libraries=pg_stat_statements",
            "pg_stat_statements.track=all",
        ]
    } else {
        &[]
    };
    let pg = cluster::PgServer::durable_with(settings);
    let store = PostgresStore::connect(&pg.store_config())?;
    store.setup()?;
    let appended = append_rate(&store, events)?;
    let handled = subscription_rate(host, fixture, &pg, events)?;
    if statements {
        pg.psql("CREATE EXTENSION pg_stat_statements; SELECT pg_stat_statements_reset(), pg_stat_reset()");
    }
    let dir = tempfile::tempdir()?;
    let cpu = || pg.cpu();
    let flow = super::Flow {
        backend: "PostgreSQL",
        store: &store,
        config: &pg.config(),
        database_cpu: Some(&cpu),
    };
    let before = beside()?;
    let (flow, rate) = super::sample_flow(host, sample, orders, &flow, dir.path())?;
    let after = beside()?;
    if statements {
        print_statements(&pg);
    }
    let quiet = quiet_head(&store, &pg)?;
    let lag = lag_count(&store, events)?;
    let flows = Flows {
        postgres: rate,
        sqlite: [before, after],
    };
    Ok((vec![appended, handled, flow, quiet, lag], flows))
}

/// Orders per second of the sample flow on PostgreSQL, and on SQLite right before and right after it.
pub struct Flows {
    pub postgres: f64,
    pub sqlite: [f64; 2],
}

impl Flows {
    /// PostgreSQL's rate over SQLite's, taken as the geometric mean of the runs on either side: the
    /// 2-core VM's speed swings within a minute, and a ratio of runs minutes apart swung with it
    /// (the Redis rows' minimal client is run the same way).
    pub fn share(&self) -> f64 {
        let [before, after] = self.sqlite;
        100.0 * self.postgres / (before * after).sqrt()
    }
}

/// The statements the sample flow spent the database's time in, nested ones (inside `append_unit`)
/// included, so a wait for a lock shows as the statement that took it.
fn print_statements(pg: &cluster::PgServer) {
    println!("Sample flow on PostgreSQL: statements by total time (pg_stat_statements, nested included):");
    let statements = pg.psql(
        "SELECT format('%s ms, %s calls, %s rows: %s', round(total_exec_time), calls, rows, \
                 left(regexp_replace(regexp_replace(query, '--[^\\n]*', '', 'g'), '\\s+', ' ', 'g'), 100)) \
             FROM pg_stat_statements WHERE query NOT IN ('BEGIN', 'COMMIT') \
             ORDER BY total_exec_time DESC LIMIT 20",
    );
    for line in statements.lines() {
        println!("  {}", line.trim());
    }
    println!("Sample flow on PostgreSQL: rows written by table (pg_stat_user_tables; a HOT update writes no index entry):");
    let tables = pg.psql(
        "SELECT format('%s.%s: %s inserted, %s updated (%s HOT), %s deleted, %s index scans', \
                 schemaname, relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, idx_scan) \
             FROM pg_stat_user_tables WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 \
             ORDER BY n_tup_ins + n_tup_upd + n_tup_del DESC",
    );
    for line in tables.lines() {
        println!("  {}", line.trim());
    }
}

/// What a subscription's poll costs at the head of a category that went quiet while others grew: the
/// ticks appended first, after the sample flow appended its messages to other categories. A read that
/// walked the primary key and filtered by category went through all of those at every poll.
fn quiet_head(store: &PostgresStore, pg: &cluster::PgServer) -> anyhow::Result<Row> {
    const POLLS: u32 = 200;
    pg.psql("ANALYZE message_store.messages");
    let ticks = ["probe::probe".to_owned()];
    let head = store.head(&ticks)?;
    let others = pg.psql(&format!(
        "SELECT count(*) FROM message_store.messages WHERE global_position > {head}"
    ));
    let poll = |categories: &[String]| -> anyhow::Result<f64> {
        store.read_categories(categories, head, 100)?;
        let started = Instant::now();
        for _ in 0..POLLS {
            anyhow::ensure!(store.read_categories(categories, head, 100)?.is_empty());
        }
        Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(POLLS))
    };
    let one = poll(&ticks)?;
    let two = poll(&["probe::probe".to_owned(), "probe::none".to_owned()])?;
    Ok(Row {
        scenario: "PostgreSQL poll at a quiet category's head".into(),
        setup: format!("the ticks' category, {others} messages of other categories (the sample flow's) appended after its last, statistics analysed; mean of {POLLS} reads of 100 after its head, as an idle subscription polls"),
        result: format!("{one:.0} µs a poll of one category, {two:.0} µs of two"),
        target: "-".into(),
        ok: true,
    })
}

/// What counting a subscription's lag costs (`/metrics`, `subscriptions status`, and each look of a
/// replica standing by): the ticks' whole category, as a new subscription's backlog.
fn lag_count(store: &PostgresStore, events: usize) -> anyhow::Result<Row> {
    const COUNTS: u32 = 5;
    let ticks = ["probe::probe".to_owned()];
    let started = Instant::now();
    for _ in 0..COUNTS {
        anyhow::ensure!(store.count_after(&ticks, 0)? == events as u64);
    }
    let ms = started.elapsed().as_secs_f64() * 1e3 / f64::from(COUNTS);
    Ok(Row {
        scenario: "PostgreSQL lag count of a backlog".into(),
        setup: format!("the ticks' category from its start ({events} messages) among the sample flow's; mean of {COUNTS} counts, as /metrics and a replica standing by count a subscription's lag"),
        result: format!("{ms:.1} ms a count"),
        target: "-".into(),
        ok: true,
    })
}

fn ticks(from: usize, count: usize) -> Vec<NewMessage> {
    (from..from + count).map(super::tick).collect()
}

/// Append `events` ticks, `BATCH` per unit of work, timing the commits only. Each unit is built just
/// before its commit, so this process stays small: the subscription's process is forked from it, and a
/// child's peak memory counts what it shared with its parent before `exec`.
fn append_rate(store: &PostgresStore, events: usize) -> anyhow::Result<Row> {
    let mut elapsed = std::time::Duration::ZERO;
    for from in (0..events).step_by(BATCH) {
        let unit = UnitOfWork {
            messages: ticks(from, BATCH.min(events - from)),
            ..UnitOfWork::default()
        };
        let started = Instant::now();
        store.commit(&unit)?;
        elapsed += started.elapsed();
    }
    let rate = events as f64 / elapsed.as_secs_f64();
    Ok(Row {
        scenario: "PostgreSQL append in batches".into(),
        setup: format!("{events} events over 1000 streams, {BATCH} per unit of work (one transaction each), one connection, durable commits"),
        result: format!("{rate:.0} events/s"),
        target: "≥ 20,000 events/s".into(),
        ok: rate >= 20_000.0,
    })
}

/// The stored events through the no-op handler, whole process.
fn subscription_rate(
    host: &Path,
    fixture: &Path,
    pg: &cluster::PgServer,
    events: usize,
) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("protean.toml"), pg.config())?;
    let run = run_measured(server(
        host,
        dir.path(),
        &format!("{}:noop", fixture.display()),
    ))?;
    let rate = events as f64 / run.elapsed.as_secs_f64();
    let cpu_us = run.cpu.as_secs_f64() * 1e6 / events as f64;
    Ok(Row {
        scenario: "PostgreSQL subscription end to end".into(),
        setup: format!("{events} stored events, one event handler that only decodes, 100 per batch, lease held, whole process"),
        result: format!(
            "{rate:.0} messages/s, host CPU {cpu_us:.1} µs/message, peak memory {:.1} MB",
            run.rss_mb()
        ),
        target: "≥ 20,000 messages/s".into(),
        ok: rate >= 20_000.0,
    })
}
