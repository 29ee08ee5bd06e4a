//! Where each subscription stands: measured through the `Store` and `Broker` traits, so it works with
//! or without a running engine (`protean-host subscriptions status`), and feeds `/readyz` and `/metrics`.
//!
//! Lag means messages not yet read: for an event-store subscription, the messages of its categories
//! after its stored position (counted, not a difference of global positions, which would count other
//! categories' messages too); for a stream subscription, the entries not yet delivered to its group.
//! Pending means delivered but not acknowledged (streams only).

use std::{fmt, sync::Arc, time::Duration};

use serde::Serialize;

use crate::{
    broker::{partitions::PartitionStatus, Broker},
    config::Config,
    engine::{batch::Subscription, Engine},
    store::{OutboxCounts, ScheduleCounts, Store},
    subscription::{
        standing::{self, Standing},
        workers,
    },
};

/// A subscription to measure.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    /// Its kind, which says how to measure it.
    pub(crate) standing: &'static dyn Standing,
    pub categories: Vec<String>,
    pub handlers: Vec<String>,
    /// Ordered stream subscriptions: how many partitions their keys fall in.
    pub partitions: Option<u32>,
    /// Workers sharing an ordered event-store subscription, each with its own position (else 1).
    pub workers: u32,
    /// An ordered event-store subscription that parks a key after a dead letter.
    pub parks: bool,
}

impl Target {
    /// The target for subscription `sub`, as its kind measures it under `config`.
    pub(crate) fn of(sub: &Subscription, config: &Config) -> Self {
        let (standing, plan) = (standing::of(sub), &sub.plan);
        Self {
            name: plan.name.clone(),
            standing,
            categories: plan.categories.clone(),
            handlers: handlers(plan.routes.values()),
            partitions: standing.partitions(config),
            workers: standing.workers(config, plan),
            parks: standing.parks(plan),
        }
    }
}

/// The subscriptions a domain runs with its configuration, as the engine plans them.
pub fn targets(engine: &Engine) -> Vec<Target> {
    targets_of(engine.config(), &engine.running())
}

/// The targets for `subscriptions`, run under `config`.
pub(crate) fn targets_of(config: &Config, subscriptions: &[Arc<Subscription>]) -> Vec<Target> {
    subscriptions
        .iter()
        .map(|s| Target::of(s, config))
        .collect()
}

/// Distinct handler names, in order.
pub(crate) fn handlers<'a>(names: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in names {
        if !out.contains(name) {
            out.push(name.clone());
        }
    }
    out
}

/// One subscription as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionStatus {
    pub name: String,
    pub handlers: Vec<String>,
    /// Shown as its type (the configuration's `subscription_type`).
    #[serde(rename = "type", serialize_with = "label")]
    pub(crate) standing: &'static dyn Standing,
    pub categories: Vec<String>,
    /// Event store: the global position it has finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// Streams: its consumer group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub lag: Option<u64>,
    pub pending: Option<u64>,
    pub dead_letters: Option<u64>,
    /// Streams: consumers in the group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumers: Option<u64>,
    /// Event store with a broker: the replica holding its lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Ordered stream subscriptions: partitions per replica, parked keys, held messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<PartitionStatus>,
    /// Ordered subscriptions that park (on a broker or the event store): keys parked behind a dead
    /// letter, and the messages they hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parked_keys: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_messages: Option<u64>,
    /// Without an engine: derived from the figures; in `/readyz`: what its loop is doing.
    pub state: String,
    /// A running engine only: whether its loop is stalled, and since when it last reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_progress_ms: Option<u64>,
    /// Why a figure could not be measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SubscriptionStatus {
    /// A row with no figures yet.
    pub(crate) fn new(target: &Target) -> Self {
        Self {
            name: target.name.clone(),
            handlers: target.handlers.clone(),
            standing: target.standing,
            categories: target.categories.clone(),
            position: None,
            group: None,
            lag: None,
            pending: None,
            dead_letters: None,
            consumers: None,
            owner: None,
            partitions: None,
            parked_keys: None,
            held_messages: None,
            state: String::new(),
            stalled: None,
            last_progress_ms: None,
            error: None,
        }
    }

    /// Its type: `event_store` or `stream`.
    pub fn kind(&self) -> &'static str {
        self.standing.label()
    }

    /// Messages waiting for this subscription: not yet read plus not yet acknowledged.
    pub fn backlog(&self) -> u64 {
        self.lag.unwrap_or(0) + self.pending.unwrap_or(0)
    }
}

