//! The health server: `/healthz` and `/livez` (the runtime answers), `/readyz` (the store and broker
//! answer, no loop is stalled, the engine is not shutting down; with every subscription's figures),
//! `/metrics` (Prometheus text).
//!
//! It runs on the engine's own runtime, so a live answer means that runtime schedules tasks. Each
//! connection is served by a task of its own with a header-read timeout, so a client that sends garbage
//! or never finishes its request cannot hold up anyone else. Store work runs on blocking threads and every
//! check is bounded by `server.health.check_timeout_ms`.
//!
//! Overdue schedules fail readiness: a pending schedule more than `server.scheduler.overdue_after_ms`
//! past due means no scheduler runs, or the ones running cannot keep up.
//!
//! A stalled loop fails readiness: every subscription loop and the outbox processor report a state at
//! least once per iteration (the heartbeat kept by `Progress`), and a loop with work pending whose last
//! report is older than `stall_after_ms` is named as stalled, however healthy the rest looks.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{header, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde::Serialize;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::status::{self, Snapshot, Target};
use crate::{
    broker::Broker,
    config::HealthSettings,
    engine::{progress::State as LoopState, Shared},
    outbox,
    store::{OutboxCounts, ScheduleCounts},
};

/// How long a status snapshot is reused: scrapes and probes every 100 ms cost one measurement a second.
const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);

/// What the endpoints read.
pub(crate) struct Ops {
    shared: Arc<Shared>,
    broker: Option<Arc<dyn Broker>>,
    settings: HealthSettings,
    shutdown: CancellationToken,
    cache: tokio::sync::Mutex<Option<(Instant, Arc<Snapshot>)>>,
}

/// Start the health server when the configuration asks for it. A port that cannot be bound is a WARN
/// line and the engine runs on without probes (as Protean does): probes then fail, which says why.
pub(crate) async fn start(
    shared: Arc<Shared>,
    broker: Option<Arc<dyn Broker>>,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    let settings = shared.config.health.clone();
    if !settings.runs(shared.test_mode) {
        return None;
    }
    let address = format!("{}:{}", settings.host, settings.port);
    let listener = match TcpListener::bind(&address).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%address, %error, "cannot start the health server; running without /healthz, /readyz and /metrics (set [server.health] port, or enabled = false)");
            return None;
        }
    };
    let bound = listener.local_addr().map_or(address, |a| a.to_string());
    tracing::info!(address = %bound, "health server listening");
    let ops = Arc::new(Ops {
        settings,
        shared,
        broker,
        shutdown,
        cache: tokio::sync::Mutex::default(),
    });
    Some(tokio::spawn(serve(listener, ops)))
}

/// The routes. Every route answers GET (and HEAD); any other method gets 405, any other path 404.
pub(crate) fn router(ops: Arc<Ops>) -> Router {
    Router::new()
        .route("/healthz", get(alive).fallback(wrong_method))
        .route("/livez", get(alive).fallback(wrong_method))
        .route("/readyz", get(ready).fallback(wrong_method))
        .route("/metrics", get(metrics).fallback(wrong_method))
        .fallback(not_found)
        .with_state(ops)
}

/// While the host waits for its store and broker at start: live, not ready, saying what it waits for.
/// Stops when the task is aborted (the engine then starts its own server on the same port).
pub(crate) async fn waiting(
    settings: &HealthSettings,
    waiting_for: tokio::sync::watch::Receiver<String>,
) -> Option<JoinHandle<()>> {
    if !settings.runs(false) {
        return None;
    }
    let address = format!("{}:{}", settings.host, settings.port);
    let listener = match TcpListener::bind(&address).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%address, %error, "cannot start the health server while waiting for the store and broker");
            return None;
        }
    };
    let bound = listener.local_addr().map_or(address, |a| a.to_string());
    tracing::info!(address = %bound, "health server listening (not ready until the store and broker answer)");
    let not_ready = move || {
        let reason = waiting_for.borrow().clone();
        async move {
            let body = serde_json::json!({"status": "starting", "reasons": [reason], "shutting_down": false});
            json(StatusCode::SERVICE_UNAVAILABLE, &body)
        }
    };
    let router = Router::new()
        .route("/healthz", get(live).fallback(wrong_method))
        .route("/livez", get(live).fallback(wrong_method))
        .route("/readyz", get(not_ready).fallback(wrong_method))
        .fallback(not_found);
    Some(tokio::spawn(serve_router(
        listener,
        router,
        settings.request_timeout,
    )))
}

