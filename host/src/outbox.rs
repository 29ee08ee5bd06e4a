//! The outbox processor: publishes what units of work committed to the broker, in commit order per
//! stream, at least once, however long the broker is away.
//!
//! Invariants: a row is deleted only after the broker accepted it; a row that fails waits for
//! its retry with capped exponential backoff and jitter, holding back the rows of its stream behind
//! it. No row is ever given up: after `outbox.max_attempts` failures it counts as held (an ERROR line,
//! a reminder every `REMIND_EVERY` attempts, `held` in status and metrics) and is still retried.
//! A round publishes for at most half the lease (`outbox.lease_ttl_ms`), so a processor has stopped
//! publishing to a stream before another one may take the stream over.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{
    broker::Broker,
    config::OutboxSettings,
    engine::{
        progress::State,
        run::{blocking, Backoff, Component, Fatal, Trouble},
        Shared,
    },
    message::PoisonError,
    store::{self, now_ms, Claim, ForeignLease, InFlight, OutboxItem, RowFailure},
};

/// Why the store could not serve the outbox processor: retried after a backoff.
#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error("the store keeps no outbox")]
    NoOutbox,
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// Why one target's rows were not published: the first row's attempt fails, and it is retried.
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("stored message is unreadable: {0}")]
    Unreadable(PoisonError),
    #[error(transparent)]
    Broker(crate::broker::Error),
    #[error("the broker did not answer within half the outbox lease")]
    TimedOut,
}

/// The name the outbox processor reports its progress under.
pub(crate) const NAME: &str = "outbox";

/// Publish until `shutdown`. Rows of the round in flight are published and marked first.
///
/// Rounds overlap: while the broker takes a round, the store records the round before it and reads the
/// next claim, passing over the rows in flight, and its wire forms are made. That claim is published
/// only if every row in flight was; otherwise it is dropped, the round is recorded, and the next claim
/// is read afresh, so a stream's rows still leave in commit order and a failed row still holds back
/// the rows behind it.
pub(crate) async fn run(
    shared: Arc<Shared>,
    broker: Arc<dyn Broker>,
    worker: String,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let progress = &shared.progress;
    let mut head = progress.head();
    let mut backoff = Backoff::new(NAME);
    let lease = shared.config.outbox.lease_ttl;
    let mut watch = LeaseWatch::new(lease);
    let mut held = Held::default();
    tracing::info!(
        worker,
        lease_ms = lease.as_millis() as u64,
        "outbox processor started"
    );
    // A claim read while the last round was on the wire, and that round, published but not recorded.
    let mut next: Option<Claimed> = None;
    let mut unrecorded: Option<Sent> = None;
    while !shutdown.is_cancelled() {
        let claimed = match next.take() {
            Some(claimed) => claimed,
            None => {
                // A claim with nothing in flight must see the last round's rows as published.
                if let Some(sent) = unrecorded.take() {
                    record(&shared, &worker, sent).await?;
                }
                match claim(&shared, &worker, &mut head).await? {
                    Ok(claimed) => claimed,
                    Err(error) => {
                        let trouble = Trouble::Unavailable {
                            component: Component::Outbox,
                            error: error.to_string(),
                        };
                        backoff.wait(trouble, &shutdown).await?;
                        continue;
                    }
                }
            }
        };
        backoff.reset();
        watch.observe(&worker, &claimed.claim);
        if claimed.targets.is_empty() {
            if let Some(sent) = unrecorded.take() {
                record(&shared, &worker, sent).await?;
            }
            let mut wait = nothing_claimed(&shared, claimed.claim.wake_at, claimed.seen);
            match held.idle(lease) {
                Idle::Release => release(&shared, &worker).await?,
                Idle::ReleaseIn(left) => wait = wait.min(left),
                Idle::Nothing => {}
            }
            tokio::select! {
                _ = head.changed() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => break,
            }
            continue;
        }
        held.busy();
        tracing::debug!(worker, rows = claimed.rows(), "outbox claimed rows");
        progress.set(NAME, State::Busy);
        // The claim made sure of the leases for three quarters of a lease from its start.
        let deadline = claimed.at + lease / 2;
        let in_flight = InFlight::new(
            claimed
                .targets
                .iter()
                .flat_map(|(_, r)| r.iter().map(|r| r.seq)),
        );
        let (sent, claimed) = tokio::join!(
            send(broker.as_ref(), claimed.targets, deadline),
            record_and_claim(&shared, &worker, &mut head, unrecorded.take(), in_flight),
        );
        let claimed = claimed?;
        if sent.complete {
            unrecorded = Some(sent);
            next = claimed;
        } else {
            record(&shared, &worker, sent).await?;
        }
    }
    if let Some(sent) = unrecorded.take() {
        record(&shared, &worker, sent).await?;
    }
    release(&shared, &worker).await?;
    progress.set(NAME, State::Stopped);
    Ok(())
}

