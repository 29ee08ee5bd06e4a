//! The handler loop, written once: decode, classify, call, settle, commit.
//!
//! Runs on a blocking thread. For one fetched batch it:
//! 1. classifies every message: poison (bad metadata, bad checksum, a command nobody handles) goes to
//!    the dead letters at once; an expired command or a type nobody here handles is skipped; the rest is
//!    routed to its handler;
//! 2. calls the plugin once per run of consecutive messages for the same handler, with a [`Buffer`] as
//!    host services;
//! 3. on a failure: drops the failed message's partial writes; a rejection, or a retryable failure out of
//!    retries, is dead-lettered and the batch goes on; otherwise the batch stops there and the message is
//!    retried later. An ordered subscription stops only the failed message's key: its later messages are
//!    left unsettled (as are those of a key parked by a dead letter; on the event store those are held
//!    in the store instead, see `subscription::parking`) and the other keys go on;
//! 4. commits everything settled (writes, processed markers, dead letters, the new position) as one unit
//!    of work, re-running the batch if another writer changed a stream the handlers read.
//!
//! Invariant: the position never passes a message that was neither handled nor dead-lettered, and a
//! message is never settled while an earlier message of its key in the batch is not.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use crate::{
    config::{Settings, SubscriptionType},
    engine::retry::RetryPolicy,
    message::{Cause, MetaView, TooBig},
    ordering::{partition_of, Ordering},
    plugin::{Delivery, Failure, Handlers},
    store::{self, DeadLetter, MarkerKey, Store, StoredMessage},
    subscription::{
        parking::{self, Parking},
        SubscriptionPlan,
    },
    unit_of_work::{Buffer, CallRecord, Fence, PositionUpdate, ProcessedMarker, UnitOfWork},
};

/// What to do about a message read over `server.max_message_bytes` (it is dead-lettered with this).
const READ_FIX: &str = "raise the limit and replay the dead letter (protean-host dlq replay), or keep large payloads out of messages and send a reference";

/// A subscription as the engine runs it.
#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) plan: SubscriptionPlan,
    pub(crate) settings: Settings,
    pub(crate) retry: RetryPolicy,
    /// A subscription of command handlers: an unroutable message is poison, not someone else's event.
    pub(crate) commands: bool,
    /// Where its messages come from.
    pub(crate) kind: SubscriptionType,
    /// Ordered subscriptions: how messages are keyed (a failure then holds back only its key).
    pub(crate) ordering: Option<Ordering>,
}

/// Failed attempts per message identity ([`StoredMessage::identity`]), for messages that are waiting to be retried; and, for ordered
/// subscriptions, the keys waiting for a retry and until when (their messages are held until then),
/// in milliseconds on the engine's clock.
#[derive(Debug, Default, Clone)]
pub(crate) struct Attempts {
    failed: HashMap<String, u32>,
    waiting: HashMap<String, i64>,
}

/// The categories of `messages`, each once.
fn categories(messages: &[crate::unit_of_work::NewMessage]) -> Vec<String> {
    let mut categories: Vec<String> = messages
        .iter()
        .map(|m| crate::store::category(&m.stream).to_owned())
        .collect();
    categories.sort_unstable();
    categories.dedup();
    categories
}

/// The earliest due time among the schedules `writes` set.
fn earliest_due(writes: &[crate::unit_of_work::ScheduleWrite]) -> Option<i64> {
    let due = writes.iter().filter_map(|w| match w {
        crate::unit_of_work::ScheduleWrite::Set { due_ms, .. } => Some(*due_ms),
        crate::unit_of_work::ScheduleWrite::Cancel { .. } => None,
    });
    due.min()
}

/// `delay` after `now`, in milliseconds.
fn later(now: i64, delay: Duration) -> i64 {
    now.saturating_add(delay.as_millis() as i64)
}

impl Attempts {
    /// Take the failed attempts of calls recorded and never settled ([`Store::recorded_calls`]): calls a
    /// process died in (or that failed and wait for a retry) count as failed attempts here.
    pub(crate) fn recover(&mut self, recorded: std::collections::HashMap<String, u32>) {
        for (id, attempts) in recorded {
            let failed = self.failed.entry(id).or_insert(0);
            *failed = (*failed).max(attempts);
        }
    }

    /// Count one failed attempt for messages that were in a call which may never have returned (no
    /// record says more): each is then called alone, and recorded.
    pub(crate) fn suspect<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>) {
        for id in ids {
            let failed = self.failed.entry(id.to_owned()).or_insert(0);
            *failed = (*failed).max(1);
        }
    }

    /// The failed attempts of the message of identity `id` so far.
    fn failed(&self, id: &str) -> u32 {
        self.failed.get(id).copied().unwrap_or(0)
    }

    /// When the first waiting key may be tried again (None when no key waits).
    pub(crate) fn next_due(&self) -> Option<i64> {
        self.waiting.values().min().copied()
    }

    /// Forget the waiting keys whose time has come at `now`: their messages may be handled again.
    pub(crate) fn release_due(&mut self, now: i64) {
        self.waiting.retain(|_, until| *until > now);
    }

    /// Whether `key` waits for a retry at `now` (a wait that is over is forgotten).
    pub(crate) fn waits(&mut self, key: &str, now: i64) -> bool {
        if self.waiting.get(key).is_some_and(|until| *until <= now) {
            self.waiting.remove(key);
        }
        self.waiting.contains_key(key)
    }

    /// Hold `key`'s messages for `delay` from `now` (a batch of its messages failed as a whole).
    pub(crate) fn wait(&mut self, key: &str, delay: Duration, now: i64) {
        self.waiting.insert(key.to_owned(), later(now, delay));
    }

    /// The keys whose messages are held.
    fn held(&self) -> HashSet<String> {
        self.waiting.keys().cloned().collect()
    }
}

