//! Ending a consumer's blocking read at a stop. Redis answers a read it holds only at the read's block
//! (a second by default, or longer), and a read given up instead, its answer never awaited, may
//! already have been given entries: they would stay pending on a consumer that is going away until
//! another replica takes them over, `claim_idle` later. So at a stop the read is ended from another
//! connection with `CLIENT UNBLOCK`, which makes Redis answer it at once (empty, as at its block), and
//! the answer is awaited: whatever Redis gave the read is handled before the consumer stops.

use std::{future::Future, time::Duration};

use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

/// How long a stop waits for a read's answer before giving the read up (Redis answers nothing). Past
/// the default block of a second, and the timer tick after it at which Redis ends a read.
const GIVE_UP: Duration = Duration::from_secs(2);

/// How often `CLIENT UNBLOCK` is sent again while the read is unanswered: the first may reach Redis
/// before the read does, for they travel on different connections.
const AGAIN: Duration = Duration::from_millis(20);

/// What ends a consumer's blocking read: a connection that never blocks, and the consumer's own
/// connection as Redis names it (`CLIENT ID`; unknown when asking failed).
pub(super) struct Unblocker {
    pub(super) commands: ConnectionManager,
    pub(super) client: Option<i64>,
}

/// The answer of `read`; after `stop`, the read is ended early. None when Redis answered neither the
/// read nor the unblocking within [`GIVE_UP`] of the stop: the read is given up. Without the client's
/// id, or with the unblocking refused, the read ends only at its block: its answer is still taken
/// when that comes within [`GIVE_UP`].
pub(super) async fn answer<T>(
    read: impl Future<Output = T>,
    mut unblocker: Unblocker,
    stop: &CancellationToken,
) -> Option<T> {
    tokio::pin!(read);
    tokio::select! {
        answer = &mut read => return Some(answer),
        _ = stop.cancelled() => {}
    }
    let give_up = tokio::time::sleep(GIVE_UP);
    tokio::pin!(give_up);
    loop {
        if let Some(client) = unblocker.client {
            let mut unblock = redis::cmd("CLIENT");
            unblock.arg("UNBLOCK").arg(client);
            let unblock = unblock.query_async::<i64>(&mut unblocker.commands);
            tokio::select! {
                answer = &mut read => return Some(answer),
                // Refused (a Redis user without `CLIENT`): wait for the read's own end instead.
                done = unblock => if done.is_err() { unblocker.client = None },
                _ = &mut give_up => return None,
            }
        }
        tokio::select! {
            answer = &mut read => return Some(answer),
            _ = tokio::time::sleep(AGAIN) => {}
            _ = &mut give_up => return None,
        }
    }
}
