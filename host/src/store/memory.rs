//! The in-memory store: everything in one mutex, lost at exit. For tests and embedding.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
};

use super::{
    category, check_field,
    outbox::{choose, to_lease, Candidate, Lease, Leases},
    schedules::ScheduleWrite,
    Claim, DeadLetter, DocumentVersion, Error, InFlight, Outbox, OutboxCounts, OutboxItem,
    ParkedKey, PendingRow, Result, Schedule, ScheduleCounts, ScheduleQuery, ScheduleState,
    Schedules, Store, StoredDocument, StoredMessage, ABSENT,
};
use crate::{
    ownership::Owned,
    unit_of_work::{CallRecord, DocumentWrite, UnitOfWork},
};

#[derive(Debug, Default)]
struct State {
    messages: Vec<StoredMessage>,
    streams: HashMap<String, Vec<usize>>,
    ids: HashSet<String>,
    positions: HashMap<String, u64>,
    /// (data, version) by (collection, id).
    documents: BTreeMap<(String, String), (String, DocumentVersion)>,
    /// The last document version drawn: versions are never reused.
    document_version: DocumentVersion,
    processed: HashSet<(String, String)>,
    dead_letters: Vec<DeadLetter>,
    /// Dead letters replayed: their index in `dead_letters` to the build that handled them.
    replayed: HashMap<usize, String>,
    outbox: Vec<OutboxRow>,
    leases: Leases,
    /// Message ids by idempotency key.
    idempotency_keys: HashMap<String, String>,
    /// The highest fencing token committed per name.
    fences: HashMap<Owned, u64>,
    /// Call records: attempts by (subscription, identity).
    calls: HashMap<(String, String), u32>,
    /// Parked keys by (subscription, key): the dead letter's global position, and whether released.
    parked: BTreeMap<(String, String), (u64, bool)>,
    /// Held messages: (subscription, key, global position).
    held: std::collections::BTreeSet<(String, String, u64)>,
    /// Schedules by key.
    schedules: BTreeMap<String, Schedule>,
}

#[derive(Debug)]
struct OutboxRow {
    seq: u64,
    global_position: u64,
    target: String,
    state: RowState,
    attempts: u32,
    next_attempt_at: u64,
    last_error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowState {
    Pending,
    Published,
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
        self.check_fences(unit)?;
        if let Some(key) = &unit.idempotency_key {
            if let Some(message_id) = self.idempotency_keys.get(&key.key) {
                return Err(Error::AlreadyCommitted {
                    key: key.key.clone(),
                    message_id: message_id.clone(),
                });
            }
        }
        // Before the messages, as in the SQL stores: a second firing is refused as not pending, not as
        // the duplicate of the message the first one appended.
        self.check_fired(unit)?;
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
        self.check_documents(unit)?;
        let mut markers = HashSet::new();
        for marker in &unit.processed {
            let key = (marker.subscription.clone(), marker.message_id.clone());
            // A message twice in one unit is processed before by its first marker, as in a table.
            if self.processed.contains(&key) || !markers.insert(key.clone()) {
                return Err(Error::AlreadyProcessed {
                    subscription: key.0,
                    message_id: key.1,
                });
            }
        }
        self.check_holds(unit)
    }

    /// Refuse to hold a message behind a key that is not parked (nor parked by the unit itself).
    fn check_holds(&self, unit: &UnitOfWork) -> Result<()> {
        let parking = &unit.parking;
        for (key, _) in &parking.hold {
            let parked = self
                .parked
                .contains_key(&(parking.subscription.clone(), key.clone()))
                || parking.park.iter().any(|(k, _)| k == key);
            if !parked {
                return Err(Error::NotParked {
                    subscription: parking.subscription.clone(),
                    key: key.clone(),
                });
            }
        }
        Ok(())
    }

    /// Refuse to fire a schedule that is no longer pending as read.
    fn check_fired(&self, unit: &UnitOfWork) -> Result<()> {
        for fired in &unit.fired {
            let pending = self
                .schedules
                .get(&fired.key)
                .is_some_and(|s| s.id == fired.id && s.state == ScheduleState::Pending);
            if !pending {
                return Err(Error::NotPending {
                    key: fired.key.clone(),
                });
            }
        }
        Ok(())
    }