/// Every subscription, the outbox and the schedules, measured at one time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub subscriptions: Vec<SubscriptionStatus>,
    /// Rows by state, for stores that keep an outbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxCounts>,
    /// Pending schedules, and those of them overdue: more than `schedules_overdue_after_ms` past due.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedules: Option<ScheduleCounts>,
    /// What overdue meant when `schedules` was measured (`server.scheduler.overdue_after_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedules_overdue_after_ms: Option<u64>,
}

/// What to measure, and how long it may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Every part (store, broker) is bounded by this.
    pub timeout: Duration,
    /// `outbox.max_attempts`: outbox rows count as held from this many failed attempts.
    pub outbox_held_after: u32,
    /// `server.scheduler.overdue_after_ms`: a pending schedule this long past due (on the system clock)
    /// counts as overdue.
    pub overdue_after: Duration,
}

impl Limits {
    /// The limits of `config`, with `timeout`.
    pub fn of(config: &crate::config::Config, timeout: Duration) -> Self {
        Self {
            timeout,
            outbox_held_after: config.outbox.max_attempts,
            overdue_after: config.scheduler.overdue_after,
        }
    }
}

/// Measure `targets`. Store reads run on a blocking thread; every part is bounded by `limits.timeout`,
/// and a part that fails or times out leaves its figures empty with an `error` instead. `broker` is
/// `None` when no broker is configured or when it is known to be down.
pub async fn measure(
    store: Arc<dyn Store>,
    broker: Option<Arc<dyn Broker>>,
    broker_configured: bool,
    targets: &[Target],
    limits: Limits,
) -> Snapshot {
    let limit = limits.timeout;
    let mut rows: Vec<SubscriptionStatus> = targets.iter().map(SubscriptionStatus::new).collect();
    let (outbox, schedules) = measure_store(store, targets, &mut rows, limits).await;
    match &broker {
        Some(broker) => {
            let measured =
                tokio::time::timeout(limit, measure_broker(broker.as_ref(), targets, &mut rows))
                    .await;
            if measured.is_err() {
                fail_streams(
                    &mut rows,
                    &format!("broker did not answer within {limit:?}"),
                );
            }
        }
        None if broker_configured => fail_streams(&mut rows, "broker unavailable"),
        None => {}
    }
    for row in &mut rows {
        row.state = derived_state(row, broker_configured).to_owned();
    }
    Snapshot {
        subscriptions: rows,
        outbox,
        schedules_overdue_after_ms: schedules.map(|_| limits.overdue_after.as_millis() as u64),
        schedules,
    }
}

fn label<S: serde::Serializer>(
    standing: &&'static dyn Standing,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(standing.label())
}

/// Rows the broker keeps figures of cannot be measured without it.
fn fail_streams(rows: &mut [SubscriptionStatus], error: &str) {
    for row in rows.iter_mut().filter(|r| r.standing.on_broker()) {
        row.error.get_or_insert_with(|| error.to_owned());
    }
}

/// Each subscription's figures, the outbox's and the schedules' counts.
type StoreFigures = (
    Vec<Result<Figures, String>>,
    Option<OutboxCounts>,
    Option<ScheduleCounts>,
);

/// What the store says of one subscription whose messages it keeps.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    position: u64,
    lag: u64,
    dead_letters: u64,
    /// Parked keys and the messages they hold, for one that parks.
    parked: Option<(u64, u64)>,
}