/// A claim, when it was read (its round must be over within half a lease of then), and the head of the
/// store seen before it (what an empty claim says is published). Its rows are taken out of `claim` and
/// grouped by target.
struct Claimed {
    claim: Claim,
    targets: Vec<(String, Vec<OutboxItem>)>,
    at: tokio::time::Instant,
    seen: u64,
}

impl Claimed {
    /// The rows come with their wire forms, which the store made as it read them, on its own thread:
    /// they are ready before the broker is free, instead of being made while Redis waits (0.37 ms of
    /// the broker side's 2.5 ms in a round of 500, measured).
    fn new(mut claim: Claim, at: tokio::time::Instant, seen: u64) -> Self {
        let targets = by_target(std::mem::take(&mut claim.items));
        Self {
            claim,
            targets,
            at,
            seen,
        }
    }

    fn rows(&self) -> usize {
        self.targets.iter().map(|(_, rows)| rows.len()).sum()
    }
}

/// Give the worker's leases back. A failure is only logged: the leases end by themselves.
async fn release(shared: &Arc<Shared>, worker: &str) -> Result<(), Fatal> {
    let (store, worker) = (shared.store.clone(), worker.to_owned());
    let released = blocking(move || store.outbox().map(|o| o.release(&worker))).await?;
    if let Some(Err(error)) = released {
        tracing::warn!(%error, "cannot give the outbox's leases back; they end by themselves");
    }
    Ok(())
}

/// Whether the processor holds leases from its rounds, and since when it has had nothing to claim. It
/// keeps its streams while busy (the store renews their leases now and then, see
/// [`crate::store::outbox::to_lease`]) and gives them back after an eighth of a lease with nothing to
/// claim, well before they end: a lease that ends unreleased means a processor that stopped or
/// stalled.
#[derive(Debug, Default)]
struct Held {
    holding: bool,
    idle_since: Option<Instant>,
}

/// What an idle round does about the leases held.
#[derive(Debug, PartialEq, Eq)]
enum Idle {
    Nothing,
    /// Give them back now.
    Release,
    /// Give them back after this long, unless there is work meanwhile.
    ReleaseIn(Duration),
}

impl Held {
    /// A round claimed rows: their streams are held.
    fn busy(&mut self) {
        self.holding = true;
        self.idle_since = None;
    }

    /// A round claimed nothing.
    fn idle(&mut self, lease: Duration) -> Idle {
        if !self.holding {
            return Idle::Nothing;
        }
        let keep = lease / 8;
        let idle = self.idle_since.get_or_insert_with(Instant::now).elapsed();
        if idle < keep {
            return Idle::ReleaseIn(keep - idle);
        }
        *self = Self::default();
        Idle::Release
    }
}

/// Report a round that claimed nothing, and say how long to wait before the next claim. Rows waiting
/// for a retry or for another processor's lease (`wake_at`) mean not done, and not stalled either.
fn nothing_claimed(shared: &Shared, wake_at: Option<u64>, seen: u64) -> Duration {
    // A floor, so that clocks that disagree (PostgreSQL judges leases by its own) cannot make a spin.
    const AT_LEAST: Duration = Duration::from_millis(20);
    let poll = shared.config.poll_interval;
    match wake_at {
        Some(at) => {
            shared.progress.set(NAME, State::Retrying);
            Duration::from_millis(at.saturating_sub(now_ms())).clamp(AT_LEAST, poll.max(AT_LEAST))
        }
        None => {
            shared.progress.published_up_to(seen);
            shared.progress.set(NAME, State::Idle { head: seen });
            poll
        }
    }
}

