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
//!    left unsettled (as are those of a key parked by a dead letter) and the other keys go on;
//! 4. commits everything settled (writes, processed markers, dead letters, the new position) as one unit
//!    of work, re-running the batch if another writer changed a stream the handlers read.
//!
//! Invariant: the position never passes a message that was neither handled nor dead-lettered, and a
//! message is never settled while an earlier message of its key in the batch is not.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::{
    config::{Settings, SubscriptionType},
    engine::retry::RetryPolicy,
    message::{Cause, MetaView, TooBig},
    ordering::{partition_of, Ordering},
    plugin::{Delivery, Failure, Plugin},
    store::{self, DeadLetter, Store, StoredMessage},
    subscription::SubscriptionPlan,
    unit_of_work::{Buffer, Fence, PositionUpdate, ProcessedMarker, UnitOfWork},
};

/// What to do about a message read over `server.max_message_bytes` (it is dead-lettered with this).
const READ_FIX: &str = "raise the limit and replay the dead letter (protean-host dlq replay), or keep large payloads out of messages and send a reference";

/// A subscription as the engine runs it.
#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) plan: SubscriptionPlan,
    pub(crate) settings: Settings,
    pub(crate) retry: RetryPolicy,
    /// A `commands:` subscription: an unroutable message is poison, not someone else's event.
    pub(crate) commands: bool,
    /// Where its messages come from.
    pub(crate) kind: SubscriptionType,
    /// Ordered subscriptions: how messages are keyed (a failure then holds back only its key).
    pub(crate) ordering: Option<Ordering>,
}

/// Failed attempts per message identity ([`StoredMessage::identity`]), for messages that are waiting to be retried; and, for ordered
/// subscriptions, the keys waiting for a retry and until when (their messages are held until then).
#[derive(Debug, Default)]
pub(crate) struct Attempts {
    failed: HashMap<String, u32>,
    waiting: HashMap<String, Instant>,
}

impl Attempts {
    /// Record that the message of identity `id` has failed `failed` times so far (a broker's delivery count).
    pub(crate) fn set(&mut self, id: &str, failed: u32) {
        if failed == 0 {
            self.failed.remove(id);
        } else {
            self.failed.insert(id.to_owned(), failed);
        }
    }

    /// When the first waiting key may be tried again (None when no key waits).
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.waiting.values().min().copied()
    }

    /// Forget the waiting keys whose time has come at `now`: their messages may be handled again.
    pub(crate) fn release_due(&mut self, now: Instant) {
        self.waiting.retain(|_, until| *until > now);
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
    /// batch were left unsettled.
    pub(crate) parked: Vec<String>,
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
}

/// What the batch needs from the engine.
pub(crate) struct Context<'a> {
    pub(crate) plugin: &'a Plugin,
    pub(crate) store: &'a dyn Store,
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
}

impl<'a> Context<'a> {
    /// The context of `subscription`'s batches in the engine `shared` with `plugin`: no fences, no
    /// position in the store (a broker keeps where the subscription is), not a worker.
    pub(crate) fn new(
        shared: &'a super::Shared,
        plugin: &'a Plugin,
        subscription: &'a Subscription,
    ) -> Self {
        Self {
            plugin,
            store: shared.store.as_ref(),
            subscription,
            version_retries: shared.config.version_retries,
            publish: shared.config.broker.is_some(),
            fences: Vec::new(),
            position: None,
            worker: None,
            keys: None,
        }
    }
}

/// Worker `index` of `of`: it handles the keys that fall in its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Worker {
    pub(crate) index: u32,
    pub(crate) of: u32,
}