/// What the caller needs to know after a batch.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// The subscription's new position, if it moved.
    pub(crate) position: Option<u64>,
    /// The global position of the last message the commit appended.
    pub(crate) appended: Option<u64>,
    /// A message that failed and must be retried after this delay (the batch stopped before it; in an
    /// ordered batch, the shortest of the waiting keys' delays).
    pub(crate) retry: Option<Duration>,
    /// Ordered batches: keys whose message failed and waits for a retry after the delay; their later
    /// messages in the batch were left unsettled.
    pub(crate) waiting: Vec<(String, Duration)>,
    /// Ordered batches that park: keys whose message was dead-lettered; their later messages in the
    /// batch were left unsettled (held in the store, on the event store).
    pub(crate) parked: Vec<String>,
    /// Parking event-store batches: messages held behind parked keys (settled for the position).
    pub(crate) held: u32,
    pub(crate) handled: Vec<String>,
    pub(crate) written: Vec<String>,
    pub(crate) dead_lettered: u32,
    pub(crate) skipped: u32,
    /// Identities of the messages settled (handled, skipped or dead-lettered): a broker acknowledges
    /// them.
    pub(crate) settled: Vec<String>,
    /// Stream subscriptions: the dead letters, for the broker's dead-letter stream (the event store keeps
    /// them in the unit of work instead), without the message's data and metadata: the broker's
    /// dead letter is the entry itself.
    pub(crate) dead_letters: Vec<DeadLetter>,
    /// The identities of the messages dead-lettered, in the order of the unit's dead letters.
    pub(crate) dead_lettered_ids: Vec<String>,
    /// Every message of the batch was settled (or was another worker's).
    pub(crate) complete: bool,
    /// The earliest due time of the schedules the commit set: the scheduler may have to wake sooner.
    pub(crate) earliest_due: Option<i64>,
}

impl Report {
    /// Add the report of the next unit of the same batch (see [`units`]).
    fn absorb(&mut self, next: Report) {
        self.position = next.position.or(self.position);
        self.appended = next.appended.or(self.appended);
        self.retry = match (self.retry, next.retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.waiting.extend(next.waiting);
        self.parked.extend(next.parked);
        self.held += next.held;
        self.handled.extend(next.handled);
        self.written.extend(next.written);
        self.dead_lettered += next.dead_lettered;
        self.skipped += next.skipped;
        self.settled.extend(next.settled);
        self.dead_letters.extend(next.dead_letters);
        self.dead_lettered_ids.extend(next.dead_lettered_ids);
        self.complete &= next.complete;
        self.earliest_due = match (self.earliest_due, next.earliest_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// What the batch needs from the engine.
pub(crate) struct Context<'a> {
    /// The domain's handlers, called for each run of messages.
    pub(crate) plugin: &'a dyn Handlers,
    pub(crate) store: &'a dyn Store,
    /// What handlers read as now, and what dates their writes.
    pub(crate) clock: &'a crate::clock::Clock,
    pub(crate) subscription: &'a Subscription,
    pub(crate) version_retries: u32,
    /// Write outbox rows for what the handlers append (a broker is configured).
    pub(crate) publish: bool,
    /// Checked by the store on commit: partitions this batch's messages belong to, with the fencing
    /// tokens of this replica's leases on them.
    pub(crate) fences: Vec<Fence>,
    /// Where the batch's position is stored: the subscription's name, or a worker's position name;
    /// None while the read runs ahead of a held message, which the position must not pass.
    pub(crate) position: Option<&'a str>,
    /// One of several workers sharing an ordered subscription: the others' keys are not its work.
    pub(crate) worker: Option<Worker>,
    /// Ordered subscriptions: the messages' keys, when the caller has them already (else worked out
    /// here, once per batch).
    pub(crate) keys: Option<&'a [String]>,
    /// Where calls are registered with their deadline (none for a one-off replay).
    pub(crate) deadlines: Option<&'a super::deadlines::Deadlines>,
    /// Who may call now, when a suspect must call alone (in process; none for a one-off replay).
    pub(crate) turns: Option<&'a super::turns::Turns>,
    /// Told which categories a commit appends to, while it runs (in process; none for a one-off
    /// replay).
    pub(crate) progress: Option<&'a super::progress::Progress>,
    /// Which calls are recorded in the store before they start ([`CallRecord`]).
    pub(crate) record: Record,
    /// Ordered event-store subscriptions that park: the parked keys, or the key being drained.
    pub(crate) parking: Option<Parking<'a>>,
    /// Who delivered the messages.
    pub(crate) origin: Origin,
    /// A broker delivered every message for the first time. Such a batch is built without looking up
    /// processed markers: a message processed before can only come again as a new entry when it was
    /// published twice (the outbox publishes at least once), and the commit refuses its marker (see
    /// [`run_unit`]).
    pub(crate) first_delivery: bool,
}

/// Who delivers a batch's messages: this decides where its dead letters go and whether a message may
/// come twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Origin {
    /// Read from the store by the one reader that owns the position: dead letters are rows of the
    /// store, with the message.
    #[default]
    Store,
    /// A broker, which redelivers: processed markers are always looked up, and dead letters go to the
    /// broker's dead-letter stream, where the entry itself is the message.
    Broker,
}

/// Which handler calls are recorded before they start, so that a process dying in one is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Record {
    /// Every call: nothing else would tell which messages a dead process was handling.
    Every,
    /// Only calls of messages that failed before. The caller knows otherwise which messages a dead
    /// process may have been in (a broker's redeliveries; an event-store reader's first batch after an
    /// owner that died busy, see `subscription::event_store`) and marks them failed once.
    #[default]
    Suspects,
}

impl<'a> Context<'a> {
    /// The context of `subscription`'s batches in the engine `shared` with `plugin`: no fences, no
    /// position in the store (a broker keeps where the subscription is), not a worker.
    pub(crate) fn new(
        shared: &'a super::Shared,
        plugin: &'a std::sync::Arc<dyn Handlers>,
        subscription: &'a Subscription,
    ) -> Self {
        Self {
            plugin: plugin.as_ref(),
            store: shared.store.as_ref(),
            clock: &shared.clock,
            subscription,
            version_retries: shared.config.version_retries,
            publish: shared.config.broker.is_some(),
            fences: Vec::new(),
            position: None,
            worker: None,
            keys: None,
            deadlines: Some(&shared.deadlines),
            turns: (!plugin.isolated()).then_some(&shared.turns),
            progress: Some(&shared.progress),
            record: Record::Suspects,
            parking: None,
            origin: Origin::Store,
            first_delivery: false,
        }
    }
}

/// Worker `index` of `of`: it handles the keys that fall in its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Worker {
    pub(crate) index: u32,
    pub(crate) of: u32,
}

