//! Partitioned groups: the broker's side of ordered subscriptions.
//!
//! The keys of an ordered subscription fall into a fixed number of partitions. Each partition belongs
//! to one live replica at a time through a lease that carries a fencing token (a number that grows with
//! every new owner). A replica reads the streams itself (no consumer group) from the positions stored
//! per partition, and only the lease holder may move a partition's position, hold messages behind a
//! parked key or release them: every such write checks the token, so a replica that lost its lease
//! (stalled past its time) cannot change anything any more. The store checks the same token on commit.
//!
//! A parked key's later messages are moved out of the streams into a list of their own, so positions
//! move on; replaying the key's dead letter puts it at the head of that list and marks the key
//! released, and the owner then handles the list in order before unparking the key.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;

use super::{Entry, Result};

/// A partition held by this replica, with the fencing token of this hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub partition: u32,
    pub token: u64,
}

/// A parked key's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parked {
    /// Waiting for its dead letter (this id) to be replayed or discarded.
    Waiting(String),
    /// Its dead letter was replayed or discarded: its held messages may be handled.
    Released,
}

/// How an ordered subscription's partitions stand (for status and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PartitionStatus {
    /// Partitions held, per replica.
    pub owners: std::collections::BTreeMap<String, u32>,
    /// Partitions no live replica holds.
    pub unowned: u32,
    /// Keys parked (waiting or released and not yet drained).
    pub parked: u64,
    /// Messages held behind parked keys.
    pub held: u64,
    /// Entries of the streams after the slowest partition's position (an upper bound of what is left:
    /// faster partitions may have handled some of them).
    pub lag: u64,
}

/// One replica's handle on the partitions of one ordered subscription.
#[async_trait]
pub trait Partitions: Send {
    /// Say this replica is alive (for the lease time); returns how many replicas are alive.
    async fn heartbeat(&mut self) -> Result<usize>;

    /// Extend the leases of `claims`; returns the partitions whose lease was lost.
    async fn renew(&mut self, claims: &[Claim]) -> Result<Vec<u32>>;

    /// Partitions nobody holds.
    async fn free(&mut self) -> Result<Vec<u32>>;

    /// Take `partition` if nobody holds it, with a new fencing token.
    async fn acquire(&mut self, partition: u32) -> Result<Option<Claim>>;

    /// Give `claims` up (rebalancing, shutdown), so others take them at once.
    async fn release(&mut self, claims: &[Claim]) -> Result<()>;

    /// Stop counting this replica as alive (shutdown).
    async fn leave(&mut self) -> Result<()>;

    /// The stored positions of `partition`: stream -> id of the last entry settled.
    async fn positions(&mut self, partition: u32) -> Result<HashMap<String, String>>;

    /// Store positions (stream, id) per claimed partition; returns the partitions whose lease was lost
    /// (nothing stored for them).
    async fn commit_positions(
        &mut self,
        updates: &[(Claim, Vec<(String, String)>)],
    ) -> Result<Vec<u32>>;

    /// Entries after `cursors` (stream, id), up to `count` per stream, waiting up to `block`.
    async fn read(
        &mut self,
        cursors: &[(String, String)],
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>>;

    /// The parked keys.
    async fn parked(&mut self) -> Result<HashMap<String, Parked>>;

    /// Record `entry` of `key` as a dead letter (`parks`: its key is to park behind it); its id.
    async fn dead_letter(
        &mut self,
        entry: &Entry,
        key: &str,
        parks: bool,
        failure: &DeadLetterInfo<'_>,
    ) -> Result<String>;

    /// Park `key` behind its dead letter `id`, if the claim still holds. Apart from the dead letter,
    /// so that a park the broker refused is tried again without a second dead letter.
    async fn park(&mut self, claim: &Claim, key: &str, id: &str) -> Result<()>;

    /// Move `entries` of the parked `key` behind it; false when the claim was lost.
    async fn hold(&mut self, claim: &Claim, key: &str, entries: &[Entry]) -> Result<bool>;

    /// The first `count` entries held behind `key`.
    async fn held(&mut self, key: &str, count: usize) -> Result<Vec<Entry>>;

    /// Drop the first `count` held entries of `key` (they were settled), and unpark it when none are
    /// left and it was released. Returns whether it was unparked.
    async fn settle_held(&mut self, claim: &Claim, key: &str, count: usize) -> Result<bool>;
}

/// Why an entry was dead-lettered.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetterInfo<'a> {
    pub error: &'a str,
    pub attempts: u32,
    pub build_id: &'a str,
}

/// Redis stream ids (`ms-seq`) as numbers, for comparing them.
pub(crate) fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// The id just before `id`: reading after it reads `id` again.
pub(crate) fn id_before(id: &str) -> String {
    match id_key(id) {
        (0, 0) => "0-0".into(),
        (ms, 0) => format!("{}-{}", ms - 1, u64::MAX),
        (ms, seq) => format!("{ms}-{}", seq - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_compare_as_numbers_and_step_back() {
        assert!(id_key("10-2") > id_key("9-99"));
        assert!(id_key("10-10") > id_key("10-9"));
        assert_eq!(id_before("10-3"), "10-2");
        assert_eq!(id_before("10-0"), format!("9-{}", u64::MAX));
        assert_eq!(id_before("0-0"), "0-0");
    }
}
