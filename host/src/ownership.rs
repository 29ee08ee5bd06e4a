//! Who owns what: typed leases, and the fences their owners' commits carry.
//!
//! Work shared by replicas is owned under a lease: an event-store subscription (all its workers run
//! under one lease) or one partition of an ordered stream subscription's keys. A lease alone cannot stop
//! a replica that stalled past it (a pause, a long GC, SIGSTOP): when it wakes it still believes it owns
//! the work. So every lease carries a fencing token that grows with every new owner, every unit of work
//! of leased work carries a [`Fence`] with it, and the store, which sees every commit, keeps the highest
//! token per [`Owned`] and refuses lower ones ([`store::Error::Fenced`]). A new owner commits a unit
//! holding only its fence right after taking the lease, before it reads anything, so the old owner is
//! shut out from then on and the new one reads what the old one last committed.
//!
//! Who grants leases is chosen once, at start ([`Keeper::choose`]): the store when it keeps leases (a
//! database shared by replicas), else the broker. An ordered stream subscription's partitions are
//! leased by the broker's partitioned groups ([`crate::broker::partitions`]), with the same fences.
//!
//! Invariant: nothing here is ever parsed back from a name. [`Owned::key`] is how a store or broker
//! records what is owned; code that must know which partition a refusal names matches on [`Owned`].

use std::{fmt, sync::Arc, time::Duration};

use crate::{
    broker::{self, Broker},
    engine::run::blocking,
    store::{self, Store},
    unit_of_work::UnitOfWork,
};

/// What a lease grants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owned {
    /// An event-store subscription: its one reader, or all its workers, on one replica.
    Subscription(String),
    /// One partition of an ordered stream subscription's keys.
    Partition {
        subscription: String,
        partition: u32,
    },
}

impl Owned {
    /// The subscription it belongs to.
    pub fn subscription(&self) -> &str {
        match self {
            Owned::Subscription(name)
            | Owned::Partition {
                subscription: name, ..
            } => name,
        }
    }

    /// The name a store or broker records it under (lease rows, fences): written, never parsed.
    pub fn key(&self) -> String {
        match self {
            Owned::Subscription(name) => name.clone(),
            Owned::Partition {
                subscription,
                partition,
            } => format!("{subscription}#p{partition}"),
        }
    }
}

impl fmt::Display for Owned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owned::Subscription(name) => write!(f, "subscription {name}"),
            Owned::Partition {
                subscription,
                partition,
            } => write!(f, "partition {partition} of {subscription}"),
        }
    }
}

/// A claim to own something, checked by the store on commit: a unit carrying a token older than one the
/// store has seen for the same [`Owned`] is refused whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub owned: Owned,
    /// The lease's fencing token; equal to the recorded one is the same owner committing again.
    pub token: u64,
}

/// A lease held: what, by whom, under which fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owned: Owned,
    pub owner: String,
    pub token: u64,
}

impl Lease {
    /// The fence every commit of the owned work carries.
    pub fn fence(&self) -> Fence {
        Fence {
            owned: self.owned.clone(),
            token: self.token,
        }
    }
}

/// Why a lease could not be asked for.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Broker(#[from] broker::Error),
    #[error("{0}")]
    Blocking(String),
}

/// Who grants the leases of event-store subscriptions.
pub(crate) enum Keeper {
    /// The store ([`Store::leases`]): replicas sharing a database need no broker to agree.
    Store(Arc<dyn Store>),
    Broker(Arc<dyn Broker>),
}

impl Keeper {
    /// The store when it keeps leases, else the broker; none for a store nobody shares (no broker).
    pub(crate) fn choose(
        store: &Arc<dyn Store>,
        broker: Option<&Arc<dyn Broker>>,
    ) -> Option<Arc<Keeper>> {
        let keeper = match (store.leases(), broker) {
            (Some(_), _) => Keeper::Store(store.clone()),
            (None, Some(broker)) => Keeper::Broker(broker.clone()),
            (None, None) => return None,
        };
        Some(Arc::new(keeper))
    }

    /// Take `owned` for `owner` for `ttl`, or renew it if `owner` holds it; None when another owner
    /// holds it and its time is not up.
    pub(crate) async fn take(
        &self,
        owned: &Owned,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, Error> {
        let token = match self {
            Keeper::Broker(broker) => broker.lease(owned, owner, ttl).await?,
            Keeper::Store(store) => {
                let (store, asked, by) = (store.clone(), owned.clone(), owner.to_owned());
                blocking(move || match store.leases() {
                    Some(leases) => leases.take(&asked, &by, ttl),
                    None => Ok(None),
                })
                .await
                .map_err(|e| Error::Blocking(e.0))??
            }
        };
        Ok(token.map(|token| Lease {
            owned: owned.clone(),
            owner: owner.to_owned(),
            token,
        }))
    }

    /// Give `lease` up (shutdown), so another replica takes over at once instead of after its time.
    pub(crate) async fn release(&self, lease: &Lease) -> Result<(), Error> {
        match self {
            Keeper::Broker(broker) => broker.release(&lease.owned, &lease.owner).await?,
            Keeper::Store(store) => {
                let (store, lease) = (store.clone(), lease.clone());
                blocking(move || match store.leases() {
                    Some(leases) => leases.release(&lease.owned, &lease.owner),
                    None => Ok(()),
                })
                .await
                .map_err(|e| Error::Blocking(e.0))??
            }
        }
        Ok(())
    }
}

/// Commit a unit holding only `fences`: what a new owner does before it reads anything of the work.
pub(crate) async fn raise(store: Arc<dyn Store>, fences: Vec<Fence>) -> Result<(), Error> {
    let unit = UnitOfWork {
        fences,
        ..UnitOfWork::default()
    };
    blocking(move || store.commit(&unit))
        .await
        .map_err(|e| Error::Blocking(e.0))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_owned_has_one_recorded_name_and_says_what_it_is() {
        let sub = Owned::Subscription("orders".into());
        let part = Owned::Partition {
            subscription: "orders".into(),
            partition: 3,
        };
        assert_eq!(
            (sub.key(), sub.to_string()),
            ("orders".into(), "subscription orders".into())
        );
        assert_eq!(
            (part.key(), part.to_string()),
            ("orders#p3".into(), "partition 3 of orders".into())
        );
        assert_eq!(
            (sub.subscription(), part.subscription()),
            ("orders", "orders")
        );
    }

    #[test]
    fn a_lease_fences_what_it_owns_with_its_token() {
        let lease = Lease {
            owned: Owned::Subscription("s".into()),
            owner: "a".into(),
            token: 7,
        };
        assert_eq!(
            lease.fence(),
            Fence {
                owned: Owned::Subscription("s".into()),
                token: 7
            }
        );
    }
}