/// Why a message is settled without a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    AlreadyProcessed,
    /// Read again after its key parked behind a later dead letter: it was settled before.
    SettledBeforePark,
    /// An event of a type no handler of this subscription takes.
    NotHandledHere,
    /// A command past its deadline.
    Expired,
    /// Its message was settled by an earlier unit of the batch (see [`Earlier`]).
    SettledInThisBatch,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::AlreadyProcessed => "already processed",
            Skip::SettledBeforePark => "settled before its key parked",
            Skip::NotHandledHere => "no handler here for this type",
            Skip::Expired => "command past its deadline",
            Skip::SettledInThisBatch => "settled earlier in this batch (delivered twice)",
        })
    }
}

enum Class<'m> {
    Poison(String),
    Skip(Skip),
    /// Another worker's key: settled for this worker's position, not counted as skipped.
    Theirs,
    /// A message of a parked key: held behind it in the store, settled for the position.
    Held,
    Handle(&'m str),
}

/// Process `messages` and commit the outcome.
///
/// A message that failed before (a retry, or a call a process died in: see [`CallRecord`]) is
/// called alone and committed in a unit of its own, so that if it kills the process again it takes
/// nothing else with it: the messages before it are committed, and it alone is counted.
pub(crate) fn run(
    ctx: &Context<'_>,
    messages: &[StoredMessage],
    attempts: &mut Attempts,
) -> store::Result<Report> {
    let keys = keys(ctx, messages);
    // A single reader always reads from its position, so a due key's failed message comes first. A
    // worker may be reading ahead of it: it releases due keys itself, when it reads from its position.
    // Once per batch, before its first unit: a key released between units would let its later
    // messages, in a later unit, pass its failed one, which an earlier unit held.
    if ctx.worker.is_none() {
        attempts.release_due(ctx.clock.now_ms());
    }
    let mut report: Option<Report> = None;
    let mut earlier = Earlier::default();
    let units = units(messages, attempts);
    let last = units.len().saturating_sub(1);
    for (n, range) in units.into_iter().enumerate() {
        let unit_keys = keys.get(range.clone()).unwrap_or_default();
        // The position may not pass a message an earlier unit left unsettled.
        let whole = report.as_ref().is_none_or(|r| r.complete);
        let batch = Batch {
            messages: &messages[range],
            keys: unit_keys,
            whole,
        };
        // From its call records to its commit: a record left while a suspect runs would be charged
        // its crash. Units of a message that failed before (a suspect) are that message alone.
        let suspect =
            batch.messages.len() == 1 && attempts.failed(&batch.messages[0].identity()) > 0;
        let turn = ctx.turns.map(|turns| turns.take(suspect));
        let outcome = run_unit(ctx, &batch, attempts, &earlier);
        drop(turn);
        let next = match (outcome, report.take()) {
            (Ok(next), done) => {
                report = done;
                next
            }
            (Err(error), None) => return Err(error),
            // Earlier units are committed: report them, and retry the rest after a pause.
            (Err(error), Some(mut done)) => {
                tracing::warn!(subscription = %ctx.subscription.plan.name, %error, "store unavailable after part of a batch committed; will retry the rest");
                done.complete = false;
                done.retry = Some(done.retry.unwrap_or(Duration::from_secs(1)));
                return Ok(done);
            }
        };
        if n < last {
            earlier.absorb(&next);
        }
        // An unordered batch stops at a failed message; an ordered one holds only its key.
        let stop = next.retry.is_some() && ctx.subscription.ordering.is_none();
        report = Some(match report.take() {
            Some(mut done) => {
                done.absorb(next);
                done
            }
            None => next,
        });
        if stop {
            break;
        }
    }
    Ok(report.unwrap_or(Report {
        complete: true,
        ..Report::default()
    }))
}

