//! A stream subscription: a consumer of its own consumer group on the broker streams of its categories
//! (and the group's replay stream), sharing the work with every other replica.
//!
//! Invariants: an entry is acknowledged only after its unit of work committed, or after it was recorded
//! in the group's dead-letter stream; a redelivered entry whose message already has a processed marker
//! is only acknowledged; a failed entry is retried when its delivery count (kept by the broker, so it
//! survives restarts) allows, else dead-lettered; entries pending on a dead consumer are taken over.

use std::{collections::HashMap, sync::Arc, time::Instant};

use tokio_util::sync::CancellationToken;

use crate::{
    broker::{replay_stream, Broker, Consumer, Entry},
    engine::{
        batch::{self, Attempts, Subscription},
        progress::State,
        Shared,
    },
    store::StoredMessage,
    subscription::event_store::backoff,
};

/// Run one stream subscription until `shutdown`.
pub(crate) async fn run(
    shared: Arc<Shared>,
    broker: Arc<dyn Broker>,
    sub: Arc<Subscription>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let name = sub.plan.name.clone();
    let progress = &shared.progress;
    let mut streams = sub.plan.categories.clone();
    streams.push(replay_stream(&name));
    let consumer_name = consumer_name(&name);
    let mut failures = 0u32;
    let mut consumer = loop {
        match broker
            .consumer(streams.clone(), &name, &consumer_name)
            .await
        {
            Ok(consumer) => break consumer,
            Err(error) => {
                failures += 1;
                if !backoff(&name, &error.to_string(), failures, &shutdown).await {
                    progress.set(&name, State::Stopped);
                    return Ok(());
                }
            }
        }
    };
    tracing::info!(subscription = %name, consumer = %consumer_name, ?streams, "stream subscription started");
    let config = shared
        .config
        .broker
        .clone()
        .ok_or("a stream subscription needs a broker")?;
    // Test mode waits exactly as long as the work: short blocking reads notice idleness quickly.
    let block = if shared.test_mode {
        config.block.min(std::time::Duration::from_millis(20))
    } else {
        config.block
    };
    let mut last_reclaim: Option<Instant> = None;
    let mut retrying = false;
    // The next batch, read while the last one was handled. Entries read are pending on this consumer,
    // so they are handled even when a stop comes after they were read.
    let mut ahead: Vec<Entry> = Vec::new();
    failures = 0;
    while !shutdown.is_cancelled() || !ahead.is_empty() {
        if last_reclaim.is_none_or(|at| at.elapsed() >= config.reclaim_interval) {
            last_reclaim = Some(Instant::now());
            match consumer.reclaim(config.claim_idle).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(subscription = %name, entries = n, "took over entries pending on idle consumers")
                }
                Err(error) => {
                    tracing::warn!(subscription = %name, %error, "reclaim failed; will try again")
                }
            }
        }
        let seen = progress.published();
        let count = if retrying {
            1
        } else {
            sub.settings.messages_per_tick as usize
        };
        let read = if ahead.is_empty() {
            tokio::select! {
                read = consumer.read(count, block) => read,
                _ = shutdown.cancelled() => break,
            }
        } else {
            Ok(std::mem::take(&mut ahead))
        };
        let entries = match read {
            Ok(entries) => entries,
            Err(error) => {
                failures += 1;
                backoff(&name, &error.to_string(), failures, &shutdown).await;
                continue;
            }
        };
        failures = 0;
        if entries.is_empty() {
            progress.set(&name, State::Idle { head: seen });
            continue;
        }
        progress.set(&name, State::Busy);
        let read_ahead = (!retrying && !shutdown.is_cancelled()).then_some(count);
        let settled = settle(&shared, &sub, consumer.as_mut(), entries, read_ahead).await?;
        match settled.retry {
            // What was read ahead stays pending here and is read again after the retried message.
            Some(delay) => {
                retrying = true;
                flush(&name, consumer.as_mut()).await;
                progress.set(&name, State::Retrying);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            None => {
                retrying = false;
                ahead = settled.ahead;
            }
        }
    }
    flush(&name, consumer.as_mut()).await;
    progress.set(&name, State::Stopped);
    tracing::info!(subscription = %name, "stream subscription stopped");
    Ok(())
}

/// Send acknowledgements still held back. Those that cannot be sent are redelivered later and
/// recognised by their processed markers.
async fn flush(name: &str, consumer: &mut dyn Consumer) {
    if let Err(error) = consumer.flush().await {
        tracing::warn!(subscription = %name, %error, "cannot send acknowledgements; the entries will be redelivered");
    }
}

/// `{subscription}-{host}-{pid}-{random}`: unique per process, readable in `XINFO CONSUMERS`.
pub(crate) fn consumer_name(subscription: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let random = &uuid::Uuid::new_v4().simple().to_string()[..6];
    format!("{subscription}-{host}-{}-{random}", std::process::id())
}

/// What handling one read left to do.
struct Settled {
    /// The backoff before a retry, if a message failed and may be retried.
    retry: Option<std::time::Duration>,
    /// The next entries, read while this batch was handled.
    ahead: Vec<Entry>,
}

