//! Ownership of an ordered subscription's partitions on this replica: heartbeats, leases with fencing
//! tokens, the share of each live replica, takeovers.
//!
//! Invariants: a partition is handled only while its lease is held; before anything of a partition
//! taken over is read, the store's fence for it is raised, so the previous holder's commits are
//! refused from then on; a partition lost or given back takes its unsettled messages with it (its next
//! holder reads them again).

use super::{positions::Part, Ordered};
use crate::{
    broker::partitions::{Claim, Partitions},
    engine::run::Trouble,
    ordering::partition_of,
    ownership::{self, Fence, Owned},
};

/// How many of `partitions` each of `alive` replicas holds: rounded up, so that every partition has a
/// holder.
fn share(partitions: u32, alive: usize) -> usize {
    (partitions as usize).div_ceil(alive.max(1))
}

impl Ordered {
    /// Say this replica is alive, renew its partitions, and take or give back partitions until it holds
    /// its share: the partitions divided by the live replicas, rounded up.
    pub(super) async fn rebalance(&mut self, group: &mut dyn Partitions) -> Result<(), Trouble> {
        let alive = group.heartbeat().await.map_err(Trouble::broker)?.max(1);
        let claims: Vec<Claim> = self.parts.values().map(|p| p.claim).collect();
        for lost in group.renew(&claims).await.map_err(Trouble::broker)? {
            tracing::warn!(subscription = %self.name(), partition = lost, "partition lease lost (expired while this replica was away); another replica serves it");
            self.drop_part(lost);
        }
        let share = share(self.partitions(), alive);
        if self.parts.len() > share {
            let extra: Vec<Claim> = self
                .parts
                .values()
                .rev()
                .take(self.parts.len() - share)
                .map(|p| p.claim)
                .collect();
            // Their positions first: a read ahead may have been due to carry them.
            self.commit_positions(group).await?;
            group.release(&extra).await.map_err(Trouble::broker)?;
            for claim in &extra {
                self.drop_part(claim.partition);
            }
            tracing::info!(subscription = %self.name(), released = extra.len(), alive, held = self.parts.len(), "partitions given back to rebalance");
        } else if self.parts.len() < share {
            self.acquire(group, share).await?;
        }
        self.parked = group.parked().await.map_err(Trouble::broker)?;
        Ok(())
    }

    /// Take free partitions up to `share`, starting at a place of this replica's own so that replicas
    /// starting together do not all race for the same ones.
    async fn acquire(&mut self, group: &mut dyn Partitions, share: usize) -> Result<(), Trouble> {
        let mut free = group.free().await.map_err(Trouble::broker)?;
        let start = partition_of(&self.owner, free.len().max(1) as u32) as usize;
        let len = free.len();
        free.rotate_left(start.min(len));
        let mut claims = Vec::new();
        for partition in free {
            if self.parts.len() + claims.len() >= share {
                break;
            }
            if let Some(claim) = group.acquire(partition).await.map_err(Trouble::broker)? {
                claims.push(claim);
            }
        }
        if claims.is_empty() {
            return Ok(());
        }
        // Taken only once fenced and positioned; else given back at once rather than left to expire.
        let parts = match self.prepare(group, &claims).await {
            Ok(parts) => parts,
            Err(error) => {
                let _ = group.release(&claims).await;
                return Err(error);
            }
        };
        self.parts
            .extend(parts.into_iter().map(|p| (p.claim.partition, p)));
        self.recover_calls().await;
        // What was read ahead started past the new partitions' positions: read again from them.
        self.ahead.clear();
        let taken: Vec<u32> = claims.iter().map(|c| c.partition).collect();
        tracing::info!(subscription = %self.name(), partitions = ?taken, held = self.parts.len(), "partitions taken");
        Ok(())
    }

    /// Count the calls a previous holder of new partitions died in (see [`batch::Attempts::recover`]).
    /// Without them a message that kills the process would be called again forever; a store that
    /// cannot answer now only delays that count to the next take.
    async fn recover_calls(&mut self) {
        let (store, name) = (self.shared.store.clone(), self.name().to_owned());
        match tokio::task::spawn_blocking(move || store.recorded_calls(&name, None)).await {
            Ok(Ok(recorded)) => self.attempts.recover(recorded),
            Ok(Err(error)) => {
                tracing::warn!(subscription = %self.name(), %error, "cannot read the calls in flight of the partitions taken")
            }
            Err(error) => {
                tracing::warn!(subscription = %self.name(), %error, "reading the calls in flight failed")
            }
        }
    }

    /// Raise the store's fences of new `claims` (from here on it refuses the previous holders'
    /// commits, before anything is read), then load their positions.
    async fn prepare(
        &mut self,
        group: &mut dyn Partitions,
        claims: &[Claim],
    ) -> Result<Vec<Part>, Trouble> {
        let fences = claims.iter().map(|c| self.fence(c)).collect();
        ownership::raise(self.shared.store.clone(), fences).await?;
        let mut parts = Vec::new();
        for claim in claims {
            let stored = group
                .positions(claim.partition)
                .await
                .map_err(Trouble::broker)?;
            let read = stored.clone();
            parts.push(Part {
                claim: *claim,
                read,
                stored,
            });
        }
        Ok(parts)
    }

    pub(super) fn fence(&self, claim: &Claim) -> Fence {
        Fence {
            owned: Owned::Partition {
                subscription: self.name().to_owned(),
                partition: claim.partition,
            },
            token: claim.token,
        }
    }

    /// Forget a partition: its unsettled messages are re-read by its next holder.
    fn drop_part(&mut self, partition: u32) {
        self.parts.remove(&partition);
        self.owed.forget(partition);
        self.pending.retain(|item| item.partition != partition);
        let partitions = self.partitions();
        self.draining
            .retain(|key| partition_of(key, partitions) != partition);
    }

    pub(super) fn lost(&mut self, partition: u32) {
        tracing::warn!(subscription = %self.name(), partition, "partition taken over by another replica; its writes from here are refused");
        self.drop_part(partition);
    }

    /// On shutdown: give every partition back at once (positions are stored after every batch), so the
    /// other replicas need not wait for the leases to expire.
    pub(super) async fn stop(&mut self, group: &mut dyn Partitions) {
        if let Err(error) = self.pay(group).await {
            tracing::warn!(subscription = %self.name(), %error, "cannot give the broker what the last batch owes it (dead letters, held messages); the next holder reads those entries again");
        }
        // The positions of the last batch, unless a read ahead was to carry them.
        if let Err(error) = self.commit_positions(group).await {
            tracing::warn!(subscription = %self.name(), %error, "cannot store the last positions; the next holder reads those entries again and skips what was handled");
        }
        let claims: Vec<Claim> = self.parts.values().map(|p| p.claim).collect();
        let released = group.release(&claims).await;
        let left = group.leave().await;
        if let Err(error) = released.and(left) {
            tracing::warn!(subscription = %self.name(), %error, "cannot give the partitions back; others take them when the leases expire");
        }
    }
}

/// Commit a unit of work holding only `fences`: from here on the store refuses the previous holders'
/// commits.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_has_a_holder_among_the_live_replicas() {
        assert_eq!(share(8, 3), 3, "3 + 3 + 2");
        assert_eq!(share(8, 2), 4);
        assert_eq!(
            share(4, 8),
            1,
            "more replicas than partitions: some hold none"
        );
        assert_eq!(
            share(4, 0),
            4,
            "alone, even before its own heartbeat counts"
        );
    }
}
