//! The outbox processor: publishes what units of work committed to the broker, in commit order per
//! stream, at least once.
//!
//! Invariants: a row is marked published only after the broker accepted it; a row that fails waits for
//! its retry with exponential backoff and jitter, holding back the rows of its stream behind it, and is
//! abandoned (with a WARN line, and counted) after `outbox.max_attempts`.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    broker::Broker,
    engine::{progress::State, Shared},
    message,
    store::{now_ms, OutboxItem},
};

/// The name the outbox processor reports its progress under.
pub(crate) const NAME: &str = "outbox";

/// How long a processor holds the streams it claimed; another one takes over after a crash.
const LEASE: Duration = Duration::from_secs(30);

/// Publish until `shutdown`. Rows of the round in flight are published and marked first.
pub(crate) async fn run(
    shared: Arc<Shared>,
    broker: Arc<dyn Broker>,
    worker: String,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let progress = &shared.progress;
    let mut head = progress.head();
    let mut failures = 0u32;
    tracing::info!(worker, "outbox processor started");
    while !shutdown.is_cancelled() {
        let seen = *head.borrow_and_update();
        let claimed = blocking({
            let (shared, worker) = (shared.clone(), worker.clone());
            move || {
                let outbox = shared.store.outbox().ok_or("the store keeps no outbox")?;
                outbox
                    .claim(
                        &worker,
                        shared.config.outbox.messages_per_tick as usize,
                        LEASE,
                    )
                    .map_err(|e| e.to_string())
            }
        })
        .await?;
        let items = match claimed {
            Ok(items) => items,
            Err(error) => {
                failures += 1;
                crate::subscription::event_store::backoff(
                    NAME,
                    &error.to_string(),
                    failures,
                    &shutdown,
                )
                .await;
                continue;
            }
        };
        failures = 0;
        if items.is_empty() {
            progress.published_up_to(seen);
            progress.set(NAME, State::Idle { head: seen });
            tokio::select! {
                _ = head.changed() => {}
                _ = tokio::time::sleep(shared.config.poll_interval) => {}
                _ = shutdown.cancelled() => break,
            }
            continue;
        }
        progress.set(NAME, State::Busy);
        publish(&shared, broker.as_ref(), &worker, items).await?;
    }
    let store = shared.store.clone();
    let _ = blocking(move || store.outbox().map(|o| o.release(&worker))).await;
    progress.set(NAME, State::Stopped);
    Ok(())
}

/// Publish a claimed round, stream by stream in claim order, then record the outcome.
async fn publish(
    shared: &Arc<Shared>,
    broker: &dyn Broker,
    worker: &str,
    items: Vec<OutboxItem>,
) -> Result<(), String> {
    let mut targets: Vec<(String, Vec<OutboxItem>)> = Vec::new();
    for item in items {
        match targets.iter_mut().find(|(t, _)| *t == item.target) {
            Some((_, list)) => list.push(item),
            None => targets.push((item.target.clone(), vec![item])),
        }
    }
    let mut published = Vec::new();
    let mut failed = Vec::new();
    for (target, items) in targets {
        let payloads: Result<Vec<String>, _> = items
            .iter()
            .map(|i| {
                message::wire_json(
                    &i.message.data,
                    &i.message.metadata,
                    i.message.position,
                    i.message.global_position,
                )
            })
            .collect();
        let outcome = match payloads {
            Ok(payloads) => broker
                .publish(&target, &payloads)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("stored message is unreadable: {e}")),
        };
        match outcome {
            Ok(()) => published.extend(items.iter().map(|i| i.seq)),
            // The first row carries the failure; the rest of the stream waits behind it.
            Err(error) => failed.push((items[0].seq, items[0].attempts, target, error)),
        }
    }
    let count = published.len() as u64;
    let failures = failed.len() as u64;
    let (shared2, worker2) = (shared.clone(), worker.to_owned());
    let recorded = blocking(move || -> Result<(), String> {
        let outbox = shared2.store.outbox().ok_or("the store keeps no outbox")?;
        outbox.published(&worker2, &published).map_err(|e| e.to_string())?;
        for (seq, attempts, target, error) in failed {
            let settings = shared2.config.outbox;
            let attempt = attempts + 1;
            let retry_at = (attempt < settings.max_attempts).then(|| now_ms() + backoff_ms(&settings, attempt));
            match retry_at {
                Some(at) => tracing::warn!(%target, seq, attempt, error, retry_in_ms = at.saturating_sub(now_ms()), "outbox publish failed; will retry"),
                None => tracing::warn!(%target, seq, attempt, error, "outbox row abandoned after its last attempt"),
            }
            outbox.failed(&worker2, seq, &error, retry_at).map_err(|e| e.to_string())?;
        }
        outbox.release(&worker2).map_err(|e| e.to_string())
    })
    .await?;
    if let Err(error) = recorded {
        // The rows stay claimed until their lease ends, then are published again: at least once.
        tracing::error!(error, "cannot record what the outbox published");
    }
    shared.metrics.outbox_round(count, failures);
    shared.progress.count(|t| t.published += count);
    Ok(())
}

/// Exponential backoff with ±20% jitter.
fn backoff_ms(settings: &crate::config::OutboxSettings, attempt: u32) -> u64 {
    let base = settings
        .retry_delay_ms
        .saturating_mul(1 << attempt.saturating_sub(1).min(20))
        .min(settings.max_retry_delay_ms);
    let jitter = 0.8 + 0.4 * f64::from(now_ms() as u32 % 1000) / 1000.0;
    (base as f64 * jitter) as u64
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("an outbox task failed: {e}"))
}