    fn apply_schedules(&mut self, unit: &UnitOfWork) {
        for fired in &unit.fired {
            if let Some(schedule) = self.schedules.get_mut(&fired.key) {
                schedule.state = ScheduleState::Fired;
                schedule.settled_ms = Some(fired.at_ms);
            }
        }
        for write in &unit.schedules {
            match write {
                ScheduleWrite::Set {
                    key,
                    due_ms,
                    message,
                } => {
                    let schedule = Schedule {
                        key: key.clone(),
                        id: message.id.clone(),
                        due_ms: *due_ms,
                        stream: message.stream.clone(),
                        message_type: message.message_type.clone(),
                        data: message.data.clone(),
                        metadata: message.metadata.clone(),
                        state: ScheduleState::Pending,
                        settled_ms: None,
                    };
                    self.schedules.insert(key.clone(), schedule);
                }
                ScheduleWrite::Cancel { key, at_ms } => {
                    if let Some(s) = self.schedules.get_mut(key) {
                        if s.state == ScheduleState::Pending {
                            s.state = ScheduleState::Cancelled;
                            s.settled_ms = Some(*at_ms);
                        }
                    }
                }
            }
        }
    }

    /// Park, hold, settle and unpark, as the SQL stores do.
    fn apply_parking(&mut self, parking: &crate::unit_of_work::Parking) {
        let subscription = &parking.subscription;
        for (key, dead_letter) in &parking.park {
            self.parked
                .insert((subscription.clone(), key.clone()), (*dead_letter, false));
        }
        for (key, position) in &parking.hold {
            self.held
                .insert((subscription.clone(), key.clone(), *position));
        }
        for (key, position) in &parking.settle {
            self.held
                .remove(&(subscription.clone(), key.clone(), *position));
        }
        for key in &parking.unpark {
            let id = (subscription.clone(), key.clone());
            if self.parked.get(&id).is_some_and(|(_, released)| *released)
                && self.held_behind(subscription, key).next().is_none()
            {
                self.parked.remove(&id);
            }
        }
    }