/// The units a batch is committed in: one for all, unless some messages failed before; each of those
/// is a unit of its own, and the runs between them are units too.
fn units(messages: &[StoredMessage], attempts: &Attempts) -> Vec<std::ops::Range<usize>> {
    let mut units = Vec::new();
    if attempts.failed.is_empty() {
        units.push(0..messages.len());
        return units;
    }
    let mut start = 0;
    for (i, m) in messages.iter().enumerate() {
        if attempts.failed(&m.identity()) > 0 {
            if start < i {
                units.push(start..i);
            }
            units.push(i..i + 1);
            start = i + 1;
        }
    }
    if start < messages.len() {
        units.push(start..messages.len());
    }
    units
}

/// What the earlier units of a batch did, for its later units: the keys they stopped (a wait or a
/// park), which later units hold too; the messages they settled. A message may be in a batch twice
/// (published again by an outbox whose replica died before marking it, or redelivered); a later unit
/// settles its second entry without a call. Dead-lettered, the first leaves no processed marker, and
/// its count of calls ends with its commit: called afresh, a second entry of a message that kills its
/// process would kill again, as many times, and its replica would die before the broker took the dead
/// letter, for ever.
#[derive(Default)]
struct Earlier {
    stopped: HashSet<String>,
    settled: HashSet<String>,
}

impl Earlier {
    fn absorb(&mut self, unit: &Report) {
        self.stopped
            .extend(unit.waiting.iter().map(|(key, _)| key.clone()));
        self.stopped.extend(unit.parked.iter().cloned());
        self.settled.extend(unit.settled.iter().cloned());
    }

    /// Whether an earlier unit settled message `m`.
    fn settled(&self, m: &StoredMessage) -> bool {
        !self.settled.is_empty() && self.settled.contains(&m.identity())
    }
}

/// One unit of a batch: its messages, their ordering keys (empty when unordered), and whether every
/// message before it in the batch was settled (else the position must stay where it is).
struct Batch<'m> {
    messages: &'m [StoredMessage],
    keys: &'m [String],
    whole: bool,
}

/// Process one unit and commit it, re-running it on conflicts.
fn run_unit(
    ctx: &Context<'_>,
    batch: &Batch<'_>,
    attempts: &mut Attempts,
    earlier: &Earlier,
) -> store::Result<Report> {
    let messages = batch.messages;
    let mut conflicts = 0;
    // Stream subscriptions look for processed markers (a broker redelivers), unless every message is
    // a first delivery; event-store ones only after a commit found that another consumer got there
    // first. An ordered batch settles messages past an unsettled one, so a re-read meets some
    // settled ones.
    let broker = ctx.origin == Origin::Broker;
    let mut recheck = broker && !ctx.first_delivery || ctx.subscription.ordering.is_some();
    let mut raced = 0;
    loop {
        // A first delivery built unchecked must not dead-letter, retry or hold a message processed
        // before (or one it holds twice): when it would, the markers are looked up, and if any of its
        // messages was processed, it is built again, checked, before anything of it is committed.
        let unchecked = (broker && !recheck).then(|| attempts.clone());
        let (mut unit, mut report, settled) = build(ctx, batch, attempts, earlier, recheck)?;
        if let Some(before) = unchecked {
            if !handled_or_skipped(&unit, &report) && any_processed(ctx, messages)? {
                *attempts = before;
                recheck = true;
                continue;
            }
        }
        if ctx.origin == Origin::Broker {
            report.dead_letters = std::mem::take(&mut unit.dead_letters);
        }
        let commit = || ctx.store.commit(&unit);
        let committed = super::timings::within(super::timings::Phase::Commit, || {
            match ctx.progress.filter(|_| !unit.messages.is_empty()) {
                Some(progress) => progress.committing(&categories(&unit.messages), commit),
                None => commit(),
            }
        });
        match committed {
            Ok(appended) => {
                for id in settled {
                    attempts.failed.remove(&id);
                }
                report.appended = appended;
                report.earliest_due = earliest_due(&unit.schedules);
                report.written = unit
                    .messages
                    .iter()
                    .map(|m| m.message_type.clone())
                    .collect();
                return Ok(report);
            }
            // Another writer changed a stream or a document this batch read: run it again on what is
            // stored now.
            Err(conflict) if conflict.is_conflict() && conflicts < ctx.version_retries => {
                conflicts += 1;
                tracing::debug!(subscription = %ctx.subscription.plan.name, %conflict, conflicts, "conflict; re-running the batch");
            }
            // A race with another consumer (a reclaim of a slow one's entries), or a first delivery
            // holding a message published twice, gets here; the re-run, checked, skips what was
            // committed before. Bounded all the same.
            Err(store::Error::AlreadyProcessed {
                subscription,
                message_id,
            }) if raced < 3 => {
                raced += 1;
                recheck = true;
                tracing::info!(%subscription, %message_id, "a message of this batch was processed before (by another consumer, or delivered twice); re-running the batch without it");
            }
            Err(conflict) if conflict.is_conflict() => {
                // Persistent contention: count it as a failure of the first message, so it is retried with
                // backoff and, eventually, dead-lettered instead of spinning.
                let first = &messages[0];
                return Ok(fail_first(ctx, first, attempts, &conflict.to_string()));
            }
            Err(other) => return Err(other),
        }
    }
}

