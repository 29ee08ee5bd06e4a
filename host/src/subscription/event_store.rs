//! An event-store subscription: reads its categories from its stored position, in batches.
//!
//! Invariants: it reads only after the position it committed, so a restart resumes exactly where the
//! last commit left off; when idle it waits for the engine's head to move (or, for writers in other
//! processes, for the poll interval), so an idle subscription costs one indexed query per interval.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    engine::{
        batch::{self, Attempts, Subscription},
        progress::State,
        Shared,
    },
    store::StoredMessage,
};

/// Run one subscription until `shutdown`. The batch in flight when it fires is finished and committed.
pub(crate) async fn run(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let name = sub.plan.name.clone();
    let progress = &shared.progress;
    let mut failures = 0u32;
    let mut position = loop {
        let (store, subscription) = (shared.store.clone(), name.clone());
        match blocking(move || store.position(&subscription)).await? {
            Ok(position) => break position.unwrap_or(0),
            Err(error) => {
                failures += 1;
                if !backoff(&name, &error.to_string(), failures, &shutdown).await {
                    progress.set(&name, State::Stopped);
                    return Ok(());
                }
            }
        }
    };
    tracing::info!(subscription = %name, categories = ?sub.plan.categories, position, "subscription started");
    let mut head = progress.head();
    let mut attempts = Attempts::default();
    failures = 0;
    while !shutdown.is_cancelled() {
        // The state stays what it was while reading: an idle subscription that re-reads is still idle
        // unless the read finds something.
        let seen = *head.borrow_and_update();
        let fetched = fetch(&shared, &sub, position).await?;
        let messages = match fetched {
            Ok(messages) => messages,
            Err(error) => {
                failures += 1;
                backoff(&name, &error, failures, &shutdown).await;
                continue;
            }
        };
        if messages.is_empty() {
            progress.set(&name, State::Idle { head: seen });
            tokio::select! {
                _ = head.changed() => {}
                _ = tokio::time::sleep(shared.config.poll_interval) => {}
                _ = shutdown.cancelled() => break,
            }
            continue;
        }
        progress.set(&name, State::Busy);
        let started = std::time::Instant::now();
        let count = messages.len();
        let (outcome, returned) = process(&shared, &sub, messages, attempts).await?;
        attempts = returned;
        let report = match outcome {
            Ok(report) => report,
            Err(error) => {
                failures += 1;
                backoff(&name, &error.to_string(), failures, &shutdown).await;
                continue;
            }
        };
        failures = 0;
        position = report.position.unwrap_or(position);
        if let Some(appended) = report.appended {
            progress.advanced(appended);
        }
        tracing::info!(
            subscription = %name,
            read = count,
            handled = report.handled.len(),
            dead_lettered = report.dead_lettered,
            skipped = report.skipped,
            written = report.written.len(),
            position,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "batch committed"
        );
        tracing::debug!(subscription = %name, position, "position updated");
        progress.count(|t| {
            for message_type in report.handled {
                *t.handled.entry(message_type).or_default() += 1;
            }
            for message_type in report.written {
                *t.written.entry(message_type).or_default() += 1;
            }
            t.dead_lettered += u64::from(report.dead_lettered);
            t.skipped += u64::from(report.skipped);
            t.retries += u64::from(report.retry.is_some());
        });
        if let Some(delay) = report.retry {
            progress.set(&name, State::Retrying);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => break,
            }
        }
    }
    progress.set(&name, State::Stopped);
    tracing::info!(subscription = %name, position, "subscription stopped");
    Ok(())
}

async fn fetch(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
    after: u64,
) -> Result<Result<Vec<StoredMessage>, String>, String> {
    let (shared, sub) = (shared.clone(), sub.clone());
    blocking(move || {
        let limit = sub.settings.messages_per_tick as usize;
        shared
            .store
            .read_categories(&sub.plan.categories, after, limit)
            .map_err(|e| e.to_string())
    })
    .await
}

type Processed = (Result<batch::Report, crate::store::Error>, Attempts);

async fn process(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
    messages: Vec<StoredMessage>,
    mut attempts: Attempts,
) -> Result<Processed, String> {
    let (shared, sub) = (shared.clone(), sub.clone());
    blocking(move || {
        let ctx = batch::Context {
            plugin: &shared.plugin,
            store: shared.store.as_ref(),
            subscription: &sub,
            version_retries: shared.config.version_retries,
        };
        let outcome = batch::run(&ctx, &messages, &mut attempts);
        (outcome, attempts)
    })
    .await
}

/// Run store and plugin work on the blocking pool. A panic there is fatal for the engine.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("a batch task failed: {e}"))
}

/// Wait after a store failure: 1, 2, 4 ... 30 s, cut short by shutdown. Returns false on shutdown.
async fn backoff(
    subscription: &str,
    error: &str,
    failures: u32,
    shutdown: &CancellationToken,
) -> bool {
    let delay =
        Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(30));
    tracing::error!(
        subscription,
        error,
        failures,
        retry_in_s = delay.as_secs(),
        "store unavailable; will retry"
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.cancelled() => false,
    }
}
