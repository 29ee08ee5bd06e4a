//! The lease capability of a store: which replica runs an event-store subscription.
//!
//! A store that offers it is used instead of the broker's leases, so replicas sharing a store need no
//! broker to run each event-store subscription exactly once at a time, and the store can fence the
//! commits of an owner that lost its lease (see `postgres/lease.rs`).

use std::time::Duration;

use super::Result;

/// Leases kept in the store.
pub trait Leases: Send + Sync {
    /// Take the lease `name` for `owner` for `ttl`, or renew it if `owner` holds it. False when another
    /// owner holds it and its time is not up.
    fn take(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool>;

    /// Give the lease `name` up, if `owner` holds it.
    fn release(&self, name: &str, owner: &str) -> Result<()>;
}