enum Class<'m> {
    Poison(String),
    Skip(&'static str),
    /// Another worker's key: settled for this worker's position, not counted as skipped.
    Theirs,
    Handle(&'m str),
}

/// Process `messages` and commit the outcome.
pub(crate) fn run(
    ctx: &Context<'_>,
    messages: &[StoredMessage],
    attempts: &mut Attempts,
) -> store::Result<Report> {
    let mut conflicts = 0;
    // Stream subscriptions look for processed markers always (a broker redelivers); event-store ones
    // only after a commit found that another consumer got there first.
    // An ordered batch settles messages past an unsettled one, so a re-read meets some settled ones.
    let mut recheck =
        ctx.subscription.kind == SubscriptionType::Stream || ctx.subscription.ordering.is_some();
    let mut raced = 0;
    let keys = keys(ctx, messages);
    loop {
        let (mut unit, mut report, settled) = build(ctx, messages, &keys, attempts, recheck)?;
        if ctx.subscription.kind == SubscriptionType::Stream {
            report.dead_letters = std::mem::take(&mut unit.dead_letters);
        }
        match ctx.store.commit(&unit) {
            Ok(appended) => {
                for id in settled {
                    attempts.failed.remove(&id);
                }
                report.appended = appended;
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
            // Only a race with another consumer (a reclaim of a slow one's entries) gets here, and the
            // re-run skips what the other committed; bounded all the same.
            Err(store::Error::AlreadyProcessed {
                subscription,
                message_id,
            }) if raced < 3 => {
                raced += 1;
                recheck = true;
                tracing::info!(%subscription, %message_id, "another consumer committed this message first; re-running the batch without it");
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
        .next_delay(*attempt, jitter())
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
    messages: &[StoredMessage],
    keys: &[String],
    attempts: &mut Attempts,
    recheck: bool,
) -> store::Result<(UnitOfWork, Report, Vec<String>)> {
    let sub = ctx.subscription;
    let metas: Vec<Result<MetaView<'_>, String>> = messages
        .iter()
        .map(|m| {
            // Before anything decodes it: an oversized message is poison, handled by no one.
            let limit = sub.settings.max_message_bytes;
            TooBig::check(m.size(), limit, || "message".into(), READ_FIX)
                .map_err(|e| e.to_string())?;
            MetaView::parse(&m.metadata)
                .and_then(|v| v.verify(&m.data).map(|()| v))
                .map_err(|e| e.to_string())
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
    let now = chrono::Utc::now();
    let theirs = theirs(ctx, keys, messages.len());
    let done = already_processed(ctx, messages, &theirs, recheck)?;
    let classes: Vec<Class<'_>> = messages
        .iter()
        .zip(&metas)
        .zip(done.into_iter().zip(theirs))
        .map(|((m, meta), (done, theirs))| {
            if theirs {
                Class::Theirs
            } else if done {
                Class::Skip("already processed")
            } else {
                classify(sub, m, meta, now)
            }
        })
        .collect();
    let buffer = Buffer::new(ctx.store, &causes, sub.settings.max_message_bytes);
    let mut unit = UnitOfWork {
        publish: ctx.publish,
        fences: ctx.fences.clone(),
        ..UnitOfWork::default()
    };
    let mut report = Report::default();
    let mut settled_ids = Vec::new();
    let mut settled = vec![false; messages.len()];
    // A single reader always reads from its position, so a due key's failed message comes first. A
    // worker may be reading ahead of it: it releases due keys itself, when it reads from its position.
    if ctx.worker.is_none() {
        attempts.release_due(Instant::now());
    }
    let mut held = Held::new(sub.ordering.as_ref(), keys, attempts.held());
    let mut i = 0;
    while i < messages.len() {
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
                skip(sub, &messages[i], why);
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
            Class::Handle(handler) => *handler,
        };
        let end = (i..messages.len())
            .find(|&j| !matches!(classes[j], Class::Handle(h) if h == handler) || held.contains(j))
            .unwrap_or(messages.len());
        let deliveries: Vec<Delivery<'_>> = messages[i..end].iter().map(delivery).collect();
        let outcome = ctx
            .plugin
            .handle_batch(handler, &deliveries, &buffer.view(i));
        let outcome = match buffer.refusal(i..end) {
            Some((at, reason)) => outcome.refused_at(at - i, reason),
            None => outcome,
        };
        let ok_end = i + outcome.handled.min(end - i);
        for (j, m) in messages.iter().enumerate().take(ok_end).skip(i) {
            tracing::debug!(subscription = %sub.plan.name, handler, message_type = %m.message_type, message_id = %m.id, global_position = m.global_position, "handled");
            unit.processed.push(ProcessedMarker {
                subscription: sub.plan.name.clone(),
                message_id: m.identity(),
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
        let failed = &messages[ok_end];
        let attempt = attempts
            .failed
            .get(&failed.identity())
            .copied()
            .unwrap_or(0)
            + 1;
        tracing::error!(subscription = %sub.plan.name, handler, message_type = %failed.message_type, message_id = %failed.id, attempt, error = %failure.message, "failed processing");
        let delay = if failure.retryable {
            sub.retry.next_delay(attempt, jitter())
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
                        attempts.waiting.insert(key.clone(), Instant::now() + delay);
                        report.waiting.push((key, delay));
                    }
                    None => break,
                }
            }
            None => {
                dead_letter(ctx, &mut unit, failed, handler, &failure.message, attempt);
                report.dead_lettered += 1;
                report.dead_lettered_ids.push(failed.identity());
                settled_ids.push(failed.identity());
                settled[ok_end] = true;
                if let Some(key) = held.park(ok_end) {
                    report.parked.push(key);
                }
            }
        }
        i = ok_end + 1;
    }
    buffer.drain_into(&mut unit);
    report.settled = settled_ids.clone();
    // The position covers the settled prefix only: an ordered batch may settle messages past a held one.
    let prefix = settled.iter().take_while(|s| **s).count();
    let stored = ctx
        .position
        .filter(|_| sub.kind == SubscriptionType::EventStore);
    if let (Some(last), Some(name)) = (prefix.checked_sub(1), stored) {
        let position = messages[last].global_position;
        unit.position = Some(PositionUpdate {
            subscription: name.to_owned(),
            position,
        });
        report.position = Some(position);
    }
    Ok((unit, report, settled_ids))
}

/// The keys of an ordered batch that stopped (or still wait from an earlier batch): their messages are
/// left for later. Unordered batches have no keys and hold nothing.
struct Held<'m> {
    ordering: Option<&'m Ordering>,
    keys: &'m [String],
    stopped: HashSet<String>,
}

impl<'m> Held<'m> {
    fn new(ordering: Option<&'m Ordering>, keys: &'m [String], waiting: HashSet<String>) -> Self {
        Self {
            ordering,
            keys,
            stopped: waiting,
        }
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
    let ids: Vec<&str> = identities
        .iter()
        .zip(theirs)
        .filter(|(_, theirs)| !**theirs)
        .map(|(id, _)| id.as_str())
        .collect();
    let committed = ctx.store.processed(&ctx.subscription.plan.name, &ids)?;
    let mut seen = std::collections::HashSet::new();
    Ok(identities
        .iter()
        .zip(theirs)
        .map(|(id, theirs)| !theirs && (committed.contains(id) || !seen.insert(id.as_str())))
        .collect())
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
            Class::Skip("no handler here for this type")
        };
    };
    match meta.expired(now) {
        Ok(true) => Class::Skip("command past its deadline"),
        Ok(false) => Class::Handle(handler),
        Err(e) => Class::Poison(e.to_string()),
    }
}

fn skip(sub: &Subscription, m: &StoredMessage, why: &str) {
    if why == "command past its deadline" {
        tracing::info!(subscription = %sub.plan.name, message_type = %m.message_type, message_id = %m.id, "command expired; acknowledged without calling its handler");
    } else {
        tracing::debug!(subscription = %sub.plan.name, message_type = %m.message_type, message_id = %m.id, why, "skipped");
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
    let copy = |text: &String| match ctx.subscription.kind {
        SubscriptionType::EventStore => text.clone(),
        SubscriptionType::Stream => String::new(),
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

/// A cheap, good-enough random number in `[0, 1)` for spreading retries apart.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}
