//! The in-memory store: everything in one mutex, lost at exit. For tests and embedding.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
};

use super::{
    category, check_field, DeadLetter, Error, Result, Store, StoredDocument, StoredMessage,
};
use crate::unit_of_work::{DocumentWrite, UnitOfWork};

#[derive(Debug, Default)]
struct State {
    messages: Vec<StoredMessage>,
    streams: HashMap<String, Vec<usize>>,
    ids: HashSet<String>,
    positions: HashMap<String, u64>,
    documents: BTreeMap<(String, String), String>,
    processed: HashSet<(String, String)>,
    dead_letters: Vec<DeadLetter>,
}

/// A store that lives in this process only.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated: commits check before applying.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn version(&self, stream: &str) -> i64 {
        self.streams.get(stream).map_or(-1, |v| v.len() as i64 - 1)
    }

    /// Every check a commit makes, without changing anything.
    fn check(&self, unit: &UnitOfWork) -> Result<()> {
        let mut versions: HashMap<&str, i64> = HashMap::new();
        let mut ids: HashSet<&str> = HashSet::new();
        for m in &unit.messages {
            let actual = *versions
                .entry(&m.stream)
                .or_insert_with(|| self.version(&m.stream));
            if let Some(expected) = m.expected_version.filter(|e| *e != actual) {
                return Err(Error::VersionConflict {
                    stream: m.stream.clone(),
                    expected,
                    actual,
                });
            }
            if self.ids.contains(&m.id) || !ids.insert(&m.id) {
                return Err(Error::DuplicateMessage(m.id.clone()));
            }
            versions.insert(&m.stream, actual + 1);
        }
        Ok(())
    }

    /// Apply a unit that passed [`State::check`].
    fn apply(&mut self, unit: &UnitOfWork) -> Option<u64> {
        let mut last = None;
        for m in &unit.messages {
            let actual = self.version(&m.stream);
            self.ids.insert(m.id.clone());
            let global_position = self.messages.len() as u64 + 1;
            self.streams
                .entry(m.stream.clone())
                .or_default()
                .push(self.messages.len());
            self.messages.push(StoredMessage {
                global_position,
                position: (actual + 1) as u64,
                stream: m.stream.clone(),
                message_type: m.message_type.clone(),
                id: m.id.clone(),
                time: m.time.clone(),
                data: m.data.clone(),
                metadata: m.metadata.clone(),
            });
            last = Some(global_position);
        }
        for write in &unit.documents {
            match write {
                DocumentWrite::Put {
                    collection,
                    id,
                    data,
                } => {
                    self.documents
                        .insert((collection.clone(), id.clone()), data.clone());
                }
                DocumentWrite::Delete { collection, id } => {
                    self.documents.remove(&(collection.clone(), id.clone()));
                }
            }
        }
        for marker in &unit.processed {
            self.processed
                .insert((marker.subscription.clone(), marker.message_id.clone()));
        }
        if let Some(update) = &unit.position {
            self.positions
                .insert(update.subscription.clone(), update.position);
        }
        self.dead_letters.extend(unit.dead_letters.iter().cloned());
        last
    }
}

impl Store for MemoryStore {
    fn read_categories(
        &self,
        categories: &[String],
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let state = self.state();
        Ok(state
            .messages
            .iter()
            .skip(after as usize)
            .filter(|m| categories.iter().any(|c| c == category(&m.stream)))
            .take(limit)
            .cloned()
            .collect())
    }

    fn read_stream(&self, stream: &str, from: u64) -> Result<Vec<StoredMessage>> {
        let state = self.state();
        let indexes = state
            .streams
            .get(stream)
            .map(Vec::as_slice)
            .unwrap_or_default();
        Ok(indexes
            .iter()
            .skip(from as usize)
            .map(|&i| state.messages[i].clone())
            .collect())
    }

    fn commit(&self, unit: &UnitOfWork) -> Result<Option<u64>> {
        let mut state = self.state();
        state.check(unit)?;
        Ok(state.apply(unit))
    }

    fn position(&self, subscription: &str) -> Result<Option<u64>> {
        Ok(self.state().positions.get(subscription).copied())
    }

    fn document(&self, collection: &str, id: &str) -> Result<Option<String>> {
        Ok(self
            .state()
            .documents
            .get(&(collection.into(), id.into()))
            .cloned())
    }

    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value: &serde_json::Value,
    ) -> Result<Vec<StoredDocument>> {
        check_field(field)?;
        let state = self.state();
        let found = state
            .documents
            .range((collection.to_owned(), String::new())..)
            .take_while(|((c, _), _)| c == collection);
        Ok(found
            .filter(|(_, data)| {
                serde_json::from_str::<serde_json::Value>(data)
                    .ok()
                    .and_then(|d| d.get(field).cloned())
                    .as_ref()
                    == Some(value)
            })
            .map(|((_, id), data)| StoredDocument {
                id: id.clone(),
                data: data.clone(),
            })
            .collect())
    }

    fn head(&self, categories: &[String]) -> Result<u64> {
        let state = self.state();
        let matching = |m: &&StoredMessage| {
            categories.is_empty() || categories.iter().any(|c| c == category(&m.stream))
        };
        Ok(state
            .messages
            .iter()
            .rev()
            .find(matching)
            .map_or(0, |m| m.global_position))
    }

    fn dead_letters(&self, subscription: Option<&str>) -> Result<Vec<DeadLetter>> {
        let state = self.state();
        Ok(state
            .dead_letters
            .iter()
            .filter(|d| subscription.is_none_or(|s| d.subscription == s))
            .cloned()
            .collect())
    }
}