/// Whether any of `messages` was processed before, or is among them twice.
fn any_processed(ctx: &Context<'_>, messages: &[StoredMessage]) -> store::Result<bool> {
    let none_theirs = vec![false; messages.len()];
    let done = already_processed(ctx, messages, &none_theirs, true)?;
    Ok(done.contains(&true))
}

/// Whether a build only handled and skipped messages: no dead letter, retry, wait, park or hold, each
/// of which a message processed before must not get.
fn handled_or_skipped(unit: &UnitOfWork, report: &Report) -> bool {
    unit.dead_letters.is_empty()
        && report.dead_lettered == 0
        && report.retry.is_none()
        && report.waiting.is_empty()
        && report.parked.is_empty()
        && report.held == 0
}

fn fail_first(
    ctx: &Context<'_>,
    first: &StoredMessage,
    attempts: &mut Attempts,
    error: &str,
) -> Report {
    let attempt = attempts.failed.entry(first.identity()).or_insert(0);
    *attempt += 1;
    let delay = ctx
        .subscription
        .retry
        .next_delay(*attempt, super::retry::jitter())
        .unwrap_or_default();
    tracing::warn!(subscription = %ctx.subscription.plan.name, message_id = %first.id, attempt = *attempt, error, "commit keeps conflicting; retrying the batch");
    Report {
        retry: Some(delay),
        ..Report::default()
    }
}

