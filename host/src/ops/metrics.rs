//! The Prometheus registry of a running engine.
//!
//! Counters are recorded where the engine already counts: once per committed batch (from its report)
//! and once per outbox round, never per message in a hot loop. Gauges (lag, pending, queue depth, dead
//! letters, stalls, outbox rows, uptime) are set from a status snapshot when `/metrics` is scraped.
//!
//! Handlers run in batches, and a batch commits as one unit of work, so no per-message clock exists:
//! each handled message observes its batch's time divided by the batch's size in
//! `protean_handler_duration_seconds`, and the whole batch is observed in
//! `protean_batch_duration_seconds`.

use std::{
    sync::atomic::AtomicU64,
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};

use crate::engine::batch::{Report, Subscription};

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 10 µs to about 40 s, ×4 per bucket.
    Histogram::new(exponential_buckets(0.000_01, 4.0, 12))
}

fn sub(name: &str) -> Labels {
    vec![("subscription", name.to_owned())]
}

/// Every metric, registered once per engine run.
pub(crate) struct Metrics {
    registry: Registry,
    started: Instant,
    handled: Family<Labels, Counter>,
    dead_lettered: Family<Labels, Counter>,
    skipped: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    handler_seconds: Histograms,
    batch_seconds: Histograms,
    spent: Family<Labels, Counter<f64, AtomicU64>>,
    lag: Family<Labels, Gauge>,
    pending: Family<Labels, Gauge>,
    queue_depth: Family<Labels, Gauge>,
    dead_letters: Family<Labels, Gauge>,
    stalled: Family<Labels, Gauge>,
    partitions_owned: Family<Labels, Gauge>,
    parked_keys: Family<Labels, Gauge>,
    held_messages: Family<Labels, Gauge>,
    outbox_pending: Gauge,
    outbox_failing: Gauge,
    outbox_held: Gauge,
    outbox_oldest_age: Gauge<f64, AtomicU64>,
    outbox_published: Counter,
    outbox_failed: Counter,
    schedules_fired: Counter,
    schedule_lateness: Histogram,
    schedules_pending: Gauge,
    schedules_overdue: Gauge,
    up: Gauge,
    uptime: Gauge<f64, AtomicU64>,
    generation: Gauge,
    reloads: Counter,
    mapped: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Register `metric` (a family or a single metric; clones share their values) and return it.
fn add<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: M,
) -> M {
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric.clone()),
        None => registry.register(name, help, metric.clone()),
    }
    metric
}