    /// The global positions held behind `key` of `subscription`, in order.
    fn held_behind<'s>(
        &'s self,
        subscription: &'s str,
        key: &'s str,
    ) -> impl Iterator<Item = u64> + 's {
        self.held
            .iter()
            .filter(move |(s, k, _)| s == subscription && k == key)
            .map(|(_, _, position)| *position)
    }

    /// Refuse a fence older than the recorded one. Fences of one name chain within the unit, as they do
    /// in the SQL stores, which raise each before checking the next.
    fn check_fences(&self, unit: &UnitOfWork) -> Result<()> {
        let mut raised: HashMap<&Owned, u64> = HashMap::new();
        for fence in &unit.fences {
            let current = raised
                .get(&fence.owned)
                .or_else(|| self.fences.get(&fence.owned))
                .copied()
                .unwrap_or(0);
            if fence.token < current {
                return Err(Error::Fenced {
                    owned: fence.owned.clone(),
                    token: fence.token,
                    current,
                });
            }
            raised.insert(&fence.owned, fence.token);
        }
        Ok(())
    }

    /// Refuse a document write whose expected version is not the one it would replace. Writes of one
    /// document chain within the unit, as in the SQL stores, which check each as they apply it.
    fn check_documents(&self, unit: &UnitOfWork) -> Result<()> {
        let mut written: HashMap<(&str, &str), DocumentVersion> = HashMap::new();
        // Every write draws the next version, as apply does.
        for (next, write) in (self.document_version + 1..).zip(&unit.documents) {
            let key = write.key();
            let actual = written.get(&key).copied().unwrap_or_else(|| {
                self.documents
                    .get(&(key.0.to_owned(), key.1.to_owned()))
                    .map_or(ABSENT, |(_, v)| *v)
            });
            if let Some(expected) = write.expected().filter(|e| *e != actual) {
                return Err(Error::DocumentConflict {
                    collection: key.0.to_owned(),
                    id: key.1.to_owned(),
                    expected,
                    actual,
                });
            }
            let now = match write {
                DocumentWrite::Put { .. } => next,
                DocumentWrite::Delete { .. } => ABSENT,
            };
            written.insert(key, now);
        }
        Ok(())
    }

    /// Apply a unit that passed [`State::check`].
    fn apply(&mut self, unit: &UnitOfWork) -> Option<u64> {
        for fence in &unit.fences {
            self.fences.insert(fence.owned.clone(), fence.token);
        }
        if let Some(key) = &unit.idempotency_key {
            self.idempotency_keys
                .insert(key.key.clone(), key.message_id.clone());
        }
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
                decoded: Default::default(),
            });
            last = Some(global_position);
            if unit.publish {
                let seq = self.outbox.len() as u64 + 1;
                let target = category(&m.stream).to_owned();
                let row = OutboxRow {
                    seq,
                    global_position,
                    target,
                    state: RowState::Pending,
                    attempts: 0,
                    next_attempt_at: 0,
                    last_error: None,
                };
                self.outbox.push(row);
            }
        }
        for write in &unit.documents {
            match write {
                DocumentWrite::Put {
                    collection,
                    id,
                    data,
                    ..
                } => {
                    self.document_version += 1;
                    let stored = (data.clone(), self.document_version);
                    self.documents
                        .insert((collection.clone(), id.clone()), stored);
                }
                DocumentWrite::Delete { collection, id, .. } => {
                    // Drawn all the same, so that the check's count of versions matches.
                    self.document_version += 1;
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
        for ended in &unit.ended_calls {
            self.calls.remove(ended);
        }
        self.apply_parking(&unit.parking);
        self.apply_schedules(unit);
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

    fn read_document(&self, collection: &str, id: &str) -> Result<Option<StoredDocument>> {
        Ok(self
            .state()
            .documents
            .get(&(collection.into(), id.into()))
            .map(|(data, version)| StoredDocument {
                id: id.to_owned(),
                data: data.clone(),
                version: *version,
            }))
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
            .filter(|(_, (data, _))| {
                serde_json::from_str::<serde_json::Value>(data)
                    .ok()
                    .and_then(|d| d.get(field).cloned())
                    .as_ref()
                    == Some(value)
            })
            .map(|((_, id), (data, version))| StoredDocument {
                id: id.clone(),
                data: data.clone(),
                version: *version,
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

    fn processed(&self, subscription: &str, ids: &[&str]) -> Result<HashSet<String>> {
        let state = self.state();
        Ok(ids
            .iter()
            .filter(|id| {
                state
                    .processed
                    .contains(&(subscription.to_owned(), (**id).to_owned()))
            })
            .map(|id| (*id).to_owned())
            .collect())
    }

    fn idempotency_key(&self, key: &str) -> Result<Option<String>> {
        Ok(self.state().idempotency_keys.get(key).cloned())
    }

    fn record_calls(&self, calls: &[CallRecord]) -> Result<()> {
        let mut state = self.state();
        for call in calls {
            let key = (call.subscription.clone(), call.identity.clone());
            state.calls.insert(key, call.attempts);
        }
        Ok(())
    }

    fn recorded_calls(
        &self,
        subscription: &str,
        identities: Option<&[&str]>,
    ) -> Result<HashMap<String, u32>> {
        let state = self.state();
        Ok(state
            .calls
            .iter()
            .filter(|((s, id), _)| {
                s == subscription && identities.is_none_or(|ids| ids.contains(&id.as_str()))
            })
            .map(|((_, id), attempts)| (id.clone(), *attempts))
            .collect())
    }

    fn outbox(&self) -> Option<&dyn Outbox> {
        Some(self)
    }

    fn schedules(&self) -> &dyn Schedules {
        self
    }

    fn dead_letters(&self, subscription: Option<&str>) -> Result<Vec<DeadLetter>> {
        let state = self.state();
        Ok(state
            .dead_letters
            .iter()
            .enumerate()
            .filter(|(i, d)| {
                subscription.is_none_or(|s| d.subscription == s) && !state.replayed.contains_key(i)
            })
            .map(|(_, d)| d.clone())
            .collect())
    }

    fn resolve_dead_letter(
        &self,
        subscription: &str,
        global_position: u64,
        replayed_by: &str,
    ) -> Result<bool> {
        let mut state = self.state();
        let oldest = state.dead_letters.iter().enumerate().position(|(i, d)| {
            d.subscription == subscription
                && d.global_position == global_position
                && !state.replayed.contains_key(&i)
        });
        let Some(index) = oldest else {
            return Ok(false);
        };
        state.replayed.insert(index, replayed_by.to_owned());
        let waiting = state.dead_letters.iter().enumerate().any(|(i, d)| {
            d.subscription == subscription
                && d.global_position == global_position
                && !state.replayed.contains_key(&i)
        });
        for ((s, _), (dead_letter, released)) in state.parked.iter_mut() {
            if s == subscription && *dead_letter == global_position && !waiting {
                *released = true;
            }
        }
        Ok(true)
    }

    fn purge_dead_letters(&self, subscription: &str) -> Result<u64> {
        let mut state = self.state();
        let (letters, replayed) = (
            std::mem::take(&mut state.dead_letters),
            std::mem::take(&mut state.replayed),
        );
        let before = letters.len();
        for (i, letter) in letters.into_iter().enumerate() {
            let by = replayed.get(&i).cloned();
            if letter.subscription != subscription || by.is_some() {
                if let Some(by) = by {
                    let kept = state.dead_letters.len();
                    state.replayed.insert(kept, by);
                }
                state.dead_letters.push(letter);
            }
        }
        for ((s, _), (_, released)) in state.parked.iter_mut() {
            *released |= s == subscription;
        }
        Ok((before - state.dead_letters.len()) as u64)
    }

    fn parked_keys(&self, subscription: &str) -> Result<Vec<ParkedKey>> {
        let state = self.state();
        Ok(state
            .parked
            .iter()
            .filter(|((s, _), _)| s == subscription)
            .map(|((_, key), (dead_letter, released))| ParkedKey {
                key: key.clone(),
                dead_letter: *dead_letter,
                released: *released,
                held: state.held_behind(subscription, key).count() as u64,
            })
            .collect())
    }

    fn held_messages(
        &self,
        subscription: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let state = self.state();
        Ok(state
            .held_behind(subscription, key)
            .filter_map(|position| {
                let index = usize::try_from(position.checked_sub(1)?).ok()?;
                state.messages.get(index).cloned()
            })
            .take(limit)
            .collect())
    }
}

impl Outbox for MemoryStore {
    fn claim(
        &self,
        worker: &str,
        limit: usize,
        lease: std::time::Duration,
        in_flight: &InFlight,
    ) -> Result<Claim> {
        let mut state = self.state();
        let now = super::now_ms();
        let candidates: Vec<Candidate> = state
            .outbox
            .iter()
            .filter(|r| r.state == RowState::Pending)
            .map(|r| Candidate {
                seq: r.seq,
                target: r.target.clone(),
                next_attempt_at: r.next_attempt_at,
            })
            .collect();
        let choice = choose(&candidates, &state.leases, worker, now, limit, in_flight);
        let mut items = Vec::with_capacity(choice.seqs.len());
        for seq in &choice.seqs {
            let row = &state.outbox[*seq as usize - 1];
            // Tests put text here as they like: it is parsed, as text of unknown origin is.
            let m = &state.messages[row.global_position as usize - 1];
            items.push(OutboxItem::new(
                *seq,
                row.target.clone(),
                row.attempts,
                (&m.data, &m.metadata),
                (m.position, m.global_position),
                false,
            ));
        }
        let until = now + lease.as_millis() as u64;
        let renew: Vec<String> = to_lease(
            items.iter().map(|i| i.target.as_str()),
            &state.leases,
            worker,
            now,
            lease,
        )
        .into_iter()
        .map(str::to_owned)
        .collect();
        for target in renew {
            let worker = worker.to_owned();
            state.leases.insert(target, Lease { worker, until });
        }
        Ok(choice.claim(items))
    }

    fn published(&self, _worker: &str, seqs: &[u64]) -> Result<()> {
        let mut state = self.state();
        for seq in seqs {
            state.outbox[*seq as usize - 1].state = RowState::Published;
        }
        Ok(())
    }

    fn failed(&self, _worker: &str, seq: u64, error: &str, retry_at: u64) -> Result<()> {
        let mut state = self.state();
        let row = &mut state.outbox[seq as usize - 1];
        row.attempts += 1;
        row.next_attempt_at = retry_at;
        row.last_error = Some(error.to_owned());
        Ok(())
    }

    fn release(&self, worker: &str) -> Result<()> {
        self.state()
            .leases
            .retain(|_, lease| lease.worker != worker);
        Ok(())
    }

    fn counts(&self, held_after: u32) -> Result<OutboxCounts> {
        let state = self.state();
        let pending = || state.outbox.iter().filter(|r| r.state == RowState::Pending);
        let count = |f: &dyn Fn(&OutboxRow) -> bool| pending().filter(|r| f(r)).count() as u64;
        Ok(OutboxCounts {
            pending: count(&|_| true),
            failing: count(&|r| r.attempts > 0),
            held: count(&|r| r.attempts >= held_after),
            oldest_pending_age_ms: pending().next().map(|r| age_ms(&state, r)),
        })
    }

    fn pending(&self, target: Option<&str>, limit: usize) -> Result<Vec<PendingRow>> {
        let state = self.state();
        Ok(state
            .outbox
            .iter()
            .filter(|r| r.state == RowState::Pending && target.is_none_or(|t| r.target == t))
            .take(limit)
            .map(|r| {
                let message = &state.messages[r.global_position as usize - 1];
                PendingRow {
                    seq: r.seq,
                    target: r.target.clone(),
                    stream: message.stream.clone(),
                    message_type: message.message_type.clone(),
                    attempts: r.attempts,
                    last_error: r.last_error.clone(),
                    next_attempt_at: r.next_attempt_at,
                    age_ms: age_ms(&state, r),
                }
            })
            .collect())
    }

    fn republish(&self, target: Option<&str>) -> Result<u64> {
        let mut state = self.state();
        let mut cleared = 0;
        for row in state.outbox.iter_mut().filter(|r| {
            r.state == RowState::Pending
                && r.next_attempt_at != 0
                && target.is_none_or(|t| r.target == t)
        }) {
            row.next_attempt_at = 0;
            cleared += 1;
        }
        Ok(cleared)
    }
}

/// How long ago the message of `row` was committed.
fn age_ms(state: &State, row: &OutboxRow) -> u64 {
    let time = &state.messages[row.global_position as usize - 1].time;
    crate::message::parse_time(time).map_or(0, |t| {
        super::now_ms().saturating_sub(t.timestamp_millis().max(0) as u64)
    })
}

impl Schedules for MemoryStore {
    fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<Schedule>> {
        let mut due: Vec<Schedule> = self
            .state()
            .schedules
            .values()
            .filter(|s| s.state == ScheduleState::Pending && s.due_ms <= now_ms)
            .cloned()
            .collect();
        due.sort_by(|a, b| (a.due_ms, &a.key).cmp(&(b.due_ms, &b.key)));
        due.truncate(limit);
        Ok(due)
    }

    fn next_due(&self) -> Result<Option<i64>> {
        let state = self.state();
        let pending = state.schedules.values();
        Ok(pending
            .filter(|s| s.state == ScheduleState::Pending)
            .map(|s| s.due_ms)
            .min())
    }

    fn list(&self, query: &ScheduleQuery) -> Result<Vec<Schedule>> {
        let mut found: Vec<Schedule> = self
            .state()
            .schedules
            .values()
            .filter(|s| query.state.is_none_or(|state| s.state == state))
            .cloned()
            .collect();
        found.sort_by(|a, b| (a.due_ms, &a.key).cmp(&(b.due_ms, &b.key)));
        found.truncate(query.limit);
        Ok(found)
    }

    fn get(&self, key: &str) -> Result<Option<Schedule>> {
        Ok(self.state().schedules.get(key).cloned())
    }

    fn prune(&self, settled_before_ms: i64, limit: usize) -> Result<u64> {
        let mut state = self.state();
        let old: Vec<String> = state
            .schedules
            .values()
            .filter(|s| s.state != ScheduleState::Pending)
            .filter(|s| s.settled_ms.is_some_and(|at| at < settled_before_ms))
            .take(limit)
            .map(|s| s.key.clone())
            .collect();
        for key in &old {
            state.schedules.remove(key);
        }
        Ok(old.len() as u64)
    }

    fn counts(&self, overdue_before_ms: i64) -> Result<ScheduleCounts> {
        let state = self.state();
        let pending = state
            .schedules
            .values()
            .filter(|s| s.state == ScheduleState::Pending);
        Ok(pending.fold(ScheduleCounts::default(), |mut counts, s| {
            counts.pending += 1;
            counts.overdue += u64::from(s.due_ms < overdue_before_ms);
            counts
        }))
    }
}
