//! The scheduler: a pending schedule whose time has come on the engine's clock becomes an ordinary
//! message, appended (and published through the outbox when a broker is configured) exactly once.
//!
//! Invariant: a schedule fires only in a unit of work that appends its message and marks it fired
//! together, and the store refuses that unit unless the schedule is still pending with the id read
//! ([`crate::store::Error::NotPending`]). So replicas that race, a cancel that races, or a replica
//! that dies mid-round can make a round fire less than it read, never a schedule twice, never one
//! that was cancelled. A schedule due while every replica was down fires on the next start, late,
//! with its lateness measured.
//!
//! When it looks: at the next due time it knows of (a handler of this process that sets a sooner one
//! moves it: [`Alarm`]), and every `server.scheduler.poll_interval_ms` for schedules set elsewhere.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    progress::State,
    run::{blocking, Backoff, Fatal, Trouble},
    Shared,
};
use crate::{
    clock,
    store::{self, schedules::FiredSchedule, Schedule},
    sync::lock,
    unit_of_work::UnitOfWork,
};

/// The name the scheduler reports its progress under.
pub(crate) const NAME: &str = "scheduler";

/// What one round came to.
#[derive(Debug, Default)]
struct Round {
    /// Schedules fired, with how late each was (ms past due, on the engine's clock).
    lateness: Vec<u64>,
    /// The global position of the last message appended.
    appended: Option<u64>,
    /// The round fired a full batch: more may be due.
    full: bool,
    /// Another replica fired or a handler cancelled one of the schedules read: read again.
    raced: bool,
}

impl Round {
    /// Nothing fired: what was read changed meanwhile.
    fn raced() -> Self {
        Self {
            raced: true,
            ..Self::default()
        }
    }
}

/// Schedules set by this process's commits since the scheduler last looked: their earliest due time,
/// rung so that the scheduler wakes sooner when that comes before its next.
#[derive(Debug, Default)]
pub(crate) struct Alarm {
    earliest: Mutex<Option<i64>>,
    rung: Notify,
}

impl Alarm {
    /// A commit set a schedule due at `due_ms`.
    pub(crate) fn set(&self, due_ms: i64) {
        let mut earliest = lock(&self.earliest);
        *earliest = Some(earliest.map_or(due_ms, |e| e.min(due_ms)));
        self.rung.notify_one();
    }

    /// Read the due schedules again now (test mode saw one the scheduler has not).
    pub(crate) fn look(&self) {
        self.set(i64::MIN);
    }

    fn take(&self) -> Option<i64> {
        lock(&self.earliest).take()
    }
}

/// How often settled schedules past `server.scheduler.keep_settled_hours` are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Fire due schedules until `stop`. A round in flight is committed first.
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) -> Result<(), String> {
    let progress = &shared.progress;
    let mut backoff = Backoff::new(NAME);
    let mut pruned: Option<Instant> = None;
    while !stop.is_cancelled() {
        let round = match fire_due(&shared).await? {
            Ok(round) => round,
            Err(error) => {
                backoff.wait(Trouble::store(error), &stop).await?;
                continue;
            }
        };
        backoff.reset();
        if !round.lateness.is_empty() {
            fired(&shared, &round);
        }
        if round.full || round.raced {
            continue;
        }
        // Between rounds, never before one: pruning a large backlog must not hold up a firing.
        if pruned.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) && prune(&shared).await? {
            pruned = Some(Instant::now());
        }
        let next = match next_due(&shared).await? {
            Ok(next) => next,
            Err(error) => {
                backoff.wait(Trouble::store(error), &stop).await?;
                continue;
            }
        };
        if !sleep(&shared, next, &stop).await {
            break;
        }
    }
    progress.set(NAME, State::Stopped);
    Ok(())
}

/// Idle until `next` (the earliest pending schedule, as read), a schedule set here that is due
/// sooner, or the poll for schedules set elsewhere; false on `stop`. A schedule set here due later
/// costs no read of the store.
async fn sleep(shared: &Shared, mut next: Option<i64>, stop: &CancellationToken) -> bool {
    let poll = tokio::time::sleep(shared.config.scheduler.poll_interval);
    tokio::pin!(poll);
    loop {
        // Registered before it reports idle: test mode on a virtual clock moves the clock only to a
        // time somebody waits for, and must see this wait once it sees the scheduler idle.
        let due = next.map(|at| shared.clock.sleep_until(at));
        // Nothing it does waits on messages, so no head makes it busy (a schedule set meanwhile rings
        // the alarm instead). Reported as idle at the head it saw, it was behind every later commit
        // until its next poll, and test mode waited for that poll.
        shared.progress.set(NAME, State::Waiting);
        tokio::select! {
            woken = clock::until(due) => {
                shared.progress.set(NAME, State::Busy);
                drop(woken);
                return true;
            }
            _ = shared.scheduler_alarm.rung.notified() => {
                if let Some(set) = shared.scheduler_alarm.take() {
                    next = Some(next.map_or(set, |n| n.min(set)));
                }
            }
            _ = &mut poll => return true,
            _ = stop.cancelled() => return false,
        }
    }
}