/// Accept connections until the task is aborted (when the engine has stopped).
async fn serve(listener: TcpListener, ops: Arc<Ops>) {
    let timeout = ops.settings.request_timeout;
    serve_router(listener, router(ops), timeout).await;
}

/// Serve `router`, each connection on a task of its own with a header-read `timeout`.
async fn serve_router(listener: TcpListener, router: Router, timeout: Duration) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(%error, "health server cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "health client connection ended with an error");
            }
        });
    }
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    let text = serde_json::to_string(body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// Live unless a handler call is past its deadline: a call in process cannot be stopped, so only a
/// restart by the supervisor recovers (and the call then counts as a failed attempt).
async fn alive(State(ops): State<Arc<Ops>>) -> Response {
    let overdue = ops.shared.deadlines.overdue(Instant::now());
    if overdue.is_empty() {
        return live().await;
    }
    let reasons: Vec<String> = overdue.iter().map(ToString::to_string).collect();
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({"status": "stuck", "reasons": reasons, "checks": {"runtime": "responsive", "handlers": "past their deadline"}}),
    )
}

async fn live() -> Response {
    json(
        StatusCode::OK,
        &serde_json::json!({"status": "ok", "checks": {"runtime": "responsive"}}),
    )
}

async fn not_found(uri: Uri) -> Response {
    let error = format!(
        "no endpoint {}; use /healthz, /livez, /readyz or /metrics",
        uri.path()
    );
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({ "error": error }),
    )
}

async fn wrong_method(method: axum::http::Method, uri: Uri) -> Response {
    let error = format!("{} answers GET only, not {method}", uri.path());
    let mut response = json(
        StatusCode::METHOD_NOT_ALLOWED,
        &serde_json::json!({ "error": error }),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    response
}

async fn metrics(State(ops): State<Arc<Ops>>) -> Response {
    let snapshot = ops.live_snapshot(true).await;
    let text = ops
        .shared
        .metrics
        .encode(&snapshot, ops.shutdown.is_cancelled());
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], text).into_response()
}

/// The body of `/readyz`.
#[derive(Debug, Serialize)]
struct Readiness {
    /// `ready` or `not ready`.
    status: &'static str,
    shutting_down: bool,
    /// Why it is not ready, one line each.
    reasons: Vec<String>,
    checks: BTreeMap<&'static str, String>,
    #[serde(flatten)]
    snapshot: Snapshot,
}

async fn ready(State(ops): State<Arc<Ops>>) -> Response {
    let readiness = ops.readiness().await;
    let code = if readiness.reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, &readiness)
}

impl Ops {
    async fn readiness(&self) -> Readiness {
        let mut checks = BTreeMap::new();
        let mut reasons = Vec::new();
        let store = self.check_store().await;
        if let Err(error) = &store {
            reasons.push(format!("store: {error}"));
        }
        checks.insert("store", outcome(&store));
        let mut broker_up = true;
        if self.broker.is_some() {
            let broker = self.check_broker().await;
            if let Err(error) = &broker {
                reasons.push(format!("broker: {error}"));
                broker_up = false;
            }
            checks.insert("broker", outcome(&broker));
        }
        let shutting_down = self.shutdown.is_cancelled();
        if shutting_down {
            reasons.push("shutting down".into());
        }
        let snapshot = self.live_snapshot(broker_up).await;
        if let Some(reason) = snapshot
            .outbox
            .and_then(|o| outbox_too_old(&o, self.settings.outbox_max_age))
        {
            reasons.push(reason);
        }
        let overdue_after = self.shared.config.scheduler.overdue_after;
        if let Some(reason) = snapshot
            .schedules
            .and_then(|s| schedules_overdue(&s, overdue_after))
        {
            reasons.push(reason);
        }
        for s in snapshot
            .subscriptions
            .iter()
            .filter(|s| s.stalled == Some(true))
        {
            let quiet = s.last_progress_ms.unwrap_or(0);
            reasons.push(format!(
                "{} is stalled: {} with work pending, no progress for {quiet} ms",
                s.name, s.state
            ));
        }
        Readiness {
            status: if reasons.is_empty() {
                "ready"
            } else {
                "not ready"
            },
            shutting_down,
            reasons,
            checks,
            snapshot,
        }
    }

