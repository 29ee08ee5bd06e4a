//! What a batch committed in the store still owes the broker: the dead letters of its messages (and
//! the parks of their keys), the held lists its settled held messages leave, and the held lists its
//! parked keys' later messages join. Paid in that order, each step forgotten once done, before the
//! next batch is taken.
//!
//! Invariants: until paid, no position passes an entry the debt names, so a broker that refuses a
//! step (down, or a key holding the wrong type) has it again at the next try and nothing of the batch
//! is lost; a step done is never done again, so no dead letter is written twice. Owed for a partition
//! this replica no longer holds, it is forgotten: the next holder reads those entries again.

use std::collections::VecDeque;

use super::{Item, Ordered, PerKey};
use crate::{
    broker::{
        partitions::{DeadLetterInfo, Parked, Partitions},
        Entry,
    },
    engine::{batch::Report, run::Trouble},
    subscription::calls,
};

#[derive(Default)]
pub(super) struct Owed {
    dead: VecDeque<Dead>,
    /// Per key: how many of its held entries were settled.
    trims: VecDeque<((u32, String), usize)>,
    /// Per parked key: its later entries, read from a stream, to go behind it.
    holds: VecDeque<((u32, String), Vec<Entry>)>,
    /// The messages dead-lettered, with their partitions, whose call records go once their positions
    /// are stored (see `subscription::calls`).
    records: Vec<(u32, String)>,
}

/// A dead letter owed: its message's entry, key and partition, why, and once written, its id (the
/// park of its key may still be owed).
struct Dead {
    entry: Entry,
    /// Read from a stream, not from its key's held list: its position counts.
    from_stream: bool,
    key: String,
    partition: u32,
    message_id: String,
    error: String,
    attempts: u32,
    park: bool,
    written: Option<String>,
}

impl Owed {
    pub(super) fn is_empty(&self) -> bool {
        self.dead.is_empty()
            && self.trims.is_empty()
            && self.holds.is_empty()
            && self.records.is_empty()
    }

    /// The entries read from a stream that no position may pass yet, with their partitions.
    pub(super) fn entries(&self) -> impl Iterator<Item = (u32, &Entry)> {
        let dead = self.dead.iter().filter(|d| d.from_stream);
        let dead = dead.map(|d| (d.partition, &d.entry));
        let held = self
            .holds
            .iter()
            .flat_map(|((p, _), entries)| entries.iter().map(move |e| (*p, e)));
        dead.chain(held)
    }

    /// Owe the dead letter of `entry`, read from a stream and undecodable.
    pub(super) fn poison(&mut self, entry: Entry, key: String, partition: u32, reason: String) {
        self.dead.push_back(Dead {
            message_id: entry.id.clone(),
            entry,
            from_stream: true,
            key,
            partition,
            error: reason,
            attempts: 1,
            park: false,
            written: None,
        });
    }

    /// Owe the held lists of parked keys their later entries, read from a stream.
    pub(super) fn hold(&mut self, holds: PerKey<Vec<Entry>>) {
        self.holds.extend(holds);
    }

    /// Forget what is owed for `partition`: its next holder reads those entries again.
    pub(super) fn forget(&mut self, partition: u32) {
        self.dead.retain(|d| d.partition != partition);
        self.trims.retain(|((p, _), _)| *p != partition);
        self.holds.retain(|((p, _), _)| *p != partition);
        // Left: its next holder dead-letters those messages again without a call, if it reads them.
        self.records.retain(|(p, _)| *p != partition);
    }
}