impl Figures {
    fn of(store: &dyn Store, t: &Target) -> crate::store::Result<Self> {
        // Workers: the lowest of their positions, so the lag counts whatever any has left.
        let position = workers::lowest_position(store, &t.name, t.workers)?;
        // Also for one that no longer parks: keys an earlier build parked still hold messages.
        let keys = store.parked_keys(&t.name)?;
        let parked = (t.parks || !keys.is_empty())
            .then(|| (keys.len() as u64, keys.iter().map(|k| k.held).sum()));
        Ok(Self {
            position,
            lag: store.count_after(&t.categories, position)?,
            dead_letters: store.dead_letters(Some(&t.name))?.len() as u64,
            parked,
        })
    }
}

/// Positions, lag and dead letters of event-store subscriptions, and the outbox and schedule counts.
async fn measure_store(
    store: Arc<dyn Store>,
    targets: &[Target],
    rows: &mut [SubscriptionStatus],
    limits: Limits,
) -> (Option<OutboxCounts>, Option<ScheduleCounts>) {
    let (limit, held_after) = (limits.timeout, limits.outbox_held_after);
    let overdue_after = limits.overdue_after.as_millis() as i64;
    let wanted: Vec<Target> = targets.to_vec();
    let work = tokio::task::spawn_blocking(move || -> StoreFigures {
        let figures = wanted
            .iter()
            .map(|t| {
                if t.standing.on_broker() {
                    return Ok(Figures::default());
                }
                Figures::of(store.as_ref(), t).map_err(|e| e.to_string())
            })
            .collect();
        let outbox = store.outbox().and_then(|o| o.counts(held_after).ok());
        // Read after the rest: overdue means past due by now, not by when the measurement began.
        let overdue_before = crate::clock::SYSTEM.now_ms() - overdue_after;
        let schedules = store.schedules().counts(overdue_before);
        if let Err(error) = &schedules {
            tracing::debug!(%error, "cannot count the schedules");
        }
        (figures, outbox, schedules.ok())
    });
    let (figures, outbox, schedules) = match tokio::time::timeout(limit, work).await {
        Ok(Ok(measured)) => measured,
        Ok(Err(e)) => (
            vec![Err(format!("store check failed: {e}")); rows.len()],
            None,
            None,
        ),
        Err(_) => (
            vec![Err(format!("store did not answer within {limit:?}")); rows.len()],
            None,
            None,
        ),
    };
    for (row, figure) in rows.iter_mut().zip(figures) {
        if row.standing.on_broker() {
            continue;
        }
        match figure {
            Ok(figures) => {
                row.position = Some(figures.position);
                row.lag = Some(figures.lag);
                row.pending = Some(0);
                row.dead_letters = Some(figures.dead_letters);
                row.parked_keys = figures.parked.map(|(keys, _)| keys);
                row.held_messages = figures.parked.map(|(_, held)| held);
            }
            Err(error) => row.error = Some(error),
        }
    }
    (outbox, schedules)
}

/// What the broker knows of each subscription, as its kind reads it.
async fn measure_broker(broker: &dyn Broker, targets: &[Target], rows: &mut [SubscriptionStatus]) {
    for (target, row) in targets.iter().zip(rows.iter_mut()) {
        target.standing.measure_broker(broker, target, row).await;
    }
}

