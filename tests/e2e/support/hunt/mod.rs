//! The loss hunter: the sample domain run by several real replicas while other writers append and a
//! chaos thread kills, pauses and cuts off what it can, then checked from the stores themselves
//! (`invariants`). Nothing here trusts the host's own counters.
//!
//! Sizes come from the environment so that `scripts/soak` runs the same hunt longer:
//! `HUNT_ORDERS` (orders per writer, default 150), `HUNT_SEED` (the chaos seed, default: the clock).

mod chaos;
mod invariants;
mod writers;

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use protean_host::store::{PostgresStore, Store};

use super::{host, sample_domain, sqlite, PgServer, RedisServer, Server};
use chaos::Chaos;
use writers::Writer;

/// Which store and broker a hunt runs on, and who writes besides the replicas.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub postgres: bool,
    pub redis: bool,
    /// A MessageDB client appending `PlaceOrder` commands with `write_message` (PostgreSQL only).
    pub message_db_writer: bool,
}

/// What a hunt did and what it found.
#[derive(Debug, Default)]
pub struct Report {
    pub scenario: &'static str,
    pub seed: u64,
    pub orders: usize,
    pub messages: usize,
    pub kills: usize,
    pub pauses: usize,
    pub broker_outages: usize,
    pub seconds: f64,
    pub violations: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hunt {}: seed {}, {} orders, {} messages, {} kills, {} pauses, {} broker outages, {:.1} s, {} violations",
            self.scenario,
            self.seed,
            self.orders,
            self.messages,
            self.kills,
            self.pauses,
            self.broker_outages,
            self.seconds,
            self.violations.len()
        )?;
        for violation in &self.violations {
            write!(f, "\n  - {violation}")?;
        }
        Ok(())
    }
}

/// Replicas of the main instance, and of the `reporting` instance (a second projector on one document).
const REPLICAS: usize = 3;
const REPORTING_REPLICAS: usize = 2;

/// Run one hunt and check it.
pub fn hunt(scenario: Scenario) -> Report {
    let started = Instant::now();
    let seed = env_or("HUNT_SEED", seed_from_clock());
    let per_writer = env_or("HUNT_ORDERS", 150) as usize;
    eprintln!(
        "hunt {}: seed {seed} (HUNT_SEED={seed} repeats it)",
        scenario.name
    );
    let dir = tempfile::tempdir().unwrap();
    let pg = scenario.postgres.then(PgServer::start);
    let redis = scenario.redis.then(RedisServer::start);
    write_config(dir.path(), pg.as_ref(), redis.as_ref());
    if pg.is_some() {
        host(dir.path())
            .args(["db", "setup"])
            .output()
            .expect_code(0);
    }
    let replicas = Arc::new(Mutex::new(start(dir.path())));
    let mut writers = vec![
        Writer::send(dir.path(), 0, per_writer),
        Writer::send(dir.path(), 100_000, per_writer),
    ];
    if let (true, Some(pg)) = (scenario.message_db_writer, &pg) {
        writers.push(Writer::message_db(pg.uri(), 200_000, per_writer));
    }
    let chaos = Chaos::start(seed, dir.path(), replicas.clone(), redis);
    let orders: Vec<writers::Order> = writers.into_iter().flat_map(Writer::finish).collect();
    let (tally, redis) = chaos.stop();
    stop(replicas);
    let mut violations = drain(dir.path());
    let store = open_store(dir.path(), pg.as_ref());
    let checked = invariants::check(
        store.as_ref(),
        redis.as_ref(),
        &planned(dir.path()),
        &orders,
    );
    violations.extend(checked.violations);
    Report {
        scenario: scenario.name,
        seed,
        orders: orders.len(),
        messages: checked.messages,
        kills: tally.kills,
        pauses: tally.pauses,
        broker_outages: tally.broker_outages,
        seconds: started.elapsed().as_secs_f64(),
        violations,
    }
}

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed_from_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1
}

/// Small batches and short leases, so that kills and pauses land mid-batch and takeovers happen within
/// the hunt; a small outbox budget, so that a broker outage outlasts it.
fn write_config(dir: &Path, pg: Option<&PgServer>, redis: Option<&RedisServer>) {
    let mut config = String::from(
        "[server]\nmessages_per_tick = 10\nlease_ttl_ms = 1000\ntest_mode_timeout_seconds = 120\n\
         [outbox]\nmax_attempts = 3\nretry_delay_ms = 50\nmax_retry_delay_ms = 200\n",
    );
    if let Some(pg) = pg {
        config.push_str(&pg.config());
    }
    if let Some(redis) = redis {
        config.push_str(&redis.config());
    }
    std::fs::write(dir.join("protean.toml"), config).unwrap();
}

fn domains() -> Vec<String> {
    let lib = sample_domain().display().to_string();
    let mut domains = vec![lib.clone(); REPLICAS];
    domains.extend(vec![format!("{lib}:reporting"); REPORTING_REPLICAS]);
    domains
}

/// One replica of each domain in `domains()`, each past "engine started".
fn start(dir: &Path) -> Vec<(String, Server)> {
    domains()
        .into_iter()
        .map(|domain| {
            let mut server = spawn(dir, &domain);
            server.wait_for(&["engine started"], Duration::from_secs(60));
            (domain, server)
        })
        .collect()
}

pub(super) fn spawn(dir: &Path, domain: &str) -> Server {
    host(dir).args(["--domain", domain]).spawn()
}

/// Every replica still running is stopped as an operator would (SIGTERM); a paused one first goes on.
fn stop(replicas: Arc<Mutex<Vec<(String, Server)>>>) {
    let replicas = std::mem::take(&mut *replicas.lock().unwrap());
    for (_, replica) in &replicas {
        replica.signal(libc::SIGCONT);
        replica.signal(libc::SIGTERM);
    }
    for (_, replica) in replicas {
        replica.wait();
    }
}

/// What is left is handled by one test-mode run per instance, as a user finishing a flow would.
fn drain(dir: &Path) -> Vec<String> {
    let lib = sample_domain().display().to_string();
    [lib.clone(), format!("{lib}:reporting")]
        .iter()
        .filter_map(|domain| {
            let run = host(dir)
                .args(["--domain", domain, "--test-mode", "--log-level", "warn"])
                .output();
            (run.code() != Some(0)).then(|| {
                format!(
                    "test mode of {domain} ended with {:?}: {}",
                    run.code(),
                    run.stderr().lines().last().unwrap_or_default()
                )
            })
        })
        .collect()
}

/// The subscriptions of both instances, as the host plans them.
fn planned(dir: &Path) -> Vec<invariants::Planned> {
    let lib = sample_domain().display().to_string();
    [lib.clone(), format!("{lib}:reporting")]
        .iter()
        .flat_map(|domain| {
            let out = host(dir)
                .args(["inspect", "--json", "--domain", domain])
                .output()
                .expect_code(0);
            invariants::Planned::from_inspect(&serde_json::from_str(&out.stdout()).unwrap())
        })
        .collect()
}

fn open_store(dir: &Path, pg: Option<&PgServer>) -> Arc<dyn Store> {
    match pg {
        Some(pg) => Arc::new(PostgresStore::open(&pg.store_config()).unwrap()),
        None => sqlite(dir),
    }
}