    async fn check_store(&self) -> Result<(), String> {
        let store = self.shared.store.clone();
        let ping = tokio::task::spawn_blocking(move || store.ping());
        match tokio::time::timeout(self.settings.check_timeout, ping).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) => Err(format!("unavailable: {error}")),
            Ok(Err(error)) => Err(format!("check failed: {error}")),
            Err(_) => Err(self.too_slow()),
        }
    }

    async fn check_broker(&self) -> Result<(), String> {
        let Some(broker) = &self.broker else {
            return Ok(());
        };
        match tokio::time::timeout(self.settings.check_timeout, broker.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("unavailable: {error}")),
            Err(_) => Err(self.too_slow()),
        }
    }

    fn too_slow(&self) -> String {
        format!(
            "unavailable: no answer within {} ms",
            self.settings.check_timeout.as_millis()
        )
    }

    /// The measured figures (reused for up to a second) with each loop's live state and stall check.
    async fn live_snapshot(&self, broker_up: bool) -> Snapshot {
        let mut snapshot = (*self.measured(broker_up).await).clone();
        let loops: HashMap<String, (LoopState, Instant)> = self
            .shared
            .progress
            .snapshot()
            .into_iter()
            .map(|(name, state, at)| (name, (state, at)))
            .collect();
        let head = self.shared.progress.head_now();
        // Extra time a retrying loop may wait without being called stalled: its longest backoff.
        let retry_allowance: HashMap<String, Duration> = self
            .shared
            .subscriptions()
            .iter()
            .map(|s| {
                let longest = Duration::from_millis(s.settings.max_retry_delay_ms);
                (s.plan.name.clone(), longest)
            })
            .collect();
        for s in &mut snapshot.subscriptions {
            if let Some((state, at)) = loops.get(&s.name) {
                let quiet = at.elapsed();
                let allowance = retry_allowance.get(&s.name).copied().unwrap_or_default();
                let limit = Stall {
                    after: self.settings.stall_after,
                    allowance,
                    head,
                };
                s.stalled = Some(limit.stalled(state, quiet, s.backlog()));
                s.last_progress_ms = Some(quiet.as_millis() as u64);
                s.state = state_name(state).to_owned();
            }
        }
        if let (Some((state, at)), Some(outbox)) = (loops.get(outbox::NAME), snapshot.outbox) {
            // Waiting out a retry is not a stall: the age of what waits is checked on its own.
            let limit = Stall {
                after: self.settings.stall_after,
                allowance: Duration::from_millis(self.shared.config.outbox.max_retry_delay_ms),
                head,
            };
            if limit.stalled(state, at.elapsed(), outbox.pending) {
                let mut row = outbox_row(state, at.elapsed());
                row.stalled = Some(true);
                snapshot.subscriptions.push(row);
            }
        }
        snapshot
    }

    async fn measured(&self, broker_up: bool) -> Arc<Snapshot> {
        // One measurement at a time: concurrent scrapes wait for it and share it.
        let mut cache = self.cache.lock().await;
        if let Some((at, snapshot)) = cache.as_ref() {
            if at.elapsed() < SNAPSHOT_MAX_AGE && broker_up {
                return snapshot.clone();
            }
        }
        let broker = self.broker.clone().filter(|_| broker_up);
        let snapshot = Arc::new(
            status::measure(
                self.shared.store.clone(),
                broker,
                self.broker.is_some(),
                &status::targets_of(&self.shared.config, &self.shared.subscriptions()),
                status::Limits::of(&self.shared.config, self.settings.check_timeout),
            )
            .await,
        );
        *cache = Some((Instant::now(), snapshot.clone()));
        snapshot
    }
}

/// Why readiness fails for the outbox: its oldest pending row was committed more than `max_age` ago
/// (the broker is away, or rows are held), whatever the processors are doing.
fn outbox_too_old(outbox: &OutboxCounts, max_age: Duration) -> Option<String> {
    let age = outbox.oldest_pending_age_ms?;
    (age > max_age.as_millis() as u64).then(|| {
        format!(
            "outbox: its oldest pending row waits for {age} ms (over server.health.outbox_max_age_ms = {}); {} pending, {} failing, {} held",
            max_age.as_millis(),
            outbox.pending,
            outbox.failing,
            outbox.held
        )
    })
}

/// Why readiness fails for the schedules: some pending ones are more than `overdue_after` past due (no
/// scheduler runs, or the ones running cannot keep up).
fn schedules_overdue(schedules: &ScheduleCounts, overdue_after: Duration) -> Option<String> {
    (schedules.overdue > 0).then(|| {
        format!(
            "schedules: {} pending schedule(s) are more than {} ms past due (server.scheduler.overdue_after_ms); no scheduler runs, or it cannot keep up; {} pending",
            schedules.overdue,
            overdue_after.as_millis(),
            schedules.pending
        )
    })
}