/// A state read from the figures alone, for a domain that may not be running.
fn derived_state(row: &SubscriptionStatus, broker_configured: bool) -> &'static str {
    if row.error.is_some() {
        return "unknown";
    }
    if row.backlog() == 0 {
        return "caught up";
    }
    row.standing
        .unattended(row, broker_configured)
        .unwrap_or("behind")
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<34} {:<11} {:<28} {:>8} {:>8} {:>6} {:>9}  state",
            "subscription", "type", "at", "lag", "pending", "dead", "consumers"
        )?;
        for s in &self.subscriptions {
            let at = match (&s.group, s.position) {
                (Some(group), _) => format!("group {group}"),
                (None, Some(position)) => format!("position {position}"),
                (None, None) => "-".into(),
            };
            let figure = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
            let mut state = s.state.clone();
            if let Some(owner) = &s.owner {
                state.push_str(&format!(" (lease: {owner})"));
            }
            if let Some(error) = &s.error {
                state.push_str(&format!(" ({error})"));
            }
            writeln!(
                f,
                "{:<34} {:<11} {:<28} {:>8} {:>8} {:>6} {:>9}  {state}",
                s.name,
                s.kind(),
                at,
                figure(s.lag),
                figure(s.pending),
                figure(s.dead_letters),
                figure(s.consumers),
            )?;
            writeln!(
                f,
                "    reads {} -> {}",
                s.categories.join(", "),
                s.handlers.join(", ")
            )?;
            if let Some(p) = &s.partitions {
                let owners: Vec<String> =
                    p.owners.iter().map(|(o, n)| format!("{o} {n}")).collect();
                writeln!(
                    f,
                    "    partitions: {} ({} unowned); parked keys {}, held messages {}",
                    if owners.is_empty() {
                        "none held".to_owned()
                    } else {
                        owners.join(", ")
                    },
                    p.unowned,
                    p.parked,
                    p.held
                )?;
            } else if let (Some(parked), Some(held)) = (s.parked_keys, s.held_messages) {
                writeln!(f, "    parked keys {parked}, held messages {held}")?;
            }
        }
        if let Some(o) = &self.outbox {
            writeln!(f, "{}", outbox_line(o))?;
        }
        if let Some(s) = &self.schedules {
            writeln!(f, "{}", schedules_line(s, self.schedules_overdue_after_ms))?;
        }
        Ok(())
    }
}

/// `outbox: 3 pending (2 failing, 1 held), oldest 12.3 s; 40 published`.
fn outbox_line(o: &OutboxCounts) -> String {
    let oldest = o
        .oldest_pending_age_ms
        .map(|ms| format!(", oldest {:.1} s", ms as f64 / 1000.0))
        .unwrap_or_default();
    format!(
        "outbox: {} pending ({} failing, {} held){oldest}",
        o.pending, o.failing, o.held
    )
}

/// `schedules: 12 pending, 2 overdue (more than 10 s past due)`.
pub(crate) fn schedules_line(s: &ScheduleCounts, overdue_after_ms: Option<u64>) -> String {
    let after = overdue_after_ms
        .map(|ms| format!(" (more than {} past due)", seconds(ms)))
        .unwrap_or_default();
    format!(
        "schedules: {} pending, {} overdue{after}",
        s.pending, s.overdue
    )
}

