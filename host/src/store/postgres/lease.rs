//! Leases of event-store subscriptions, kept in the store so that replicas need no broker to agree on
//! who runs what.
//!
//! Why a row with an expiry and not an advisory lock: a session advisory lock belongs to a connection,
//! and a pool hands connections around and replaces them; a stalled process whose connection stays open
//! would hold the lock forever, while a row's expiry hands the subscription over after the lease's time
//! to live whatever the stalled owner does. Expiry is judged by the database's clock alone.
//!
//! Fencing: each row carries the fencing token of its owner, raised with every new owner above both the
//! row's and the recorded fence's (a released row is deleted; the fence outlives it). The new owner's
//! first commit raises the fence (see [`crate::ownership`]), so a stalled owner that wakes after a
//! takeover cannot commit any more. An owner whose lease merely expired and that nobody took over still
//! commits: its token is still the highest.

use std::time::Duration;

use super::{sql, PostgresStore};
use crate::{
    ownership::Owned,
    store::{Leases, Result},
};

impl Leases for PostgresStore {
    fn take(&self, owned: &Owned, owner: &str, ttl: Duration) -> Result<Option<u64>> {
        let ttl_ms = ttl.as_millis() as i64;
        let row = self
            .conn()?
            .query_opt(sql::LEASE_TAKE, &[&owned.key(), &owner, &ttl_ms])?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    fn release(&self, owned: &Owned, owner: &str) -> Result<()> {
        self.conn()?
            .execute(sql::LEASE_RELEASE, &[&owned.key(), &owner])?;
        Ok(())
    }
}