/// The outbox processor, shown as a row only when it is stalled.
fn outbox_row(state: &LoopState, quiet: Duration) -> status::SubscriptionStatus {
    let mut row = status::SubscriptionStatus::new(&Target {
        name: outbox::NAME.into(),
        // It reads the store, as an event-store subscription does.
        standing: &crate::subscription::event_store::EventStoreKind,
        categories: Vec::new(),
        handlers: Vec::new(),
        partitions: None,
        workers: 1,
        parks: false,
    });
    row.state = state_name(state).into();
    row.last_progress_ms = Some(quiet.as_millis() as u64);
    row
}

fn outcome(result: &Result<(), String>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(error) => error.clone(),
    }
}

fn state_name(state: &LoopState) -> &'static str {
    match state {
        LoopState::Starting => "starting",
        LoopState::Busy => "handling a batch",
        LoopState::Idle { head: u64::MAX } | LoopState::StandingBy { .. } => {
            "standing by (another replica holds the lease)"
        }
        LoopState::Idle { .. } | LoopState::Waiting => "idle",
        LoopState::Retrying => "waiting to retry a message",
        LoopState::Stopped => "stopped",
    }
}

/// When a loop counts as stalled.
#[derive(Debug, Clone, Copy)]
struct Stall {
    /// No report for this long, with work pending.
    after: Duration,
    /// Extra time for a loop waiting out a retry backoff.
    allowance: Duration,
    /// The engine's head: an idle loop that last saw an older head has work.
    head: u64,
}

impl Stall {
    /// `quiet`: time since the loop last reported; `backlog`: messages measured waiting for it.
    fn stalled(&self, state: &LoopState, quiet: Duration, backlog: u64) -> bool {
        match state {
            LoopState::Busy | LoopState::Starting => quiet > self.after,
            LoopState::Retrying => quiet > self.after + self.allowance,
            // A replica standing by for a lease has nothing to do here.
            LoopState::Idle { head: u64::MAX } | LoopState::StandingBy { .. } => false,
            LoopState::Idle { head } => (*head < self.head || backlog > 0) && quiet > self.after,
            LoopState::Waiting | LoopState::Stopped => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outbox_fails_readiness_only_when_its_oldest_row_is_too_old() {
        let max_age = Duration::from_millis(1000);
        let counts = |age| OutboxCounts {
            pending: 2,
            oldest_pending_age_ms: age,
            ..OutboxCounts::default()
        };
        assert_eq!(outbox_too_old(&counts(None), max_age), None);
        assert_eq!(outbox_too_old(&counts(Some(900)), max_age), None);
        let reason = outbox_too_old(&counts(Some(1500)), max_age).unwrap();
        assert!(
            reason.starts_with("outbox: its oldest pending row waits for 1500 ms"),
            "{reason}"
        );
    }

    #[test]
    fn overdue_schedules_fail_readiness_and_pending_ones_do_not() {
        let after = Duration::from_secs(10);
        let counts = |pending, overdue| ScheduleCounts { pending, overdue };
        assert_eq!(schedules_overdue(&counts(0, 0), after), None);
        assert_eq!(schedules_overdue(&counts(40, 0), after), None);
        let reason = schedules_overdue(&counts(40, 3), after).unwrap();
        assert_eq!(
            reason,
            "schedules: 3 pending schedule(s) are more than 10000 ms past due (server.scheduler.overdue_after_ms); no scheduler runs, or it cannot keep up; 40 pending"
        );
    }

    #[test]
    fn a_loop_is_stalled_only_with_work_pending_and_no_report_for_stall_after() {
        let ms = Duration::from_millis;
        let stall = Stall {
            after: ms(500),
            allowance: ms(1000),
            head: 10,
        };
        assert!(!stall.stalled(&LoopState::Busy, ms(400), 5));
        assert!(stall.stalled(&LoopState::Busy, ms(600), 0));
        assert!(
            !stall.stalled(&LoopState::Retrying, ms(1200), 5),
            "waiting out a backoff"
        );
        assert!(stall.stalled(&LoopState::Retrying, ms(1600), 5));
        assert!(
            !stall.stalled(&LoopState::Idle { head: 10 }, ms(9000), 0),
            "idle with nothing to do"
        );
        assert!(
            stall.stalled(&LoopState::Idle { head: 10 }, ms(900), 3),
            "messages wait"
        );
        assert!(
            stall.stalled(&LoopState::Idle { head: 7 }, ms(900), 0),
            "the head moved on"
        );
        assert!(!stall.stalled(&LoopState::Idle { head: 7 }, ms(100), 0));
        assert!(
            !stall.stalled(&LoopState::Idle { head: u64::MAX }, ms(9000), 9),
            "standing by"
        );
        assert!(!stall.stalled(&LoopState::Stopped, ms(9000), 9));
    }
}