impl Ordered {
    /// Note what the batch of `items`, committed in the store, owes the broker (see [`Owed`]). Its
    /// messages left unsettled are pending again at once; the keys it parked are parked here at once,
    /// so that their later messages go behind them.
    pub(super) fn owe(&mut self, items: Vec<Item>, report: &Report) {
        for (dead, identity) in report.dead_letters.iter().zip(&report.dead_lettered_ids) {
            let Some(item) = items.iter().find(|i| &i.message.identity() == identity) else {
                continue;
            };
            self.owed.records.push((item.partition, identity.clone()));
            let park = report.parked.contains(&item.key);
            if park {
                let waiting = Parked::Waiting(dead.message_id.clone());
                self.parked.insert(item.key.clone(), waiting);
            }
            self.owed.dead.push_back(Dead {
                entry: item.entry.clone(),
                from_stream: !item.held,
                key: item.key.clone(),
                partition: item.partition,
                message_id: dead.message_id.clone(),
                error: dead.error.clone(),
                attempts: dead.attempts,
                park,
                written: None,
            });
        }
        let (trims, holds) = self.sort_out(items, report);
        self.owed.trims.extend(trims);
        self.owed.hold(holds);
    }

    /// Pay what is owed, in order; then, with nothing read ahead to carry them or with dead letters
    /// written, store the positions, and clear the dead-lettered messages' call records. A step the
    /// broker refuses stays owed, and so does every later one.
    pub(super) async fn pay(&mut self, group: &mut dyn Partitions) -> Result<(), Trouble> {
        while let Some(mut dead) = self.owed.dead.pop_front() {
            if let Err(trouble) = self.write(group, &mut dead).await {
                self.owed.dead.push_front(dead);
                return Err(trouble);
            }
        }
        while let Some(((partition, key), count)) = self.owed.trims.pop_front() {
            let Some(claim) = self.parts.get(&partition).map(|p| p.claim) else {
                continue;
            };
            if let Err(trouble) = self.settle_held(group, &claim, &key, count).await {
                self.owed.trims.push_front(((partition, key), count));
                return Err(trouble);
            }
            if !self.pending.iter().any(|i| i.held && i.key == key) {
                self.draining.remove(&key);
            }
        }
        while let Some(((partition, key), entries)) = self.owed.holds.pop_front() {
            if let Err(trouble) = self.hold(group, partition, &key, &entries).await {
                self.owed.holds.push_front(((partition, key), entries));
                return Err(trouble);
            }
        }
        // With more read ahead, the next batch sends the positions; idle, or past a dead letter, they
        // go now.
        if self.ahead.is_empty() || !self.owed.records.is_empty() {
            self.commit_positions(group).await?;
        }
        // Positions refused drop their partitions, and with them their records here (`forget`).
        let records = std::mem::take(&mut self.owed.records);
        let identities: Vec<String> = records.into_iter().map(|(_, id)| id).collect();
        let store = self.shared.store.clone();
        calls::end(&store, self.name(), &identities).await;
        Ok(())
    }

    /// Write `dead` to the broker's dead letters, then park its key behind it where the ordering parks.
    async fn write(&mut self, group: &mut dyn Partitions, dead: &mut Dead) -> Result<(), Trouble> {
        let Some(claim) = self.parts.get(&dead.partition).map(|p| p.claim) else {
            return Ok(());
        };
        let id = match &dead.written {
            Some(id) => id.clone(),
            None => {
                let build_id = self.shared.plugin().build_id().to_owned();
                let info = DeadLetterInfo {
                    error: &dead.error,
                    attempts: dead.attempts,
                    build_id: &build_id,
                };
                let id = group
                    .dead_letter(&dead.entry, &dead.key, dead.park, &info)
                    .await
                    .map_err(Trouble::broker)?;
                dead.written.insert(id).clone()
            }
        };
        if dead.park {
            group
                .park(&claim, &dead.key, &id)
                .await
                .map_err(Trouble::broker)?;
            tracing::warn!(subscription = %self.name(), key = %dead.key, message_id = %dead.message_id, "key parked: its later messages wait until its dead letter is replayed or discarded");
            // Again: a rebalance while this was owed read the parked keys from the broker.
            let waiting = Parked::Waiting(dead.message_id.clone());
            self.parked.insert(dead.key.clone(), waiting);
        }
        Ok(())
    }
}