/// Build the unit of work for a batch, without committing. Returns the ids of messages whose retry state
/// can be forgotten once it commits.
fn build(
    ctx: &Context<'_>,
    batch: &Batch<'_>,
    attempts: &mut Attempts,
    earlier: &Earlier,
    recheck: bool,
) -> store::Result<(UnitOfWork, Report, Vec<String>)> {
    let (messages, keys) = (batch.messages, batch.keys);
    let sub = ctx.subscription;
    let metas: Vec<Result<MetaView<'_>, String>> = messages
        .iter()
        .map(|m| {
            // Before anything decodes it here: an oversized message is poison, handled by no one.
            let limit = sub.settings.max_message_bytes;
            TooBig::check(m.size(), limit, || "message".into(), READ_FIX)
                .map_err(|e| e.to_string())?;
            let view = match m.decoded.view() {
                Some(view) => view,
                None => MetaView::parse(&m.metadata).map_err(|e| e.to_string())?,
            };
            view.verify(&m.data).map_err(|e| e.to_string())?;
            Ok(view)
        })
        .collect();
    let causes: Vec<Cause<'_>> = messages
        .iter()
        .zip(&metas)
        .map(|(m, meta)| Cause {
            id: &m.id,
            stream: &m.stream,
            meta: meta.as_ref().ok(),
        })
        .collect();
    let now = ctx.clock.now();
    let theirs = theirs(ctx, keys, messages.len());
    let done = already_processed(ctx, messages, &theirs, recheck)?;
    let classes: Vec<Class<'_>> = messages
        .iter()
        .zip(&metas)
        .zip(done.into_iter().zip(theirs))
        .enumerate()
        .map(|(i, ((m, meta), (done, theirs)))| {
            if theirs {
                Class::Theirs
            } else if done {
                Class::Skip(Skip::AlreadyProcessed)
            } else if earlier.settled(m) {
                Class::Skip(Skip::SettledInThisBatch)
            } else if let Some(class) = parked(ctx, keys, i, m) {
                class
            } else {
                classify(sub, m, meta, now)
            }
        })
        .collect();
    let buffer = Buffer::new(
        ctx.store,
        ctx.clock,
        &causes,
        sub.settings.max_message_bytes,
    );
    let mut unit = UnitOfWork {
        publish: ctx.publish,
        fences: ctx.fences.clone(),
        ..UnitOfWork::default()
    };
    let mut report = Report::default();
    let mut settled_ids = Vec::new();
    // Dead-lettered because calls of theirs never came back (see the end of this function).
    let mut crashed_out = Vec::new();
    let mut settled = vec![false; messages.len()];
    let mut called = vec![false; messages.len()];
    let mut waiting = attempts.held();
    waiting.extend(earlier.stopped.iter().cloned());
    let mut held = Held::new(sub.ordering.as_ref(), keys, waiting);
    let mut i = 0;
    while i < messages.len() {
        if matches!(classes[i], Class::Held) || held.parked_in_store(i, ctx.parking) {
            parking::hold(&mut unit, &keys[i], &messages[i]);
            report.held += 1;
            settled[i] = true;
            i += 1;
            continue;
        }
        if held.contains(i) {
            i += 1;
            continue;
        }
        let handler = match &classes[i] {
            Class::Poison(reason) => {
                dead_letter(ctx, &mut unit, &messages[i], "", reason, 1);
                report.dead_lettered += 1;
                report.dead_lettered_ids.push(messages[i].identity());
                settled_ids.push(messages[i].identity());
                settled[i] = true;
                i += 1;
                continue;
            }
            Class::Skip(why) => {
                skip(sub, &messages[i], *why);
                report.skipped += 1;
                settled_ids.push(messages[i].identity());
                settled[i] = true;
                i += 1;
                continue;
            }
            Class::Theirs => {
                settled[i] = true;
                i += 1;
                continue;
            }
            Class::Held => unreachable!("a held message is recorded before its class is matched"),
            Class::Handle(handler) => *handler,
        };
        // Nothing failed before on the busy path: no identity to format.
        let before = if attempts.failed.is_empty() {
            0
        } else {
            attempts.failed(&messages[i].identity())
        };
        if before > 0 && sub.retry.next_delay(before, 0.0).is_none() {
            // Its calls never came back: dead-lettered without a call that would end this process too.
            dead_letter(
                ctx,
                &mut unit,
                &messages[i],
                handler,
                &never_settled(before),
                before,
            );
            crashed_out.push(messages[i].identity());
            report.dead_lettered += 1;
            report.dead_lettered_ids.push(messages[i].identity());
            settled_ids.push(messages[i].identity());
            settled[i] = true;
            if let Some(key) = held.park(i) {
                report.parked.push(key);
            }
            i += 1;
            continue;
        }
        let end = (i..messages.len())
            .find(|&j| !matches!(classes[j], Class::Handle(h) if h == handler) || held.contains(j))
            .unwrap_or(messages.len());
        if ctx.record == Record::Every || before > 0 {
            record_calls(ctx, &messages[i..end], attempts)?;
        }
        called[i..end].fill(true);
        let deliveries: Vec<Delivery<'_>> = messages[i..end].iter().map(delivery).collect();
        let limit = Duration::from_millis(sub.settings.handler_timeout_ms);
        let call = ctx
            .deadlines
            .map(|d| d.start(&sub.plan.name, handler, limit));
        let outcome = super::timings::within(super::timings::Phase::Handle, || {
            ctx.plugin
                .handle_batch(handler, &deliveries, &buffer.view(i), limit)
        });
        drop(call);
        let outcome = match buffer.refusal(i..end) {
            Some((at, reason)) => outcome.refused_at(at - i, reason),
            None => outcome,
        };
        let outcome = match buffer.unreadable(i) {
            Some(reason) => outcome.unreadable(&reason),
            None => outcome,
        };
        let ok_end = i + outcome.handled.min(end - i);
        for (j, m) in messages.iter().enumerate().take(ok_end).skip(i) {
            tracing::debug!(subscription = %sub.plan.name, handler, message_type = %m.message_type, message_id = %m.id, global_position = m.global_position, "handled");
            unit.processed.push(ProcessedMarker {
                subscription: sub.plan.name.clone(),
                message_id: m.identity(),
                global_position: m.global_position,
                build_id: ctx.plugin.build_id().to_owned(),
            });
            report.handled.push(m.message_type.clone());
            settled_ids.push(m.identity());
            settled[j] = true;
        }
        let failure = match outcome.failure {
            Some(failure) if ok_end < end => failure,
            None if ok_end < end => Failure {
                retryable: true,
                message: "the plugin returned before handling every message".into(),
                crashed: false,
            },
            _ => {
                i = end;
                continue;
            }
        };
        buffer.discard_from(ok_end);
        if failure.crashed && end - ok_end > 1 {
            // Which of the call's messages it died on is unknown: each is tried again alone.
            report.retry = Some(crashed(
                sub,
                handler,
                &messages[ok_end..end],
                attempts,
                &failure,
            ));
            break;
        }
        let failed = &messages[ok_end];
        let attempt = attempts
            .failed
            .get(&failed.identity())
            .copied()
            .unwrap_or(0)
            + 1;
        tracing::error!(subscription = %sub.plan.name, handler, message_type = %failed.message_type, message_id = %failed.id, attempt, error = %failure.message, "failed processing");
        let delay = if failure.retryable {
            sub.retry.next_delay(attempt, super::retry::jitter())
        } else {
            None
        };
        match delay {
            Some(delay) => {
                attempts.failed.insert(failed.identity(), attempt);
                tracing::warn!(subscription = %sub.plan.name, message_id = %failed.id, attempt, delay_ms = delay.as_millis() as u64, "retrying after backoff");
                report.retry = Some(report.retry.map_or(delay, |d| d.min(delay)));
                match held.hold(ok_end) {
                    Some(key) => {
                        let until = later(ctx.clock.now_ms(), delay);
                        attempts.waiting.insert(key.clone(), until);
                        report.waiting.push((key, delay));
                    }
                    None => break,
                }
            }
            None => {
                dead_letter(ctx, &mut unit, failed, handler, &failure.message, attempt);
                if failure.crashed {
                    crashed_out.push(failed.identity());
                }
                report.dead_lettered += 1;
                report.dead_lettered_ids.push(failed.identity());
                settled_ids.push(failed.identity());
                settled[ok_end] = true;
                if let Some(key) = held.park(ok_end) {
                    if ctx.parking.is_some() {
                        parking::park(&mut unit, &key, failed.global_position);
                    }
                    report.parked.push(key);
                }
            }
        }
        i = ok_end + 1;
    }
    buffer.drain_into(&mut unit);
    unit.ended_calls = ended_calls(sub, messages, &classes, &settled, &called, attempts);
    if ctx.origin == Origin::Broker && !crashed_out.is_empty() {
        // A broker's dead letter is written after this commit. The record of a message whose calls
        // never came back stays: a replica that dies before the broker has the dead letter leaves its
        // successor the count that dead-letters it again without a call, where a count started over
        // would start its crash loop over. An ordered subscription ends it once its position passed
        // the message (`subscription::calls`); a consumer group keeps it, for another entry of the
        // message (`subscription::stream`). A message that failed otherwise is called again, and
        // fails again with its own error.
        unit.ended_calls.retain(|(_, id)| !crashed_out.contains(id));
    }
    if let Some(parking) = ctx.parking {
        parking::finish(parking, &sub.plan.name, &mut unit, messages, &settled);
    }
    report.settled = settled_ids.clone();
    report.complete = settled.iter().all(|s| *s);
    // The position covers the settled prefix only: an ordered batch may settle messages past a held one.
    let prefix = settled.iter().take_while(|s| **s).count();
    if let (Some(last), Some(name), true) = (prefix.checked_sub(1), ctx.position, batch.whole) {
        let position = messages[last].global_position;
        unit.position = Some(PositionUpdate {
            subscription: name.to_owned(),
            position,
        });
        report.position = Some(position);
    }
    Ok((unit, report, settled_ids))
}

