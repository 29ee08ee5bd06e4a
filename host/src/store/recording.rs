//! A memory store that keeps a copy of every unit of work it commits, for unit tests that assert on
//! what the engine committed, unit by unit.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU32, Ordering},
        Condvar, Mutex,
    },
    time::Duration,
};

use super::{
    DeadLetter, Error, MemoryStore, ParkedKey, Result, Schedules, Store, StoredDocument,
    StoredMessage,
};
use crate::unit_of_work::{CallRecord, UnitOfWork};

/// [`MemoryStore`], recording each unit it commits.
#[derive(Debug, Default)]
pub(crate) struct Recording {
    pub(crate) inner: MemoryStore,
    committed: Mutex<Vec<UnitOfWork>>,
    /// Commits still to refuse as unreachable (an outage scripted by [`Recording::refuse_next`]).
    refusals: AtomicU32,
    /// Set by [`Recording::commits_wait_for_the_next_read`].
    overlap: Option<Overlap>,
    /// Each find asked of the store: collection, field, value as JSON.
    finds: Mutex<Vec<(String, String, String)>>,
    /// Each category read: its categories and how many messages it found.
    reads: Mutex<Vec<(Vec<String>, usize)>>,
}

/// Commits of a subscription's batches held until the read of its next batch begins.
#[derive(Debug, Default)]
struct Overlap {
    /// The positions the category reads began after.
    reads: Mutex<Vec<u64>>,
    read_begun: Condvar,
    /// Commits that waited for their read in vain.
    late: AtomicU32,
}

impl Overlap {
    const WAIT: Duration = Duration::from_secs(5);

    fn began(&self, after: u64) {
        self.reads.lock().unwrap().push(after);
        self.read_begun.notify_all();
    }

    /// Wait until a read after `position` began; false when none did within [`Self::WAIT`].
    fn wait_for_read_after(&self, position: u64) -> bool {
        let reads = self.reads.lock().unwrap();
        let (reads, waited) = self
            .read_begun
            .wait_timeout_while(reads, Self::WAIT, |reads| {
                !reads.iter().any(|after| *after >= position)
            })
            .unwrap();
        drop(reads);
        !waited.timed_out()
    }
}

impl Recording {
    /// The units committed so far, in commit order; a refused commit is not among them.
    pub(crate) fn committed(&self) -> Vec<UnitOfWork> {
        self.committed.lock().unwrap().clone()
    }

    /// Refuse the next `commits` commits as unreachable, writing nothing of them.
    pub(crate) fn refuse_next(&self, commits: u32) {
        self.refusals.store(commits, Ordering::SeqCst);
    }

    /// A store whose commit of a unit that moves a position waits until a category read after that
    /// position has begun: the next batch's. A read made only after the commit comes too late, and
    /// the commit goes on after a few seconds, counted by [`Recording::late_commits`].
    pub(crate) fn commits_wait_for_the_next_read() -> Self {
        Self {
            overlap: Some(Overlap::default()),
            ..Self::default()
        }
    }

    /// The commits that waited in vain for the next read (see [`Recording::commits_wait_for_the_next_read`]).
    pub(crate) fn late_commits(&self) -> u32 {
        self.overlap
            .as_ref()
            .map_or(0, |o| o.late.load(Ordering::SeqCst))
    }

    /// The finds asked of the store so far, in order: collection, field, value as JSON.
    pub(crate) fn finds(&self) -> Vec<(String, String, String)> {
        self.finds.lock().unwrap().clone()
    }

    /// The category reads so far, in order: their categories and how many messages each found.
    pub(crate) fn reads(&self) -> Vec<(Vec<String>, usize)> {
        self.reads.lock().unwrap().clone()
    }

    /// The units committed so far, forgetting them.
    pub(crate) fn take(&self) -> Vec<UnitOfWork> {
        std::mem::take(&mut *self.committed.lock().unwrap())
    }
}

impl Store for Recording {
    fn read_categories(
        &self,
        categories: &[String],
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        if let Some(overlap) = &self.overlap {
            overlap.began(after);
        }
        let read = self.inner.read_categories(categories, after, limit)?;
        let found = (categories.to_vec(), read.len());
        self.reads.lock().unwrap().push(found);
        Ok(read)
    }

    fn read_stream(&self, stream: &str, from: u64) -> Result<Vec<StoredMessage>> {
        self.inner.read_stream(stream, from)
    }

    fn commit(&self, unit: &UnitOfWork) -> Result<Option<u64>> {
        let refuse = self
            .refusals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refuse {
            return Err(Error::Unreachable {
                store: "memory".into(),
                reason: "scripted outage".into(),
            });
        }
        if let (Some(overlap), Some(position)) = (&self.overlap, &unit.position) {
            if !overlap.wait_for_read_after(position.position) {
                overlap.late.fetch_add(1, Ordering::SeqCst);
            }
        }
        let appended = self.inner.commit(unit)?;
        self.committed.lock().unwrap().push(unit.clone());
        Ok(appended)
    }

    fn position(&self, subscription: &str) -> Result<Option<u64>> {
        self.inner.position(subscription)
    }

    fn read_document(&self, collection: &str, id: &str) -> Result<Option<StoredDocument>> {
        self.inner.read_document(collection, id)
    }

    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value: &serde_json::Value,
    ) -> Result<Vec<StoredDocument>> {
        let asked = (collection.to_owned(), field.to_owned(), value.to_string());
        self.finds.lock().unwrap().push(asked);
        self.inner.find_documents(collection, field, value)
    }

    fn head(&self, categories: &[String]) -> Result<u64> {
        self.inner.head(categories)
    }

    fn idempotency_key(&self, key: &str) -> Result<Option<String>> {
        self.inner.idempotency_key(key)
    }

    fn dead_letters(&self, subscription: Option<&str>) -> Result<Vec<DeadLetter>> {
        self.inner.dead_letters(subscription)
    }

    fn resolve_dead_letter(
        &self,
        subscription: &str,
        global_position: u64,
        replayed_by: &str,
    ) -> Result<bool> {
        self.inner
            .resolve_dead_letter(subscription, global_position, replayed_by)
    }

    fn purge_dead_letters(&self, subscription: &str) -> Result<u64> {
        self.inner.purge_dead_letters(subscription)
    }

    fn parked_keys(&self, subscription: &str) -> Result<Vec<ParkedKey>> {
        self.inner.parked_keys(subscription)
    }

    fn held_messages(
        &self,
        subscription: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        self.inner.held_messages(subscription, key, limit)
    }

    fn processed(&self, subscription: &str, ids: &[&str]) -> Result<HashSet<String>> {
        self.inner.processed(subscription, ids)
    }

    fn record_calls(&self, calls: &[CallRecord]) -> Result<()> {
        self.inner.record_calls(calls)
    }

    fn recorded_calls(
        &self,
        subscription: &str,
        identities: Option<&[&str]>,
    ) -> Result<HashMap<String, u32>> {
        self.inner.recorded_calls(subscription, identities)
    }

    fn schedules(&self) -> &dyn Schedules {
        self.inner.schedules()
    }
}