/// A claim with nothing in flight; a failure is returned, for the backoff to report.
async fn claim(
    shared: &Arc<Shared>,
    worker: &str,
    head: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<Result<Claimed, StoreError>, Fatal> {
    let seen = *head.borrow_and_update();
    let at = tokio::time::Instant::now();
    let (shared, worker) = (shared.clone(), worker.to_owned());
    let claim = blocking(move || claim_now(&shared, &worker, &InFlight::none())).await?;
    Ok(claim.map(|claim| Claimed::new(claim, at, seen)))
}

fn claim_now(shared: &Shared, worker: &str, in_flight: &InFlight) -> Result<Claim, StoreError> {
    let outbox = shared.store.outbox().ok_or(StoreError::NoOutbox)?;
    let settings = &shared.config.outbox;
    Ok(outbox.claim(
        worker,
        settings.messages_per_tick as usize,
        settings.lease_ttl,
        in_flight,
    )?)
}

/// What the store does while the broker takes a round: record the round before it (`sent`), then claim
/// the next one, passing over the rows `in_flight`. No claim when the record failed (its rows are
/// claimable again, and published again after the round in flight: at least once) or the claim did
/// (the next claim, read afresh, reports it).
async fn record_and_claim(
    shared: &Arc<Shared>,
    worker: &str,
    head: &mut tokio::sync::watch::Receiver<u64>,
    sent: Option<Sent>,
    in_flight: InFlight,
) -> Result<Option<Claimed>, Fatal> {
    let seen = *head.borrow_and_update();
    let at = tokio::time::Instant::now();
    let (shared, worker) = (shared.clone(), worker.to_owned());
    blocking(move || {
        if !sent.is_none_or(|sent| record_now(&shared, &worker, sent)) {
            return None;
        }
        let claim = claim_now(&shared, &worker, &in_flight).ok()?;
        Some(Claimed::new(claim, at, seen))
    })
    .await
}

/// What one target's publish came to.
enum Outcome {
    Published,
    Failed(PublishError),
    /// The round's time was up before its turn: claimable again, not a failed attempt.
    NotTried,
}

/// What a round came to: rows published, and the first row of each target that failed.
struct Sent {
    published: Vec<u64>,
    failed: Vec<Failed>,
    /// Every row claimed was published.
    complete: bool,
}

struct Failed {
    seq: u64,
    attempts: u32,
    target: String,
    error: String,
}

/// Publish a claimed round, stream by stream in claim order, until `deadline`.
async fn send(
    broker: &dyn Broker,
    targets: Vec<(String, Vec<OutboxItem>)>,
    deadline: tokio::time::Instant,
) -> Sent {
    let mut sent = Sent {
        published: Vec::new(),
        failed: Vec::new(),
        complete: true,
    };
    for (target, items) in targets {
        // A target's rows are never none (see `by_target`).
        let (first, attempts) = (items[0].seq, items[0].attempts);
        let seqs: Vec<u64> = items.iter().map(|i| i.seq).collect();
        match publish_target(broker, &target, items, deadline).await {
            Outcome::Published => sent.published.extend(seqs),
            // The first row carries the failure; the rest of the stream waits behind it.
            Outcome::Failed(error) => {
                sent.complete = false;
                sent.failed.push(Failed {
                    seq: first,
                    attempts,
                    target,
                    error: error.to_string(),
                });
            }
            Outcome::NotTried => sent.complete = false,
        }
    }
    sent
}

async fn record(shared: &Arc<Shared>, worker: &str, sent: Sent) -> Result<(), Fatal> {
    let (shared, worker) = (shared.clone(), worker.to_owned());
    blocking(move || {
        record_now(&shared, &worker, sent);
    })
    .await
}

/// Record what a round came to; false when the store could not.
fn record_now(shared: &Shared, worker: &str, sent: Sent) -> bool {
    let count = sent.published.len() as u64;
    let failures = sent.failed.len() as u64;
    let settings = &shared.config.outbox;
    let rows: Vec<RowFailure> = sent
        .failed
        .iter()
        .map(|f| RowFailure {
            seq: f.seq,
            error: f.error.clone(),
            retry_at: now_ms() + backoff_ms(settings, f.attempts + 1),
        })
        .collect();
    // A round whose time ran out before any stream was tried has nothing to record.
    let recorded = if sent.published.is_empty() && rows.is_empty() {
        Ok(())
    } else {
        shared
            .store
            .outbox()
            .ok_or(StoreError::NoOutbox)
            .and_then(|o| Ok(o.settle(worker, &sent.published, &rows)?))
    };
    shared.metrics.outbox_round(count, failures);
    shared.progress.count(|t| t.published += count);
    if let Err(error) = recorded {
        let error = error.to_string();
        // The rows stay claimable, and are published again: at least once.
        tracing::error!(error, "cannot record what the outbox published");
        return false;
    }
    // Logged once recorded, so that what the lines say is what status shows.
    for (f, row) in sent.failed.iter().zip(&rows) {
        log_failure(
            settings,
            &f.target,
            row.seq,
            f.attempts + 1,
            &f.error,
            row.retry_at,
        );
    }
    true
}

/// The claimed rows grouped by target stream, targets in claim order, rows in commit order.
fn by_target(items: Vec<OutboxItem>) -> Vec<(String, Vec<OutboxItem>)> {
    let mut targets: Vec<(String, Vec<OutboxItem>)> = Vec::new();
    for mut item in items {
        let target = std::mem::take(&mut item.target);
        match targets.iter_mut().find(|(t, _)| *t == target) {
            Some((_, list)) => list.push(item),
            None => targets.push((target, vec![item])),
        }
    }
    targets
}

/// Publish `items` to `target`.
async fn publish_target(
    broker: &dyn Broker,
    target: &str,
    items: Vec<OutboxItem>,
    deadline: tokio::time::Instant,
) -> Outcome {
    if tokio::time::Instant::now() >= deadline {
        return Outcome::NotTried;
    }
    let payloads: Result<Vec<String>, _> = items.into_iter().map(|i| i.payload).collect();
    let payloads = match payloads {
        Ok(payloads) => payloads,
        Err(e) => return Outcome::Failed(PublishError::Unreadable(e)),
    };
    // Bounded so that the lease cannot run out while this processor still publishes to the stream.
    match tokio::time::timeout_at(deadline, broker.publish(target, payloads)).await {
        Ok(Ok(())) => Outcome::Published,
        Ok(Err(e)) => Outcome::Failed(PublishError::Broker(e)),
        Err(_) => Outcome::Failed(PublishError::TimedOut),
    }
}

/// What a failed attempt is worth saying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Note {
    /// A WARN line: it will be retried.
    Retry,
    /// The ERROR line: it has just become held.
    Held,
    /// An ERROR line reminding that it is still held.
    StillHeld,
    /// Nothing: a held row between reminders.
    Quiet,
}

