//! The lease capability of a store: which replica runs an event-store subscription.
//!
//! A store that offers it is used instead of the broker's leases, so replicas sharing a store need no
//! broker to run each event-store subscription exactly once at a time (see [`crate::ownership`]).

use std::time::Duration;

use super::Result;
use crate::ownership::Owned;

/// Leases kept in the store.
pub trait Leases: Send + Sync {
    /// Take the lease of `owned` for `owner` for `ttl`, or renew it if `owner` holds it: its fencing
    /// token, higher than any granted before for `owned` when the owner changes, the same when it
    /// renews. None when another owner holds it and its time is not up.
    fn take(&self, owned: &Owned, owner: &str, ttl: Duration) -> Result<Option<u64>>;

    /// Give the lease of `owned` up, if `owner` holds it.
    fn release(&self, owned: &Owned, owner: &str) -> Result<()>;
}
