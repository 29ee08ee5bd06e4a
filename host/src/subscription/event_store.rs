//! An event-store subscription: reads its categories from its stored position, in batches.
//!
//! Invariants: it reads only after the position it committed, so a restart resumes exactly where the
//! last commit left off; when idle it waits for the engine's head to move (or, for writers in other
//! processes, for the poll interval), so an idle subscription costs one indexed query per interval.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    broker::Broker,
    engine::{
        batch::{self, Attempts, Subscription},
        progress::State,
        Shared,
    },
    store::StoredMessage,
};

/// Run one subscription until `shutdown`. The batch in flight when it fires is finished and committed.
/// It runs on one replica at a time when the store keeps leases (preferred: the store fences a stale
/// owner's commits) or else when replicas share a broker; `owner` names this replica in either.
pub(crate) async fn run(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    broker: Option<Arc<dyn Broker>>,
    owner: String,
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
    let keeper = match (shared.store.leases(), broker) {
        (Some(_), _) => Some(Keeper::Store),
        (None, Some(broker)) => Some(Keeper::Broker(broker)),
        (None, None) => None,
    };
    let mut lease = keeper.map(|keeper| Lease {
        keeper,
        owner,
        held: false,
        renewed: None,
    });
    while !shutdown.is_cancelled() {
        if let Some(lease) = lease.as_mut() {
            let was_held = lease.held;
            let held = lease.keep(&shared, &name, shared.config.lease_ttl).await;
            if held && !was_held {
                // Another replica may have moved the position while this one stood by.
                let (store, subscription) = (shared.store.clone(), name.clone());
                match blocking(move || store.position(&subscription)).await? {
                    Ok(stored) => position = stored.unwrap_or(0),
                    Err(error) => {
                        lease.held = false;
                        backoff(&name, &error.to_string(), 1, &shutdown).await;
                        continue;
                    }
                }
                attempts = Attempts::default();
            }
            if !held {
                // Another replica runs this subscription: nothing to do here but wait for its lease to end.
                progress.set(&name, State::Idle { head: u64::MAX });
                tokio::select! {
                    _ = tokio::time::sleep(shared.config.lease_ttl / 3) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
        }
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
            Err(error @ crate::store::Error::LeaseLost { .. }) => {
                // Another replica took over while this batch ran: its commit was refused; stand by.
                tracing::warn!(subscription = %name, %error, "lease lost during a batch; standing by");
                if let Some(lease) = lease.as_mut() {
                    lease.held = false;
                }
                continue;
            }
            Err(error) => {
                failures += 1;
                backoff(&name, &error.to_string(), failures, &shutdown).await;
                continue;
            }
        };
        failures = 0;
        shared.metrics.batch(&sub, &report, started.elapsed());
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
    if let Some(lease) = lease.filter(|l| l.held) {
        lease.release(&shared, &name).await;
    }
    progress.set(&name, State::Stopped);
    tracing::info!(subscription = %name, position, "subscription stopped");
    Ok(())
}

/// When replicas share a store that keeps leases, or a broker, an event-store subscription runs on one
/// replica at a time: the one holding its lease, renewed at a third of its time to live. A replica that
/// dies loses the lease when it expires, and another takes over.
struct Lease {
    keeper: Keeper,
    owner: String,
    held: bool,
    renewed: Option<std::time::Instant>,
}

/// Who keeps the leases.
enum Keeper {
    /// The store (`Store::leases`), called on the blocking pool like every store call.
    Store,
    Broker(Arc<dyn Broker>),
}

impl Lease {
    /// Take or renew the lease when due; whether this replica holds it.
    async fn keep(&mut self, shared: &Arc<Shared>, subscription: &str, ttl: Duration) -> bool {
        if self.held && self.renewed.is_some_and(|at| at.elapsed() < ttl / 3) {
            return true;
        }
        let held = match self.ask(shared, subscription, ttl).await {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(subscription, %error, "cannot reach the lease keeper to renew the lease; pausing");
                false
            }
        };
        match (self.held, held) {
            (false, true) => {
                tracing::info!(subscription, owner = %self.owner, "lease taken; this replica runs the subscription")
            }
            (true, false) => {
                tracing::warn!(subscription, owner = %self.owner, "lease lost; standing by")
            }
            _ => {}
        }
        self.held = held;
        self.renewed = held.then(std::time::Instant::now);
        held
    }

    async fn ask(
        &self,
        shared: &Arc<Shared>,
        subscription: &str,
        ttl: Duration,
    ) -> Result<bool, String> {
        match &self.keeper {
            Keeper::Broker(broker) => broker
                .lease(subscription, &self.owner, ttl)
                .await
                .map_err(|e| e.to_string()),
            Keeper::Store => {
                let (store, name, owner) = (
                    shared.store.clone(),
                    subscription.to_owned(),
                    self.owner.clone(),
                );
                blocking(move || match store.leases() {
                    Some(leases) => leases.take(&name, &owner, ttl).map_err(|e| e.to_string()),
                    None => Err("the store keeps no leases".to_owned()),
                })
                .await?
            }
        }
    }

    /// Give the lease up on shutdown, so another replica takes over at once instead of after its time.
    async fn release(self, shared: &Arc<Shared>, subscription: &str) {
        match self.keeper {
            Keeper::Broker(broker) => {
                let _ = broker.release(subscription, &self.owner).await;
            }
            Keeper::Store => {
                let (store, name) = (shared.store.clone(), subscription.to_owned());
                let _ =
                    blocking(move || store.leases().map(|l| l.release(&name, &self.owner))).await;
            }
        }
    }
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
        let plugin = shared.plugin();
        let ctx = batch::Context {
            plugin: &plugin,
            store: shared.store.as_ref(),
            subscription: &sub,
            version_retries: shared.config.version_retries,
            publish: shared.config.broker.is_some(),
            fences: Vec::new(),
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
pub(crate) async fn backoff(
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