/// One WARN line per retry until the row is held; then an ERROR line when it becomes held and a
/// reminder every `REMIND_EVERY` attempts, so a long outage is neither silent nor flooding the log.
fn note(settings: &OutboxSettings, attempt: u32) -> Note {
    let held = settings.max_attempts;
    match attempt {
        a if a < held => Note::Retry,
        a if a == held => Note::Held,
        a if (a - held) % OutboxSettings::REMIND_EVERY == 0 => Note::StillHeld,
        _ => Note::Quiet,
    }
}

fn log_failure(
    settings: &OutboxSettings,
    target: &str,
    seq: u64,
    attempt: u32,
    error: &str,
    retry_at: u64,
) {
    let retry_in_ms = retry_at.saturating_sub(now_ms());
    match note(settings, attempt) {
        Note::Retry => {
            tracing::warn!(%target, seq, attempt, error, retry_in_ms, "outbox publish failed; will retry")
        }
        Note::Held => {
            tracing::error!(%target, seq, attempt, error, retry_in_ms, "outbox row held after outbox.max_attempts failed attempts: it and the rows of its stream after it wait; still retried (see `protean-host outbox list`)")
        }
        Note::StillHeld => {
            tracing::error!(%target, seq, attempt, error, retry_in_ms, "outbox row still held; still retried")
        }
        Note::Quiet => {}
    }
}