/// Fire the schedules due now, up to a batch, in one unit of work.
async fn fire_due(shared: &Arc<Shared>) -> Result<Result<Round, store::Error>, Fatal> {
    let shared = shared.clone();
    blocking(move || {
        let now = shared.clock.now();
        let now_ms = now.timestamp_millis();
        let batch = shared.config.scheduler.batch as usize;
        let due = shared.store.schedules().due(now_ms, batch)?;
        if due.is_empty() {
            return Ok(Round::default());
        }
        shared.progress.set(NAME, State::Busy);
        let unit = firing(&due, now, shared.config.broker.is_some());
        match shared.store.commit(&unit) {
            Ok(appended) => Ok(Round {
                lateness: due
                    .iter()
                    .map(|s| now_ms.saturating_sub(s.due_ms).max(0) as u64)
                    .collect(),
                appended,
                full: due.len() == batch,
                raced: false,
            }),
            Err(store::Error::NotPending { key }) => {
                tracing::debug!(%key, "a schedule read as due was fired or cancelled meanwhile; reading again");
                Ok(Round::raced())
            }
            // It may have committed: what is still pending is read again, so nothing fires twice.
            Err(store::Error::OutcomeUnknown { reason }) => {
                tracing::warn!(%reason, "the outcome of a firing commit is unknown; reading the due schedules again");
                Ok(Round::raced())
            }
            Err(error) => Err(error),
        }
    })
    .await
}

/// The unit that fires `due` at `now`: each schedule's message, and the claim that it was pending.
fn firing(due: &[Schedule], now: chrono::DateTime<chrono::Utc>, publish: bool) -> UnitOfWork {
    UnitOfWork {
        messages: due.iter().map(|s| s.message(now)).collect(),
        fired: due
            .iter()
            .map(|s| FiredSchedule {
                key: s.key.clone(),
                id: s.id.clone(),
                at_ms: now.timestamp_millis(),
            })
            .collect(),
        publish,
        ..UnitOfWork::default()
    }
}

/// Delete the schedules settled longer ago than they are kept, a chunk per statement and at most
/// `CHUNKS` chunks: whether none is left (else the next round between firings goes on). A failure is
/// only logged, as done: it costs disk, not messages, and the next prune tries again.
async fn prune(shared: &Arc<Shared>) -> Result<bool, Fatal> {
    const CHUNK: usize = 1000;
    const CHUNKS: usize = 10;
    let shared = shared.clone();
    blocking(move || {
        let keep = shared.config.scheduler.keep_settled;
        let before = shared.clock.now_ms() - keep.as_millis() as i64;
        let (mut deleted, mut done) = (0, false);
        for _ in 0..CHUNKS {
            match shared.store.schedules().prune(before, CHUNK) {
                Ok(n) => {
                    deleted += n;
                    done = n < CHUNK as u64;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot prune settled schedules; trying again in an hour");
                    done = true;
                }
            }
            if done {
                break;
            }
        }
        if deleted > 0 {
            let hours = keep.as_secs() / 3600;
            tracing::info!(deleted, kept_hours = hours, "settled schedules pruned");
        }
        done
    })
    .await
}

async fn next_due(shared: &Arc<Shared>) -> Result<Result<Option<i64>, store::Error>, Fatal> {
    let store = shared.store.clone();
    blocking(move || store.schedules().next_due()).await
}

/// Tell the subscriptions, the metrics and the log about a committed round.
fn fired(shared: &Shared, round: &Round) {
    if let Some(appended) = round.appended {
        shared.progress.advanced(appended);
    }
    for late in &round.lateness {
        shared.metrics.schedule_fired(Duration::from_millis(*late));
    }
    let latest = round.lateness.iter().max().copied().unwrap_or(0);
    let late = latest >= shared.config.scheduler.overdue_after.as_millis() as u64;
    match late {
        // Due while nothing ran (every replica down), or the engine cannot keep up.
        true => tracing::warn!(
            fired = round.lateness.len(),
            most_late_ms = latest,
            "schedules fired late"
        ),
        false => tracing::debug!(
            fired = round.lateness.len(),
            most_late_ms = latest,
            "schedules fired"
        ),
    }
}