impl Metrics {
    /// The registry for these subscriptions: every handler's counter exists (at 0) from the start, so
    /// dashboards and alerts see it before its first message.
    pub(crate) fn new(subscriptions: &[std::sync::Arc<Subscription>]) -> Self {
        let mut r = Registry::with_prefix("protean");
        let r = &mut r;
        let histograms = || Histograms::new_with_constructor(duration_histogram);
        let metrics = Self {
            started: Instant::now(),
            handled: add(r, "messages_handled", "Messages handled successfully, by subscription and handler", None, Family::default()),
            dead_lettered: add(r, "messages_dead_lettered", "Messages dead-lettered (failed for good, rejected, or poison)", None, Family::default()),
            skipped: add(r, "messages_skipped", "Messages acknowledged without a handler call (expired, already processed, not handled here)", None, Family::default()),
            retries: add(r, "handler_retries", "Failed attempts that will be retried after backoff", None, Family::default()),
            errors: add(r, "handler_errors", "Failed messages: retried or dead-lettered", None, Family::default()),
            handler_seconds: add(r, "handler_duration", "Processing time per handled message (its batch's time over the batch's size)", Some(Unit::Seconds), histograms()),
            batch_seconds: add(r, "batch_duration", "Time to handle and commit one batch", Some(Unit::Seconds), histograms()),
            spent: add(r, "subscription", "Time the subscription's loop spent, by phase: lease, read, handle, handler_reads, markers, commit, settle, engine, idle", Some(Unit::Seconds), Family::default()),
            lag: add(r, "subscription_lag", "Messages not yet read by the subscription", None, Family::default()),
            pending: add(r, "subscription_pending", "Stream entries delivered to the group but not acknowledged", None, Family::default()),
            queue_depth: add(r, "queue_depth", "Messages waiting for the subscription: lag plus pending", None, Family::default()),
            dead_letters: add(r, "subscription_dead_letters", "Dead letters the subscription holds now", None, Family::default()),
            stalled: add(r, "subscription_stalled", "1 when the loop has work pending but made no progress for server.health.stall_after_ms", None, Family::default()),
            partitions_owned: add(r, "ordered_partitions", "Ordered subscriptions: partitions held, per replica (owner)", None, Family::default()),
            parked_keys: add(r, "ordered_parked_keys", "Ordered subscriptions: keys parked behind a dead letter", None, Family::default()),
            held_messages: add(r, "ordered_held_messages", "Ordered subscriptions: messages waiting behind parked keys", None, Family::default()),
            outbox_pending: add(r, "outbox_pending", "Outbox rows waiting to be published", None, Gauge::default()),
            outbox_failing: add(r, "outbox_failing", "Outbox rows waiting to be published that failed at least once", None, Gauge::default()),
            outbox_held: add(r, "outbox_held", "Outbox rows that failed outbox.max_attempts times or more: still retried, holding back their stream", None, Gauge::default()),
            outbox_oldest_age: add(r, "outbox_oldest_pending_age", "Time since the oldest outbox row waiting to be published was committed (0 when none waits)", Some(Unit::Seconds), Gauge::default()),
            outbox_published: add(r, "outbox_published", "Outbox rows this process published", None, Counter::default()),
            outbox_failed: add(r, "outbox_failed", "Failed outbox publish attempts of this process", None, Counter::default()),
            schedules_fired: add(r, "schedules_fired", "Schedules this process fired", None, Counter::default()),
            schedule_lateness: add(r, "schedule_lateness", "How late a schedule fired: from its due time to its commit, on the engine's clock", Some(Unit::Seconds), Histogram::new(exponential_buckets(0.001, 4.0, 12))),
            schedules_pending: add(r, "schedules_pending", "Schedules waiting for their time", None, Gauge::default()),
            schedules_overdue: add(r, "schedules_overdue", "Pending schedules more than server.scheduler.overdue_after_ms past due", None, Gauge::default()),
            up: add(r, "engine_up", "1 while the engine runs, 0 once it is shutting down", None, Gauge::default()),
            uptime: add(r, "engine_uptime", "Time since the engine started", Some(Unit::Seconds), Gauge::default()),
            generation: add(r, "plugin_generation", "Generation of the running domain library: 1, then one more per reload", None, Gauge::default()),
            reloads: add(r, "plugin_reloads", "Domain library reloads", None, Counter::default()),
            mapped: add(r, "plugin_libraries_mapped", "Library images this process has loaded; none is unloaded", None, Gauge::default()),
            registry: Registry::default(),
        };
        let mut metrics = metrics;
        metrics.registry = std::mem::take(r);
        metrics.up.set(1);
        metrics.generation.set(1);
        metrics.register(subscriptions);
        metrics
    }

    /// A reload swapped in `generation` with these subscriptions.
    pub(crate) fn reloaded(&self, generation: u64, subscriptions: &[std::sync::Arc<Subscription>]) {
        self.generation.set(generation as i64);
        self.reloads.inc();
        self.register(subscriptions);
    }

    /// Every handler's counters exist (at 0) from the start.
    fn register(&self, subscriptions: &[std::sync::Arc<Subscription>]) {
        for s in subscriptions {
            for handler in super::status::handlers(s.plan.routes.values()) {
                let _ = self
                    .handled
                    .get_or_create(&handler_labels(&s.plan.name, &handler));
            }
            let _ = self.dead_lettered.get_or_create(&sub(&s.plan.name));
            let _ = self.retries.get_or_create(&sub(&s.plan.name));
        }
    }