/// Record that `messages` are about to be handed to their handler (see [`CallRecord`]): if the process
/// dies in the call, whoever handles them next counts it.
fn record_calls(
    ctx: &Context<'_>,
    messages: &[StoredMessage],
    attempts: &Attempts,
) -> store::Result<()> {
    let calls: Vec<CallRecord> = messages
        .iter()
        .map(|m| {
            let identity = m.identity();
            CallRecord {
                subscription: ctx.subscription.plan.name.clone(),
                attempts: attempts.failed(&identity) + 1,
                identity,
            }
        })
        .collect();
    ctx.store.record_calls(&calls)
}

/// The call records the unit clears: those of the messages it settles that were called, or had failed
/// before (their record may be an older call's). Never another worker's: this worker settles those
/// for its position only, and their record counts the calls of the worker that handles them.
fn ended_calls(
    sub: &Subscription,
    messages: &[StoredMessage],
    classes: &[Class<'_>],
    settled: &[bool],
    called: &[bool],
    attempts: &Attempts,
) -> Vec<(String, String)> {
    messages
        .iter()
        .zip(classes)
        .zip(settled.iter().zip(called))
        .filter(|((_, class), (settled, _))| **settled && !matches!(class, Class::Theirs))
        .map(|((m, _), (_, called))| (m.identity(), *called))
        .filter(|(identity, called)| *called || attempts.failed(identity) > 0)
        .map(|(identity, _)| (sub.plan.name.clone(), identity))
        .collect()
}

/// A call that did not return (its worker died, or it passed its deadline) with several messages left:
/// each counts the failed attempt, and the batch waits before they are tried one by one.
fn crashed(
    sub: &Subscription,
    handler: &str,
    messages: &[StoredMessage],
    attempts: &mut Attempts,
    failure: &Failure,
) -> Duration {
    let mut most = 0;
    for m in messages {
        let identity = m.identity();
        let failed = attempts.failed(&identity) + 1;
        most = most.max(failed);
        attempts.failed.insert(identity, failed);
    }
    tracing::error!(subscription = %sub.plan.name, handler, messages = messages.len(), error = %failure.message, "a call did not return; its messages are tried again one by one");
    sub.retry
        .next_delay(most, super::retry::jitter())
        .unwrap_or_default()
}

/// Why a message whose calls never came back is dead-lettered.
fn never_settled(calls: u32) -> String {
    format!(
        "the process handling this message died or was stopped during each of its last {calls} calls (a crash, a kill, an out-of-memory kill, or a restart after a handler passed its deadline); dead-lettered without calling the handler again"
    )
}

/// The keys of an ordered batch that stopped (or still wait from an earlier batch): their messages are
/// left for later. Unordered batches have no keys and hold nothing.
struct Held<'m> {
    ordering: Option<&'m Ordering>,
    keys: &'m [String],
    stopped: HashSet<String>,
    /// The keys this batch parked (also stopped).
    parked: HashSet<String>,
}

impl<'m> Held<'m> {
    fn new(ordering: Option<&'m Ordering>, keys: &'m [String], waiting: HashSet<String>) -> Self {
        Self {
            ordering,
            keys,
            stopped: waiting,
            parked: HashSet::new(),
        }
    }

    /// Whether message `i`'s key was parked by this batch and its messages are held in the store.
    fn parked_in_store(&self, i: usize, parking: Option<Parking<'_>>) -> bool {
        parking.is_some_and(|p| p.holds_in_store())
            && self.keys.get(i).is_some_and(|k| self.parked.contains(k))
    }

    /// Whether message `i`'s key has stopped.
    fn contains(&self, i: usize) -> bool {
        self.ordering.is_some() && self.stopped.contains(&self.keys[i])
    }

    /// Stop the key of message `i` (it waits for a retry); its key, or None when the batch is unordered.
    fn hold(&mut self, i: usize) -> Option<String> {
        self.ordering?;
        self.stopped.insert(self.keys[i].clone());
        Some(self.keys[i].clone())
    }

    /// Stop the key of message `i` (dead-lettered) if the ordering parks; its key then.
    fn park(&mut self, i: usize) -> Option<String> {
        self.ordering.filter(|o| o.park)?;
        self.parked.insert(self.keys[i].clone());
        self.hold(i)
    }
}

