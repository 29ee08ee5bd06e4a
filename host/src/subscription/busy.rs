//! An event-store reader's busy mark: a call record ([`CallRecord`]) under a name of its own, set in
//! the store while the reader handles batches and cleared when it goes idle or stops.
//!
//! Why: recording every call before it starts costs a write per batch. A reader does not need it: it
//! reads from its stored position, so the messages a process that died in a call was handling are the
//! first ones the next owner reads. The mark says that the last owner died busy; the next owner then
//! counts one failed attempt for each message of its first batch and calls them one by one, recorded
//! (see [`crate::engine::batch::Record::Suspects`]). A busy reader writes nothing more than it did.

use std::{collections::HashMap, sync::Arc};

use crate::{
    engine::run::Trouble,
    store::{self, Store},
    unit_of_work::{CallRecord, UnitOfWork},
};

const PREFIX: &str = "#busy:";

/// The mark of the reader whose position is stored as `position`.
#[derive(Debug)]
pub(crate) struct BusyMark {
    subscription: String,
    key: String,
    /// Set in the store, as far as this reader knows.
    set: bool,
}

impl BusyMark {
    pub(crate) fn new(subscription: &str, position: &str) -> Self {
        Self {
            subscription: subscription.to_owned(),
            key: format!("{PREFIX}{position}"),
            set: false,
        }
    }

    /// Take the marks out of the records `recorded` (they are no messages); whether this reader's
    /// was among them, i.e. its last owner died while busy. A mark left behind is this reader's to
    /// clear when it next goes idle: left, it would count a failed attempt against the first batch
    /// of every later start, however long after.
    pub(crate) fn left_in(&mut self, recorded: &mut HashMap<String, u32>) -> bool {
        let left = recorded.contains_key(&self.key);
        recorded.retain(|identity, _| !identity.starts_with(PREFIX));
        self.set |= left;
        left
    }

    /// Before handling a batch: set the mark, unless it is set already.
    pub(crate) async fn busy(&mut self, store: &Arc<dyn Store>) -> Result<(), Trouble> {
        if self.set {
            return Ok(());
        }
        let (store, call) = (store.clone(), self.record());
        run(move || store.record_calls(&[call])).await?;
        self.set = true;
        Ok(())
    }

    /// Idle or stopping: clear the mark. A failure leaves it set, which costs at most one failed
    /// attempt counted against the next owner's first batch.
    pub(crate) async fn idle(&mut self, store: &Arc<dyn Store>) {
        if !self.set {
            return;
        }
        let unit = UnitOfWork {
            ended_calls: vec![(self.subscription.clone(), self.key.clone())],
            ..UnitOfWork::default()
        };
        let store = store.clone();
        match run(move || store.commit(&unit).map(drop)).await {
            Ok(()) => self.set = false,
            Err(error) => {
                tracing::warn!(subscription = %self.subscription, %error, "cannot clear the busy mark; will try again")
            }
        }
    }

    fn record(&self) -> CallRecord {
        CallRecord {
            subscription: self.subscription.clone(),
            identity: self.key.clone(),
            attempts: 1,
        }
    }
}

/// A store call on the blocking pool.
async fn run<T: Send + 'static>(
    f: impl FnOnce() -> store::Result<T> + Send + 'static,
) -> Result<T, Trouble> {
    crate::engine::run::blocking(f)
        .await?
        .map_err(Trouble::store)
}