    /// A batch committed: count what it did and how long it took.
    /// Time a subscription's loop spent, by phase.
    pub(crate) fn spent(&self, subscription: &str, spent: &crate::engine::timings::Spent) {
        use crate::engine::timings::Phase;
        for phase in Phase::ALL {
            let time = spent.get(phase);
            if !time.is_zero() {
                let labels = vec![
                    ("subscription", subscription.to_owned()),
                    ("phase", phase.name().to_owned()),
                ];
                self.spent.get_or_create(&labels).inc_by(time.as_secs_f64());
            }
        }
    }

    pub(crate) fn batch(&self, s: &Subscription, report: &Report, elapsed: Duration) {
        let name = &s.plan.name;
        let mut per_handler: Vec<(&str, u64)> = Vec::new();
        for message_type in &report.handled {
            let handler = s.plan.routes.get(message_type).map_or("", String::as_str);
            match per_handler.iter_mut().find(|(h, _)| *h == handler) {
                Some((_, n)) => *n += 1,
                None => per_handler.push((handler, 1)),
            }
        }
        let size = report.handled.len() as u64
            + u64::from(report.dead_lettered)
            + u64::from(report.skipped)
            + u64::from(report.retry.is_some());
        let share = elapsed.as_secs_f64() / size.max(1) as f64;
        for (handler, n) in per_handler {
            let labels = handler_labels(name, handler);
            self.handled.get_or_create(&labels).inc_by(n);
            let histogram = self.handler_seconds.get_or_create(&labels);
            for _ in 0..n {
                histogram.observe(share);
            }
        }
        let labels = sub(name);
        self.batch_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        let failed = u64::from(report.dead_lettered) + u64::from(report.retry.is_some());
        if failed > 0 {
            self.dead_lettered
                .get_or_create(&labels)
                .inc_by(report.dead_lettered.into());
            self.retries
                .get_or_create(&labels)
                .inc_by(report.retry.is_some().into());
            self.errors.get_or_create(&labels).inc_by(failed);
        }
        if report.skipped > 0 {
            self.skipped
                .get_or_create(&labels)
                .inc_by(report.skipped.into());
        }
    }

    /// An outbox round ended: `published` rows went out, `failed` attempts did not.
    pub(crate) fn outbox_round(&self, published: u64, failed: u64) {
        self.outbox_published.inc_by(published);
        self.outbox_failed.inc_by(failed);
    }

    /// A schedule fired `late` past its due time.
    pub(crate) fn schedule_fired(&self, late: Duration) {
        self.schedules_fired.inc();
        self.schedule_lateness.observe(late.as_secs_f64());
    }