/// Exponential backoff capped at `max_retry_delay_ms`, with ±20% jitter (so that processors retrying
/// together spread out).
fn backoff_ms(settings: &OutboxSettings, attempt: u32) -> u64 {
    let base = settings
        .retry_delay_ms
        .saturating_mul(1 << attempt.saturating_sub(1).min(20))
        .min(settings.max_retry_delay_ms);
    let jitter = 0.8 + 0.4 * crate::engine::retry::jitter();
    (base as f64 * jitter) as u64
}

/// Says when another processor's lease keeps streams from this one for longer than a live processor
/// leaves its lease unchanged (it stopped or stalled), and when this one takes such streams over.
#[derive(Debug)]
struct LeaseWatch {
    /// Leases met, by target: since when this one has been seen unchanged, and whether it was said.
    seen: HashMap<String, (ForeignLease, Instant, bool)>,
    /// A live processor renews a lease it uses at its first claim after a quarter of it has passed
    /// (its rounds take at most half a lease) and releases it after an eighth of a lease idle, so it
    /// leaves a lease unchanged for at most seven eighths of it: longer, the lease is suspect.
    suspect_after: Duration,
}

impl LeaseWatch {
    fn new(lease: Duration) -> Self {
        Self {
            seen: HashMap::new(),
            suspect_after: lease * 7 / 8,
        }
    }

    fn observe(&mut self, worker: &str, claim: &Claim) {
        let now = now_ms();
        for lease in &claim.taken_over {
            tracing::warn!(target = %lease.target, from = %lease.worker, worker, expired_ms_ago = now.saturating_sub(lease.until), "outbox took over a stream whose lease expired without being released (its processor stopped or stalled)");
        }
        self.seen
            .retain(|target, (lease, ..)| claim.waiting.contains(lease) && &lease.target == target);
        for lease in &claim.waiting {
            let entry = self
                .seen
                .entry(lease.target.clone())
                .or_insert_with(|| (lease.clone(), Instant::now(), false));
            if !entry.2 && entry.1.elapsed() >= self.suspect_after {
                entry.2 = true;
                tracing::warn!(target = %lease.target, holder = %lease.worker, worker, held_for_ms = entry.1.elapsed().as_millis() as u64, expires_in_ms = lease.until.saturating_sub(now), "outbox stream waits for a lease its holder has neither renewed nor released (stopped or stalled?); taking it over when it expires");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_kept_while_busy_and_given_back_after_an_eighth_of_a_lease_idle() {
        let lease = Duration::from_millis(800);
        let mut held = Held::default();
        assert_eq!(held.idle(lease), Idle::Nothing, "nothing held yet");
        held.busy();
        assert!(
            matches!(held.idle(lease), Idle::ReleaseIn(left) if left <= lease / 8),
            "idle, but not for long"
        );
        held.busy();
        assert!(
            matches!(held.idle(lease), Idle::ReleaseIn(left) if left > lease / 16),
            "work meanwhile starts the idle time again"
        );
        // Not a wait for anything: an eighth of the lease passes.
        std::thread::sleep(lease / 8);
        assert_eq!(held.idle(lease), Idle::Release);
        assert_eq!(held.idle(lease), Idle::Nothing, "given back once");
    }

    #[test]
    fn a_held_row_is_said_once_then_every_ten_attempts() {
        let settings = OutboxSettings {
            max_attempts: 3,
            ..OutboxSettings::default()
        };
        let notes: Vec<Note> = (1..=24).map(|a| note(&settings, a)).collect();
        assert_eq!(&notes[..3], [Note::Retry, Note::Retry, Note::Held]);
        let reminders: Vec<u32> = (4..=24)
            .filter(|a| note(&settings, *a) == Note::StillHeld)
            .collect();
        assert_eq!(reminders, [13, 23]);
        assert_eq!(notes[4], Note::Quiet);
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap_and_never_stops() {
        let settings = OutboxSettings {
            retry_delay_ms: 100,
            max_retry_delay_ms: 1000,
            ..OutboxSettings::default()
        };
        let within = |attempt, base: u64| {
            let ms = backoff_ms(&settings, attempt);
            assert!(
                ms >= base * 8 / 10 && ms <= base * 12 / 10,
                "attempt {attempt}: {ms} ms"
            );
        };
        within(1, 100);
        within(2, 200);
        within(4, 800);
        within(5, 1000);
        within(1000, 1000);
    }
}