/// Which messages were handled before (a broker redelivers after a crash between commit and ack, or
/// hands a slow consumer's entries to another) or appear twice in the batch (the outbox publishes at
/// least once). Without `recheck`, none: event-store reads of a leased subscription do not repeat.
fn already_processed(
    ctx: &Context<'_>,
    messages: &[StoredMessage],
    theirs: &[bool],
    recheck: bool,
) -> store::Result<Vec<bool>> {
    if !recheck {
        return Ok(vec![false; messages.len()]);
    }
    let identities: Vec<String> = messages.iter().map(StoredMessage::identity).collect();
    // Another worker's messages are not looked up: this worker settles them without handling.
    let keys: Vec<MarkerKey<'_>> = messages
        .iter()
        .zip(&identities)
        .zip(theirs)
        .filter(|(_, theirs)| !**theirs)
        .map(|((m, id), _)| m.marker_key(id))
        .collect();
    let committed = super::timings::within(super::timings::Phase::Markers, || {
        ctx.store
            .processed_messages(&ctx.subscription.plan.name, &keys)
    })?;
    let mut seen = std::collections::HashSet::new();
    Ok(identities
        .iter()
        .zip(theirs)
        .map(|(id, theirs)| !theirs && (committed.contains(id) || !seen.insert(id.as_str())))
        .collect())
}

/// The class of message `i` when its key is parked (see [`Parking::waits`]): held, or settled before.
fn parked<'m>(
    ctx: &Context<'_>,
    keys: &[String],
    i: usize,
    m: &StoredMessage,
) -> Option<Class<'m>> {
    let waits = ctx.parking?.waits(keys.get(i)?, m.global_position)?;
    Some(if waits {
        Class::Held
    } else {
        Class::Skip(Skip::SettledBeforePark)
    })
}

/// Which messages belong to another worker's keys (none unless the subscription has several workers).
fn theirs(ctx: &Context<'_>, keys: &[String], messages: usize) -> Vec<bool> {
    match ctx.worker {
        // Workers run ordered subscriptions only, so every message has its key.
        Some(worker) => keys
            .iter()
            .map(|key| partition_of(key, worker.of) != worker.index)
            .collect(),
        None => vec![false; messages],
    }
}

/// The messages' ordering keys (none for an unordered subscription): the caller's, or worked out.
fn keys<'a>(ctx: &Context<'a>, messages: &[StoredMessage]) -> std::borrow::Cow<'a, [String]> {
    match (ctx.keys, &ctx.subscription.ordering) {
        (Some(keys), _) => keys.into(),
        (None, Some(ordering)) => messages.iter().map(|m| ordering.key_of(m)).collect(),
        (None, None) => std::borrow::Cow::Borrowed(&[]),
    }
}

fn classify<'m>(
    sub: &'m Subscription,
    m: &StoredMessage,
    meta: &Result<MetaView<'_>, String>,
    now: chrono::DateTime<chrono::Utc>,
) -> Class<'m> {
    let meta = match meta {
        Ok(meta) => meta,
        Err(reason) => return Class::Poison(reason.clone()),
    };
    let Some(handler) = sub.plan.routes.get(&m.message_type) else {
        return if sub.commands {
            Class::Poison(format!(
                "no handler for command type {}; is the right domain loaded?",
                m.message_type
            ))
        } else {
            Class::Skip(Skip::NotHandledHere)
        };
    };
    match meta.expired(now) {
        Ok(true) => Class::Skip(Skip::Expired),
        Ok(false) => Class::Handle(handler),
        Err(e) => Class::Poison(e.to_string()),
    }
}

fn skip(sub: &Subscription, m: &StoredMessage, why: Skip) {
    match why {
        Skip::Expired => {
            tracing::info!(subscription = %sub.plan.name, message_type = %m.message_type, message_id = %m.id, "command expired; acknowledged without calling its handler")
        }
        _ => {
            tracing::debug!(subscription = %sub.plan.name, message_type = %m.message_type, message_id = %m.id, %why, "skipped")
        }
    }
}

fn dead_letter(
    ctx: &Context<'_>,
    unit: &mut UnitOfWork,
    m: &StoredMessage,
    handler: &str,
    error: &str,
    attempts: u32,
) {
    let subscription = &ctx.subscription.plan.name;
    tracing::warn!(%subscription, handler, message_type = %m.message_type, message_id = %m.id, attempts, error, "dead-lettered");
    // Only the event store keeps the message in its dead letter; a copy of a large one for the broker
    // would be memory spent for nothing.
    let copy = |text: &String| match ctx.origin {
        Origin::Store => text.clone(),
        Origin::Broker => String::new(),
    };
    unit.dead_letters.push(DeadLetter {
        subscription: subscription.clone(),
        handler: handler.to_owned(),
        message_id: m.id.clone(),
        stream: m.stream.clone(),
        global_position: m.global_position,
        message_type: m.message_type.clone(),
        data: copy(&m.data),
        metadata: copy(&m.metadata),
        error: error.to_owned(),
        attempts,
        build_id: ctx.plugin.build_id().to_owned(),
        failed_at: crate::message::format_time(chrono::Utc::now()),
    });
}

fn delivery(m: &StoredMessage) -> Delivery<'_> {
    Delivery {
        id: &m.id,
        stream: &m.stream,
        message_type: &m.message_type,
        position: m.position,
        global_position: m.global_position,
        data: m.data.as_bytes(),
        metadata: m.metadata.as_bytes(),
    }
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