impl Settled {
    fn retry_after(delay: std::time::Duration) -> Self {
        Self {
            retry: Some(delay),
            ahead: Vec::new(),
        }
    }
}

/// Handle one read: dead-letter poison, run the batch (reading up to `read_ahead` more entries
/// meanwhile), then acknowledge or dead-letter what it settled.
async fn settle(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
    consumer: &mut dyn Consumer,
    entries: Vec<Entry>,
    read_ahead: Option<usize>,
) -> Result<Settled, String> {
    let name = &sub.plan.name;
    let started = Instant::now();
    let mut messages = Vec::new();
    let mut origin: HashMap<String, Vec<Entry>> = HashMap::new();
    for entry in entries {
        match decode(&entry) {
            Ok(message) => {
                origin.entry(message.identity()).or_default().push(entry);
                messages.push(message);
            }
            Err(reason) => {
                tracing::warn!(subscription = %name, stream = %entry.stream, entry = %entry.id, error = %reason, "dead-lettered");
                consumer
                    .dead_letter(
                        &entry,
                        &reason,
                        entry.deliveries,
                        shared.plugin().build_id(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    // Entries of several streams: handle them in store order.
    messages.sort_by_key(|m| m.global_position);
    // Only a redelivered entry can have failed before: it was in a batch whose consumer died or failed
    // (one failed attempt), or, called alone since, its calls are recorded (a delivery count would
    // also count the redeliveries of entries behind a culprit that were never called).
    let redelivered: Vec<String> = origin
        .iter()
        .filter(|(_, entries)| entries.iter().any(|e| e.deliveries > 1))
        .map(|(identity, _)| identity.clone())
        .collect();
    let (shared2, sub2) = (shared.clone(), sub.clone());
    let batch = tokio::task::spawn_blocking(move || {
        let mut attempts = Attempts::default();
        if !redelivered.is_empty() {
            let ids: Vec<&str> = redelivered.iter().map(String::as_str).collect();
            attempts.suspect(ids.iter().copied());
            attempts.recover(shared2.store.recorded_calls(&sub2.plan.name, Some(&ids))?);
        }
        let plugin = shared2.plugin();
        // A broker's group keeps where the subscription is; the store keeps no position for it.
        let ctx = batch::Context::new(&shared2, &plugin, &sub2);
        batch::run(&ctx, &messages, &mut attempts)
    });
    let (outcome, ahead) = match read_ahead {
        // A failed read-ahead is not an error here: its entries, if any, are pending and read again.
        Some(count) => {
            let (outcome, ahead) = tokio::join!(batch, consumer.read_ahead(count));
            (outcome, ahead.unwrap_or_default())
        }
        None => (batch.await, Vec::new()),
    };
    let outcome = outcome.map_err(|e| format!("a batch task failed: {e}"))?;
    let report = match outcome {
        Ok(report) => report,
        Err(error) => {
            // Nothing was committed or acknowledged; the entries are read again after the backoff.
            tracing::error!(subscription = %name, %error, "store unavailable; will retry");
            return Ok(Settled::retry_after(std::time::Duration::from_secs(1)));
        }
    };
    if let Some(appended) = report.appended {
        shared.progress.advanced(appended);
    }
    for (dead, identity) in report.dead_letters.iter().zip(&report.dead_lettered_ids) {
        for entry in origin.remove(identity).unwrap_or_default() {
            consumer
                .dead_letter(&entry, &dead.error, dead.attempts, &dead.build_id)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    let acks: Vec<(String, String)> = report
        .settled
        .iter()
        .flat_map(|id| origin.remove(id).unwrap_or_default())
        .map(|e| (e.stream, e.id))
        .collect();
    // After a retry stop the unacknowledged entries are read again first; `ack` also says so.
    if let Err(error) = consumer.ack(&acks).await {
        return Ok(Settled::retry_after(broker_trouble(name, &error)));
    }
    shared.metrics.batch(sub, &report, started.elapsed());
    tracing::info!(subscription = %name, handled = report.handled.len(), dead_lettered = report.dead_lettered, skipped = report.skipped, written = report.written.len(), acked = acks.len(), "batch committed");
    let retry = report.retry;
    shared.progress.tally(report);
    Ok(Settled { retry, ahead })
}

/// The broker failed after the commit: the entries stay pending and come back, and their processed
/// markers make the redelivery an acknowledgement only. Wait a moment before reading again.
fn broker_trouble(subscription: &str, error: &crate::broker::Error) -> std::time::Duration {
    tracing::warn!(subscription, %error, "broker unavailable after commit; the entries will be redelivered");
    std::time::Duration::from_secs(1)
}

/// A broker entry as a stored message: Protean's `{"data", "metadata"}` in the entry's `data` field.
fn decode(entry: &Entry) -> Result<StoredMessage, String> {
    let text = entry
        .data
        .as_deref()
        .ok_or("entry has no text field `data`")?;
    crate::message::from_wire(text)
}
