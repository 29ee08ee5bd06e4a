//! Waiting at start for a store and broker that are not up yet.
//!
//! Under Kubernetes or systemd a replica often starts before PostgreSQL or Redis (or while one restarts),
//! so outside test mode a dependency that is down, starting, or not set up yet is waited for: one WARN
//! line per attempt, attempts further apart each time (up to [`MAX_DELAY`]), `/livez` answering and
//! `/readyz` 503 with the reason meanwhile. What will not fix itself (a refused password, a bad URI)
//! still fails at once, as do test mode and the one-shot commands, which never wait.

use std::time::Duration;

use crate::{broker, config::Config, store};

/// The first wait; each next one is twice as long, up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(500);
/// The longest wait between attempts.
const MAX_DELAY: Duration = Duration::from_secs(30);

/// Why the host did not get past waiting.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Broker(#[from] broker::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// What one attempt found.
enum Attempt {
    Ready,
    /// Worth asking again: the reason, for the log and `/readyz`.
    Waiting(String),
}

/// Block until the configured store and broker answer. `Ok(false)` when a stop signal came first.
pub fn wait_for_dependencies(config: &Config) -> Result<bool, WaitError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WaitError::Runtime)?;
    runtime.block_on(wait(config))
}

async fn wait(config: &Config) -> Result<bool, WaitError> {
    let (reason, waiting_for) = tokio::sync::watch::channel(String::new());
    let mut health = None;
    let mut delay = FIRST_DELAY;
    for attempt in 1u32.. {
        let Attempt::Waiting(why) = check(config).await? else {
            if attempt > 1 {
                tracing::info!(attempts = attempt, "the store and broker answer; starting");
            }
            break;
        };
        if health.is_none() {
            health = crate::ops::health::waiting(&config.health, waiting_for.clone()).await;
        }
        reason.send_replace(why.clone());
        tracing::warn!(attempt, retry_in_ms = delay.as_millis() as u64, reason = %why, "a dependency is not ready; waiting for it");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop_signal() => {
                tracing::info!("stopped while waiting for the store and broker");
                return Ok(false);
            }
        }
        delay = (delay * 2).min(MAX_DELAY);
    }
    if let Some(health) = health {
        // The engine binds the same port next.
        health.abort();
        let _ = health.await;
    }
    Ok(true)
}

/// Ask the store (a PostgreSQL connection and its schema) and the broker (a PING) once.
async fn check(config: &Config) -> Result<Attempt, WaitError> {
    if let store::StoreConfig::Postgres(pg) = &config.store {
        let pg = pg.clone();
        // Opened and dropped on a blocking thread: a PostgreSQL client may not be dropped on the
        // runtime (it blocks on its connection).
        let opened = tokio::task::spawn_blocking(move || store::PostgresStore::open(&pg).map(drop))
            .await
            .map_err(|e| WaitError::Runtime(std::io::Error::other(e)))?;
        match opened {
            Err(error) if error.is_transient() => {
                return Ok(Attempt::Waiting(format!("store: {error}")))
            }
            other => other?,
        }
    }
    if let Some(config) = &config.broker {
        match broker::open(config).await {
            Err(error) if error.is_transient() => {
                return Ok(Attempt::Waiting(format!("broker: {error}")))
            }
            other => drop(other?),
        }
    }
    Ok(Attempt::Ready)
}

/// SIGINT or SIGTERM.
async fn stop_signal() {
    let Some(mut received) = super::signals::watch() else {
        return std::future::pending().await;
    };
    // A signal received before the wait began counts too; it stays for the engine to see as well.
    let _ = received.wait_for(|r| r.count > 0).await;
}