/// `10 s`, `0.5 s`, `12.3 s`: whole seconds without a fraction.
fn seconds(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_store_subscription_that_parks_shows_its_parked_keys_and_held_messages() {
        let mut row = SubscriptionStatus::new(&Target {
            name: "recorder".into(),
            standing: &crate::subscription::event_store::EventStoreKind,
            categories: vec!["d::sequence".into()],
            handlers: vec!["recorder".into()],
            partitions: None,
            workers: 1,
            parks: true,
        });
        (row.parked_keys, row.held_messages) = (Some(1), Some(15));
        let snapshot = Snapshot {
            subscriptions: vec![row],
            ..Snapshot::default()
        };
        let text = snapshot.to_string();
        assert!(
            text.contains("\n    parked keys 1, held messages 15\n"),
            "{text}"
        );
        let json = serde_json::to_value(&snapshot).unwrap();
        let row = &json["subscriptions"][0];
        assert_eq!(
            (&row["parked_keys"], &row["held_messages"]),
            (&1.into(), &15.into())
        );
    }

    fn row(name: &str, standing: &'static dyn Standing) -> SubscriptionStatus {
        SubscriptionStatus::new(&Target {
            name: name.into(),
            standing,
            categories: vec!["d::sequence".into()],
            handlers: vec![name.into()],
            partitions: None,
            workers: 1,
            parks: false,
        })
    }

    #[test]
    fn each_row_shows_its_type_and_why_it_is_behind() {
        use crate::subscription::{event_store::EventStoreKind, stream::StreamKind};
        let mut stream = row("projector", &StreamKind);
        (stream.lag, stream.pending, stream.consumers) = (Some(2), Some(1), Some(0));
        assert_eq!(derived_state(&stream, true), "behind, no consumers");
        let mut store = row("recorder", &EventStoreKind);
        store.lag = Some(3);
        assert_eq!(
            derived_state(&store, true),
            "behind, no replica holds its lease"
        );
        assert_eq!(derived_state(&store, false), "behind");
        store.lag = Some(0);
        assert_eq!(derived_state(&store, true), "caught up");
        store.error = Some("store did not answer".into());
        assert_eq!(derived_state(&store, true), "unknown");
        let snapshot = Snapshot {
            subscriptions: vec![stream, store],
            ..Snapshot::default()
        };
        let text = snapshot.to_string();
        let types: Vec<_> = text
            .lines()
            .filter(|l| !l.starts_with(' '))
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>())
            .collect();
        assert_eq!(
            types,
            [
                ["subscription", "type"],
                ["projector", "stream"],
                ["recorder", "event_store"]
            ],
            "{text}"
        );
        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(json["subscriptions"][0]["type"], "stream");
        assert_eq!(json["subscriptions"][1]["type"], "event_store");
    }

    #[tokio::test]
    async fn the_schedules_are_counted_with_those_overdue_on_the_system_clock() {
        use crate::ops::schedules::{cancel, testing::set};
        let store = Arc::new(crate::store::MemoryStore::default());
        let now = crate::clock::SYSTEM.now_ms();
        set(store.as_ref(), "long-late", now - 3_600_000);
        set(store.as_ref(), "just-due", now - 1_000);
        set(store.as_ref(), "later", now + 3_600_000);
        set(store.as_ref(), "cancelled", now - 3_600_000);
        cancel(store.as_ref(), "cancelled", now).unwrap();
        let limits = Limits {
            timeout: Duration::from_secs(5),
            outbox_held_after: 10,
            overdue_after: Duration::from_secs(10),
        };
        let snapshot = measure(store, None, false, &[], limits).await;
        assert_eq!(
            snapshot.schedules,
            Some(ScheduleCounts {
                pending: 3,
                overdue: 1
            }),
            "one is more than 10 s past due; the cancelled one waits for nothing"
        );
        assert_eq!(snapshot.schedules_overdue_after_ms, Some(10_000));
        assert!(
            snapshot
                .to_string()
                .ends_with("\nschedules: 3 pending, 1 overdue (more than 10 s past due)\n"),
            "{snapshot}"
        );
        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(json["schedules"]["pending"], 3);
        assert_eq!(json["schedules"]["overdue"], 1);
        assert_eq!(json["schedules_overdue_after_ms"], 10_000);
    }

    #[test]
    fn the_schedules_line_says_what_overdue_means() {
        let counts = ScheduleCounts {
            pending: 12,
            overdue: 2,
        };
        assert_eq!(
            schedules_line(&counts, Some(10_000)),
            "schedules: 12 pending, 2 overdue (more than 10 s past due)"
        );
        assert_eq!(
            schedules_line(&counts, Some(2_500)),
            "schedules: 12 pending, 2 overdue (more than 2.5 s past due)"
        );
        assert_eq!(
            schedules_line(&counts, None),
            "schedules: 12 pending, 2 overdue"
        );
        let text = Snapshot::default().to_string();
        assert!(!text.contains("schedules"), "none measured: {text}");
    }

    #[test]
    fn the_outbox_line_shows_what_waits_and_for_how_long() {
        let counts = OutboxCounts {
            pending: 3,
            failing: 2,
            held: 1,
            oldest_pending_age_ms: Some(12_345),
        };
        assert_eq!(
            outbox_line(&counts),
            "outbox: 3 pending (2 failing, 1 held), oldest 12.3 s"
        );
    }
}
