//! Keeping a live consumer's pending entries its own.
//!
//! Other consumers take over entries pending longer than `claim_idle_ms` (`XAUTOCLAIM`): that is how
//! the entries of a replica that died are handled. But an entry is also pending, untouched, while its
//! consumer is alive and working on it: in a call that takes long, or waiting for its retry. Taken
//! over then, it would be called twice at once, and dead-lettered twice. So, while a consumer lives, a
//! task of its own resets the idle time of its pending entries three times per `claim_idle_ms`, on a
//! connection of its own (the consumer's is held by blocking reads). It runs beside the subscription's
//! loop, so a call that blocks the loop does not stop it; a process whose handler never returns is
//! restarted by its supervisor (`/livez` fails past the handler's deadline), and its entries then go
//! to a live consumer.

use std::{sync::LazyLock, time::Duration};

use redis::{aio::ConnectionManager, Script};
use tokio_util::sync::{CancellationToken, DropGuard};

static TOUCH_PENDING: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/touch_pending.lua")));

/// The task keeping a consumer's pending entries; it stops when this is dropped.
pub(super) struct Keeper {
    _stop: DropGuard,
}

impl Keeper {
    /// Keep the entries pending on consumer `name` of `group` on `streams`, on `conn`, for as long as
    /// the returned value lives.
    pub(super) fn start(
        conn: ConnectionManager,
        streams: Vec<String>,
        group: String,
        name: String,
        claim_idle: Duration,
    ) -> Self {
        let stop = CancellationToken::new();
        let every = (claim_idle / 3).max(Duration::from_millis(10));
        tokio::spawn(keep(conn, streams, group, name, every, stop.clone()));
        Self {
            _stop: stop.drop_guard(),
        }
    }
}

async fn keep(
    mut conn: ConnectionManager,
    streams: Vec<String>,
    group: String,
    name: String,
    every: Duration,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let mut result = Ok(());
        for stream in &streams {
            result = TOUCH_PENDING
                .key(stream)
                .arg(&group)
                .arg(&name)
                .invoke_async::<i64>(&mut conn)
                .await
                .map(drop);
            if result.is_err() {
                break;
            }
        }
        // Said once per outage: the broker being away is also logged by the subscription itself.
        match result {
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(consumer = %name, %error, "cannot keep this consumer's pending entries; another consumer may take them over after claim_idle_ms");
            }
            Ok(()) if failing => {
                failing = false;
                tracing::info!(consumer = %name, "keeping this consumer's pending entries again");
            }
            _ => {}
        }
    }
}
