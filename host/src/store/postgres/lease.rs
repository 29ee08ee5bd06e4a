//! Leases of event-store subscriptions, kept in the store so that replicas need no broker to agree on
//! who runs what.
//!
//! Why a row with an expiry and not an advisory lock: a session advisory lock belongs to a connection,
//! and a pool hands connections around and replaces them; a stalled process whose connection stays open
//! would hold the lock forever, while a row's expiry hands the subscription over after the lease's time
//! to live whatever the stalled owner does. Expiry is judged by the database's clock alone.
//!
//! Fencing: once this process has asked for a subscription's lease, every commit of that subscription's
//! position checks, in the same transaction and under a row lock, that the lease is still this owner's.
//! A stalled owner that wakes after a takeover therefore cannot move the position, and the batch it
//! handled is rolled back with it. An owner whose lease merely expired (a batch slower than the lease's
//! time to live) and that nobody took over still commits: failing it would make such a batch fail forever.

use std::time::Duration;

use super::{sql, PostgresStore};
use crate::store::{Leases, Result};

impl Leases for PostgresStore {
    fn take(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), owner.to_owned());
        let ttl_ms = ttl.as_millis() as i64;
        let row = self
            .conn()?
            .query_opt(sql::LEASE_TAKE, &[&name, &owner, &ttl_ms])?;
        Ok(row.is_some())
    }

    fn release(&self, name: &str, owner: &str) -> Result<()> {
        self.conn()?.execute(sql::LEASE_RELEASE, &[&name, &owner])?;
        Ok(())
    }
}