    /// The text exposition (OpenMetrics), with the gauges set from `snapshot` first.
    pub(crate) fn encode(&self, snapshot: &super::status::Snapshot, shutting_down: bool) -> String {
        for s in &snapshot.subscriptions {
            let labels = sub(&s.name);
            let set = |family: &Family<Labels, Gauge>, value: Option<u64>| {
                if let Some(v) = value {
                    family.get_or_create(&labels).set(v as i64);
                }
            };
            set(&self.lag, s.lag);
            set(&self.pending, s.pending);
            set(&self.dead_letters, s.dead_letters);
            set(&self.stalled, s.stalled.map(u64::from));
            if s.lag.is_some() {
                set(&self.queue_depth, Some(s.backlog()));
            }
            set(&self.parked_keys, s.parked_keys);
            set(&self.held_messages, s.held_messages);
            if let Some(p) = &s.partitions {
                for (owner, count) in &p.owners {
                    let mut labels = labels.clone();
                    labels.push(("owner", owner.clone()));
                    self.partitions_owned
                        .get_or_create(&labels)
                        .set(i64::from(*count));
                }
            }
        }
        if let Some(outbox) = snapshot.outbox {
            self.outbox_pending.set(outbox.pending as i64);
            self.outbox_failing.set(outbox.failing as i64);
            self.outbox_held.set(outbox.held as i64);
            let age_ms = outbox.oldest_pending_age_ms.unwrap_or(0);
            self.outbox_oldest_age.set(age_ms as f64 / 1000.0);
        }
        if let Some(schedules) = snapshot.schedules {
            self.schedules_pending.set(schedules.pending as i64);
            self.schedules_overdue.set(schedules.overdue as i64);
        }
        self.up.set(i64::from(!shutting_down));
        self.uptime.set(self.started.elapsed().as_secs_f64());
        self.mapped.set(crate::plugin::generations_loaded() as i64);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

fn handler_labels(subscription: &str, handler: &str) -> Labels {
    vec![
        ("subscription", subscription.to_owned()),
        ("handler", handler.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_counts_by_handler_and_the_scrape_shows_it() {
        let metrics = Metrics::new(&[]);
        let plan = crate::subscription::SubscriptionPlan {
            name: "commands:shop::order".into(),
            categories: vec!["shop::order:command".into()],
            routes: [("Shop.Place.v1", "orders"), ("Shop.Ship.v1", "shipping")]
                .into_iter()
                .map(|(t, h)| (t.to_owned(), h.to_owned()))
                .collect(),
            options: Default::default(),
            kind: crate::plugin::Kind::CommandHandler,
        };
        let settings = crate::config::Settings::default();
        let s = Subscription {
            retry: crate::engine::retry::RetryPolicy::new(&settings),
            plan,
            settings,
            commands: true,
            kind: crate::config::SubscriptionType::EventStore,
            ordering: None,
        };
        let report = Report {
            handled: vec![
                "Shop.Place.v1".into(),
                "Shop.Place.v1".into(),
                "Shop.Ship.v1".into(),
            ],
            dead_lettered: 1,
            ..Report::default()
        };
        metrics.batch(&s, &report, Duration::from_millis(40));
        let mut recorder =
            crate::ops::status::SubscriptionStatus::new(&crate::ops::status::Target {
                name: "recorder".into(),
                standing: &crate::subscription::event_store::EventStoreKind,
                categories: vec!["d::sequence".into()],
                handlers: vec!["recorder".into()],
                partitions: None,
                workers: 4,
                parks: true,
            });
        (recorder.parked_keys, recorder.held_messages) = (Some(1), Some(15));
        let snapshot = crate::ops::status::Snapshot {
            subscriptions: vec![recorder],
            outbox: Some(crate::store::OutboxCounts {
                pending: 4,
                held: 1,
                failing: 2,
                oldest_pending_age_ms: Some(2500),
            }),
            schedules: Some(crate::store::ScheduleCounts {
                pending: 7,
                overdue: 2,
            }),
            ..Default::default()
        };
        metrics.schedule_fired(Duration::from_millis(3));
        let text = metrics.encode(&snapshot, false);
        for line in [
            "protean_messages_handled_total{subscription=\"commands:shop::order\",handler=\"orders\"} 2",
            "protean_messages_handled_total{subscription=\"commands:shop::order\",handler=\"shipping\"} 1",
            "protean_messages_dead_lettered_total{subscription=\"commands:shop::order\"} 1",
            "protean_handler_errors_total{subscription=\"commands:shop::order\"} 1",
            "protean_handler_duration_seconds_count{subscription=\"commands:shop::order\",handler=\"orders\"} 2",
            "protean_engine_up 1",
            "protean_schedules_pending 7",
            "protean_schedules_overdue 2",
            "protean_schedules_fired_total 1",
            "protean_schedule_lateness_seconds_count 1",
            "protean_plugin_generation 1",
            "protean_plugin_reloads_total 0",
            "protean_outbox_pending 4",
            "protean_outbox_failing 2",
            "protean_outbox_held 1",
            "protean_outbox_oldest_pending_age_seconds 2.5",
            "protean_ordered_parked_keys{subscription=\"recorder\"} 1",
            "protean_ordered_held_messages{subscription=\"recorder\"} 15",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
    }
}
