//! A unit of work: everything one batch of handler calls produced, committed together or not at all.
//!
//! [`UnitOfWork`] is a plain value the engine builds and a store persists. [`Buffer`] is how it is built:
//! it is the host services a handler sees during a batch, recording each write with the index of the
//! message that made it, and answering reads from the store overlaid with the writes buffered so far.

use std::{cell::RefCell, collections::HashMap};

use protean_plugin_api::{MessageKind, ScheduledMessage};
use serde_json::Value;

pub use crate::ownership::Fence;
pub use crate::store::schedules::{FiredSchedule, ScheduleWrite};
use crate::{
    clock::Clock,
    engine::timings::{within, Phase},
    message::{self, Cause, Kind, NewMeta, TooBig},
    plugin::HostServices,
    store::{self, DeadLetter, DocumentVersion, Store, StoredDocument},
};

/// What one commit writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitOfWork {
    /// Events and commands, appended in this order.
    pub messages: Vec<NewMessage>,
    pub documents: Vec<DocumentWrite>,
    pub processed: Vec<ProcessedMarker>,
    pub position: Option<PositionUpdate>,
    pub dead_letters: Vec<DeadLetter>,
    /// Write an outbox row for every appended message, so the outbox processor publishes it to the
    /// broker stream of its category (set when a broker is configured).
    pub publish: bool,
    /// Ownership claims checked and raised first: a commit carrying a token older than one the store has
    /// seen for the same owned work is refused whole (see [`crate::ownership`]).
    pub fences: Vec<Fence>,
    /// Commit only if no unit with this key was committed before: the store records the key in the
    /// same transaction and refuses a second unit with it ([`store::Error::AlreadyCommitted`]), so a
    /// `send` retried after an unknown outcome cannot store its command twice.
    pub idempotency_key: Option<IdempotencyKey>,
    /// Call records ([`CallRecord`]) this unit clears, as (subscription, message identity): their
    /// messages are settled by it.
    pub ended_calls: Vec<(String, String)>,
    /// Ordered event-store subscriptions that park: keys parked, messages held behind them, held
    /// messages settled.
    pub parking: Parking,
    /// Schedules set and cancelled by the batch's handlers, in the order they made them.
    pub schedules: Vec<ScheduleWrite>,
    /// Schedules this unit fires (their messages are among `messages`): refused whole unless each is
    /// still pending with the id read.
    pub fired: Vec<FiredSchedule>,
}

/// A caller's key for "this unit, once": Protean's `metadata.headers.idempotency_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    /// The message the unit stores under the key, answered to a retry.
    pub message_id: String,
}

impl UnitOfWork {
    /// Whether committing it would change nothing.
    pub fn is_empty(&self) -> bool {
        self.processed.is_empty() && self.ended_calls.is_empty() && self.is_empty_but_settling()
    }

    /// Whether it only settles messages: processed markers, and the call records of those messages
    /// it ends. Its handlers changed nothing.
    pub fn only_settles(&self) -> bool {
        !self.processed.is_empty() && self.is_empty_but_settling()
    }

    /// Nothing but markers and ended calls.
    fn is_empty_but_settling(&self) -> bool {
        self.messages.is_empty()
            && self.documents.is_empty()
            && self.position.is_none()
            && self.dead_letters.is_empty()
            && self.fences.is_empty()
            && self.idempotency_key.is_none()
            && self.parking.is_empty()
            && self.schedules.is_empty()
            && self.fired.is_empty()
    }
}

/// What an ordered event-store subscription that parks records beside a batch.
///
/// A parked key's later messages stay in the event store; the subscription's position moves past
/// them only in the commit that records them here, so none is passed for good. A key is unparked
/// only after its dead letter was replayed or purged (`released`) and nothing is held behind it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parking {
    /// Whose keys (the unit's fence covers these writes as it covers a position).
    pub subscription: String,
    /// Keys parked by this batch, each with the global position of its dead letter (a key parked
    /// again by a held message that failed for good waits behind the new dead letter).
    pub park: Vec<(String, u64)>,
    /// Messages held behind their parked key: (key, global position). Refused for a key that is not
    /// parked, so a stale view of the parked keys cannot pass a message for good.
    pub hold: Vec<(String, u64)>,
    /// Held messages settled (handled, skipped or dead-lettered): (key, global position).
    pub settle: Vec<(String, u64)>,
    /// Keys to unpark if they were released and nothing they hold is left.
    pub unpark: Vec<String>,
}

impl Parking {
    /// Whether it records nothing.
    pub fn is_empty(&self) -> bool {
        self.park.is_empty()
            && self.hold.is_empty()
            && self.settle.is_empty()
            && self.unpark.is_empty()
    }
}

/// A message to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub id: String,
    pub stream: String,
    pub message_type: String,
    pub time: String,
    /// JSON text of `data`.
    pub data: String,
    /// JSON text of `metadata`.
    pub metadata: String,
    /// The stream's version the writer saw (`-1`: empty), or none for no check.
    pub expected_version: Option<i64>,
}

impl NewMessage {
    /// A new message of `kind` with fresh id and time, its metadata derived from `cause`.
    pub fn new(
        kind: Kind,
        stream: &str,
        message_type: &str,
        data: &Value,
        expected_version: Option<i64>,
        deadline: Option<&str>,
        cause: Option<Cause<'_>>,
    ) -> Self {
        let checksum = message::checksum(data);
        let meta = Meta {
            kind,
            stream,
            message_type,
            expected_version,
            deadline,
            cause,
        };
        meta.message(data.to_string(), &checksum)
    }

    /// [`NewMessage::new`] from the JSON text of `data`, kept as it is: nothing is decoded into a tree
    /// (which takes many times the text), so a large message costs little more than its text. The
    /// error says why the text is not JSON.
    pub fn from_json(
        kind: Kind,
        stream: &str,
        message_type: &str,
        data: &str,
        expected_version: Option<i64>,
        cause: Option<Cause<'_>>,
    ) -> Result<Self, serde_json::Error> {
        let checksum = message::checksum_text(data)?;
        let meta = Meta {
            kind,
            stream,
            message_type,
            expected_version,
            deadline: None,
            cause,
        };
        Ok(meta.message(data.to_owned(), &checksum))
    }

    /// Its size as `server.max_message_bytes` counts it: the bytes of its data and metadata.
    pub fn size(&self) -> usize {
        self.data.len() + self.metadata.len()
    }

    /// The same message stamped with `time` (its `time` and `metadata.headers.time`): a scheduled
    /// message is written when scheduled and dated when it fires, and a virtual clock dates what
    /// handlers write.
    pub fn at(mut self, time: chrono::DateTime<chrono::Utc>) -> Self {
        self.time = message::format_time(time);
        // The metadata was written by `NewMeta` (or stored from it), so it parses; keys keep their order.
        if let Ok(mut metadata) = serde_json::from_str::<Value>(&self.metadata) {
            if metadata["headers"].is_object() {
                metadata["headers"]["time"] = Value::from(self.time.as_str());
                self.metadata = metadata.to_string();
            }
        }
        self
    }

    /// The same message carrying `key` as `metadata.headers.idempotency_key`, as Protean writes it.
    pub fn with_idempotency_key(mut self, key: &str) -> Self {
        // The metadata was written by `NewMeta` a moment ago, so it parses; keys keep their order.
        if let Ok(mut metadata) = serde_json::from_str::<Value>(&self.metadata) {
            metadata["headers"]["idempotency_key"] = Value::from(key);
            self.metadata = metadata.to_string();
        }
        self
    }
}

/// What a new message's metadata is made of, besides its data's checksum.
struct Meta<'a> {
    kind: Kind,
    stream: &'a str,
    message_type: &'a str,
    expected_version: Option<i64>,
    deadline: Option<&'a str>,
    cause: Option<Cause<'a>>,
}

impl Meta<'_> {
    /// The message with `data` (JSON text) and a fresh id and time.
    fn message(self, data: String, checksum: &str) -> NewMessage {
        let Self {
            kind,
            stream,
            message_type,
            expected_version,
            deadline,
            cause,
        } = self;
        // Time-ordered ids (UUIDv7) keep the id indexes append-mostly; any UUID is valid for Protean.
        let id = uuid::Uuid::now_v7().to_string();
        let time = message::format_time(chrono::Utc::now());
        let metadata = NewMeta {
            id: &id,
            kind,
            message_type,
            stream,
            time: &time,
            checksum,
            expected_version,
            deadline,
            cause,
        }
        .to_json();
        NewMessage {
            stream: stream.into(),
            message_type: message_type.into(),
            data,
            metadata,
            expected_version,
            id,
            time,
        }
    }
}

/// A document change.
///
/// `expected` makes it conditional (optimistic concurrency): the commit fails with
/// [`store::Error::DocumentConflict`] unless the stored document still has that version
/// ([`store::ABSENT`]: it must still not exist). `None` writes whatever is stored: a handler that
/// writes a document without reading it first computed nothing from it, so there is nothing to lose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocumentWrite {
    Put {
        collection: String,
        id: String,
        data: String,
        expected: Option<DocumentVersion>,
    },
    Delete {
        collection: String,
        id: String,
        expected: Option<DocumentVersion>,
    },
}

impl DocumentWrite {
    /// The document written: (collection, id).
    pub fn key(&self) -> (&str, &str) {
        match self {
            DocumentWrite::Put { collection, id, .. }
            | DocumentWrite::Delete { collection, id, .. } => (collection, id),
        }
    }

    fn expect(&mut self, version: Option<DocumentVersion>) {
        match self {
            DocumentWrite::Put { expected, .. } | DocumentWrite::Delete { expected, .. } => {
                *expected = version
            }
        }
    }

    /// The version the write requires of the stored document, if any.
    pub fn expected(&self) -> Option<DocumentVersion> {
        match self {
            DocumentWrite::Put { expected, .. } | DocumentWrite::Delete { expected, .. } => {
                *expected
            }
        }
    }
}

/// "This subscription has handled this message", committed with its effects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessedMarker {
    pub subscription: String,
    /// The message's identity ([`crate::store::StoredMessage::identity`]), not its `headers.id`.
    pub message_id: String,
    /// The message's global position (0 when it has none), which SQLite keys its markers by.
    pub global_position: u64,
    pub build_id: String,
}

/// "A handler call of this message is starting; it has been called `attempts - 1` times before without
/// being settled." Recorded before the call and cleared by the commit that settles the message, so a
/// process that dies in the call (abort, segfault, OOM kill, a supervisor ending a hung call) leaves it
/// behind: whoever handles the message next counts that call as a failed attempt, and after
/// `max_retries` dead-letters the message instead of dying on it forever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub subscription: String,
    /// The message's identity ([`crate::store::StoredMessage::identity`]).
    pub identity: String,
    /// Calls started for this message and not settled, this one included.
    pub attempts: u32,
}

/// The subscription's new position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PositionUpdate {
    /// The position's name: the subscription's, or one of its workers' ([`PositionUpdate::worker_name`]).
    /// Written, never parsed: the unit's fences say whose lease covers it.
    pub subscription: String,
    pub position: u64,
}

impl PositionUpdate {
    /// The name of the position of worker `index` of `of` of `subscription`.
    pub fn worker_name(subscription: &str, index: u32, of: u32) -> String {
        format!("{subscription}#{index}/{of}")
    }
}

#[derive(Debug)]
enum Write {
    Message(NewMessage),
    Document(DocumentWrite),
    Schedule(ScheduleWrite),
}

/// Collects what handlers write during one batch. `causes[i]` is the message at batch index `i`.
pub(crate) struct Buffer<'a> {
    store: &'a dyn Store,
    /// The engine's clock: what handlers write is dated by it, and schedules are due on it.
    clock: &'a Clock,
    causes: &'a [Cause<'a>],
    /// `server.max_message_bytes`: a larger write is refused.
    limit: usize,
    writes: RefCell<Vec<(usize, Write)>>,
    /// Writes refused for their size, by batch index, with why: such a message fails for good,
    /// whatever its handler made of the refusal ([`Buffer::refusal`]).
    refused: RefCell<Vec<(usize, String)>>,
    /// Reads that can never succeed, by the batch index of their call's first message, with why
    /// ([`Buffer::unreadable`]).
    unreadable: RefCell<Vec<(usize, String)>>,
    /// The stored version of each document last read from the store (`get` or `find`), so that a write
    /// of it commits only if nobody wrote it since: two subscriptions of one projector (or two replicas
    /// of one) read-modify-write the same document, and without this the later commit silently
    /// overwrites the earlier one.
    read: RefCell<HashMap<(String, String), DocumentVersion>>,
    /// Read ahead for the batch's handlers ([`HostServices::prefetch`]): documents (None: absent) and
    /// streams as stored, answered instead of the store's. A handler sees the same as without: a
    /// document's version is noted when a handler reads it, so a write of one changed meanwhile still
    /// conflicts, and a stream read ahead is as good as one read later (appends check versions).
    ahead: RefCell<Ahead>,
}

#[derive(Default)]
struct Ahead {
    documents: HashMap<(String, String), Option<StoredDocument>>,
    streams: HashMap<String, Vec<store::StoredMessage>>,
    /// By (collection, field, the value's canonical JSON).
    finds: HashMap<(String, String, String), Vec<StoredDocument>>,
}

impl<'a> Buffer<'a> {
    pub(crate) fn new(
        store: &'a dyn Store,
        clock: &'a Clock,
        causes: &'a [Cause<'a>],
        limit: usize,
    ) -> Self {
        Self {
            store,
            clock,
            causes,
            limit,
            writes: RefCell::default(),
            refused: RefCell::default(),
            unreadable: RefCell::default(),
            read: RefCell::default(),
            ahead: RefCell::default(),
        }
    }

    /// Read `documents` and `streams` ahead, and make `finds` (collection, field, value as JSON), each
    /// kind in one store call. Only a hint: a failed read ahead leaves the reads to be made (and to
    /// fail) one by one.
    fn prefetch(&self, documents: &[(&str, &str)], streams: &[&str], finds: &[(&str, &str, &str)]) {
        let mut ahead = self.ahead.borrow_mut();
        self.find_ahead(&mut ahead, finds);
        if !documents.is_empty() {
            if let Ok(found) = self.store.read_documents(documents) {
                for &(collection, id) in documents {
                    let key = (collection.to_owned(), id.to_owned());
                    ahead.documents.entry(key).or_insert(None);
                }
                for (collection, document) in found {
                    ahead
                        .documents
                        .insert((collection, document.id.clone()), Some(document));
                }
            }
        }
        if !streams.is_empty() {
            if let Ok(found) = self.store.read_streams(streams) {
                for stream in streams {
                    ahead.streams.entry((*stream).to_owned()).or_default();
                }
                for message in found {
                    ahead
                        .streams
                        .entry(message.stream.clone())
                        .or_default()
                        .push(message);
                }
            }
        }
    }

    fn find_ahead(&self, ahead: &mut Ahead, finds: &[(&str, &str, &str)]) {
        // A value that is not JSON is left to its find, which says so. Messages of one batch may
        // announce the same find (one order's events): the store is asked it once.
        let mut announced = std::collections::HashSet::new();
        let finds: Vec<(&str, &str, Value)> = finds
            .iter()
            .filter_map(|&(c, f, v)| Some((c, f, serde_json::from_str::<Value>(v).ok()?)))
            .filter(|(c, f, v)| announced.insert((*c, *f, v.to_string())))
            .collect();
        if finds.is_empty() {
            return;
        }
        let asked: Vec<(&str, &str, &Value)> = finds.iter().map(|(c, f, v)| (*c, *f, v)).collect();
        if let Ok(found) = self.store.find_documents_each(&asked) {
            for ((collection, field, value), documents) in finds.iter().zip(found) {
                let key = (
                    (*collection).to_owned(),
                    (*field).to_owned(),
                    value.to_string(),
                );
                ahead.finds.insert(key, documents);
            }
        }
    }

    /// The services for a plugin call whose first message is batch index `offset`.
    pub(crate) fn view(&self, offset: usize) -> BufferView<'_, 'a> {
        BufferView {
            buffer: self,
            offset,
        }
    }

    /// Drop everything written for batch index `index` and later (a failed message's partial effects).
    pub(crate) fn discard_from(&self, index: usize) {
        self.writes.borrow_mut().retain(|(i, _)| *i < index);
        self.refused.borrow_mut().retain(|(i, _)| *i < index);
        self.unreadable.borrow_mut().retain(|(i, _)| *i < index);
    }

    /// The first message in batch indexes `range` that had a write refused for its size, and why.
    pub(crate) fn refusal(&self, range: std::ops::Range<usize>) -> Option<(usize, String)> {
        self.refused
            .borrow()
            .iter()
            .filter(|(i, _)| range.contains(i))
            .min_by_key(|(i, _)| *i)
            .cloned()
    }

    /// Refuse a write of message `index` for good (over the limit, not JSON); the error goes back to
    /// the handler, and the message fails for good whatever the handler makes of it.
    fn refuse<T>(&self, index: usize, reason: impl ToString) -> Result<T, String> {
        let reason = reason.to_string();
        self.refused.borrow_mut().push((index, reason.clone()));
        Err(reason)
    }

    /// A read of the call whose first message is batch index `offset` failed: its error goes back to the
    /// handler, and a permanent one is noted, so that the call's failure is not retried (the SDK reports
    /// every host error as retryable; asking again would fail the same way).
    fn read_failed(&self, offset: usize, error: ReadError) -> String {
        let reason = error.to_string();
        if error.is_permanent() {
            self.unreadable.borrow_mut().push((offset, reason.clone()));
        }
        reason
    }

    /// Why a read of the call whose first message is batch index `offset` can never succeed, if one
    /// failed so.
    pub(crate) fn unreadable(&self, offset: usize) -> Option<String> {
        let unreadable = self.unreadable.borrow();
        unreadable
            .iter()
            .find(|(at, _)| *at == offset)
            .map(|(_, reason)| reason.clone())
    }

    /// Move the buffered writes into `unit`, in the order they were made.
    pub(crate) fn drain_into(&self, unit: &mut UnitOfWork) {
        for (_, write) in self.writes.borrow_mut().drain(..) {
            match write {
                Write::Message(m) => unit.messages.push(m),
                Write::Document(d) => unit.documents.push(d),
                Write::Schedule(s) => unit.schedules.push(s),
            }
        }
    }

    fn push(&self, index: usize, write: Write) {
        self.writes.borrow_mut().push((index, write));
    }

    fn new_message(
        &self,
        index: usize,
        kind: Kind,
        stream: &str,
        message_type: &str,
        data: &[u8],
        expected: Option<i64>,
    ) -> Result<(), String> {
        let message = self.message(index, kind, stream, message_type, data, expected)?;
        self.push(index, Write::Message(message));
        Ok(())
    }

    /// Buffer a schedule of the message a handler would have written at once, made the same way.
    fn schedule(&self, index: usize, scheduled: ScheduledMessage<'_>) -> Result<(), String> {
        let ScheduledMessage {
            key, due_ms, kind, ..
        } = scheduled;
        if let Some(refusal) = protean_plugin_api::schedule_refusal(key, Some(due_ms)) {
            return self.refuse(index, refusal);
        }
        let kind = match kind {
            MessageKind::Event => Kind::Event,
            MessageKind::Command => Kind::Command,
        };
        let (stream, message_type) = (scheduled.stream, scheduled.message_type);
        let message = self.message(index, kind, stream, message_type, scheduled.data, None)?;
        let set = ScheduleWrite::Set {
            key: key.to_owned(),
            due_ms,
            message,
        };
        self.push(index, Write::Schedule(set));
        Ok(())
    }

    /// Buffer the cancellation of the schedule of `key`, dated now on the engine's clock.
    fn cancel_schedule(&self, index: usize, key: &str) -> Result<(), String> {
        if let Some(refusal) = protean_plugin_api::schedule_refusal(key, None) {
            return self.refuse(index, refusal);
        }
        let at_ms = self.clock.now_ms();
        let cancel = ScheduleWrite::Cancel {
            key: key.to_owned(),
            at_ms,
        };
        self.push(index, Write::Schedule(cancel));
        Ok(())
    }

    /// The message a handler of batch index `index` writes, caused by that message and dated by the
    /// engine's clock; refused (for good) when over the size limit or not JSON.
    fn message(
        &self,
        index: usize,
        kind: Kind,
        stream: &str,
        message_type: &str,
        data: &[u8],
        expected: Option<i64>,
    ) -> Result<NewMessage, String> {
        let what = |part: &str| {
            let kind = match kind {
                Kind::Event => "event",
                Kind::Command => "command",
            };
            format!("{kind} {message_type}{part} written for stream {stream}")
        };
        // Refused before it is read: a runaway write costs no more than the bytes handed over.
        if let Err(too_big) = TooBig::check(data.len(), self.limit, || what(" data"), WRITE_FIX) {
            return self.refuse(index, too_big);
        }
        let not_json = |e: &dyn std::fmt::Display| format!("{message_type} data is not JSON: {e}");
        let data = match std::str::from_utf8(data) {
            Ok(data) => data,
            Err(e) => return self.refuse(index, not_json(&e)),
        };
        let cause = self.causes.get(index).copied();
        let message = match NewMessage::from_json(kind, stream, message_type, data, expected, cause)
        {
            Ok(message) => message,
            Err(e) => return self.refuse(index, not_json(&e)),
        };
        if let Err(too_big) = TooBig::check(message.size(), self.limit, || what(""), WRITE_FIX) {
            return self.refuse(index, too_big);
        }
        // Dated again only on a virtual clock: restamping costs a parse of the metadata.
        Ok(match self.clock.is_virtual() {
            true => message.at(self.clock.now()),
            false => message,
        })
    }

    /// What a find made ahead found, if one was made (see [`Buffer::prefetch`]).
    fn found_ahead(
        &self,
        collection: &str,
        field: &str,
        value: &Value,
    ) -> Option<Vec<StoredDocument>> {
        let ahead = self.ahead.borrow();
        if ahead.finds.is_empty() {
            return None;
        }
        let key = (collection.to_owned(), field.to_owned(), value.to_string());
        ahead.finds.get(&key).cloned()
    }

    fn read_stream(&self, stream: &str, from: u64) -> Result<Vec<u8>, ReadError> {
        let ahead = self.ahead.borrow();
        let read;
        let stored = match ahead.streams.get(stream) {
            Some(messages) => messages,
            None => {
                read = self.store.read_stream(stream, 0)?;
                &read
            }
        };
        let writes = self.writes.borrow();
        let pending = writes.iter().filter_map(|(_, w)| match w {
            Write::Message(m) if m.stream == stream => {
                Some((m.message_type.as_str(), m.data.as_str()))
            }
            _ => None,
        });
        let all = stored
            .iter()
            .map(|m| (m.message_type.as_str(), m.data.as_str()))
            .chain(pending);
        let mut out = String::from("[");
        for (position, (message_type, data)) in all.enumerate().skip(from as usize) {
            if out.len() > 1 {
                out.push(',');
            }
            // Pushed piece by piece: a formatted event would be one more copy of its data.
            out.push_str(r#"{"type":"#);
            out.push_str(&Value::from(message_type).to_string());
            out.push_str(&format!(r#","position":{position},"data":"#));
            out.push_str(data);
            out.push('}');
        }
        out.push(']');
        Ok(out.into_bytes())
    }

    /// The latest buffered write of a document: `Some(Some(data))` put, `Some(None)` deleted.
    fn pending_document(&self, collection: &str, id: &str) -> Option<Option<String>> {
        self.writes
            .borrow()
            .iter()
            .rev()
            .find_map(|(_, w)| match w {
                Write::Document(write) if write.key() == (collection, id) => match write {
                    DocumentWrite::Put { data, .. } => Some(Some(data.clone())),
                    DocumentWrite::Delete { .. } => Some(None),
                },
                _ => None,
            })
    }

    /// A document as the handler sees it: the buffered write, else the store (whose version is noted).
    fn get_document(&self, collection: &str, id: &str) -> Result<Option<String>, ReadError> {
        if let Some(pending) = self.pending_document(collection, id) {
            return Ok(pending);
        }
        // Without a read ahead (SQLite, a handler that gave no hint), no key is built to look it up.
        let ahead = {
            let documents = &self.ahead.borrow().documents;
            (!documents.is_empty())
                .then(|| {
                    documents
                        .get(&(collection.to_owned(), id.to_owned()))
                        .cloned()
                })
                .flatten()
        };
        let stored = match ahead {
            Some(stored) => stored,
            None => self.store.read_document(collection, id)?,
        };
        let version = stored.as_ref().map_or(store::ABSENT, |d| d.version);
        self.note_read(collection, id, version);
        Ok(stored.map(|d| d.data))
    }

    fn note_read(&self, collection: &str, id: &str, version: DocumentVersion) {
        self.read
            .borrow_mut()
            .insert((collection.to_owned(), id.to_owned()), version);
    }

    /// Buffer a document write. The first write of a document in the unit carries the version its
    /// handler read (the store's when the write commits must still be that one); later writes of it
    /// follow from the first in the same transaction and need no check.
    fn write_document(&self, index: usize, mut write: DocumentWrite) {
        let (collection, id) = write.key();
        let expected = match self.pending_document(collection, id) {
            Some(_) => None,
            None => self
                .read
                .borrow()
                .get(&(collection.to_owned(), id.to_owned()))
                .copied(),
        };
        write.expect(expected);
        self.push(index, Write::Document(write));
    }

    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value_json: &[u8],
    ) -> Result<Vec<u8>, ReadError> {
        let value: Value = serde_json::from_slice(value_json)
            .map_err(|e| ReadError::BadInput(format!("find value is not JSON: {e}")))?;
        let stored = match self.found_ahead(collection, field, &value) {
            Some(found) => found,
            None => self.store.find_documents(collection, field, &value)?,
        };
        let mut found: Vec<(String, String)> = Vec::with_capacity(stored.len());
        for StoredDocument { id, data, version } in stored {
            // A document already written in this unit is answered from the buffer below; its first
            // write carries the version read before it.
            if self.pending_document(collection, &id).is_none() {
                self.note_read(collection, &id, version);
            }
            found.push((id, data));
        }
        for (_, write) in self.writes.borrow().iter() {
            let Write::Document(write) = write else {
                continue;
            };
            match write {
                DocumentWrite::Put {
                    collection: c,
                    id,
                    data,
                    ..
                } if c == collection => {
                    found.retain(|(i, _)| i != id);
                    let matches = serde_json::from_str::<Value>(data)
                        .ok()
                        .and_then(|d| d.get(field).cloned())
                        .as_ref()
                        == Some(&value);
                    if matches {
                        found.push((id.clone(), data.clone()));
                    }
                }
                DocumentWrite::Delete {
                    collection: c, id, ..
                } if c == collection => found.retain(|(i, _)| i != id),
                _ => {}
            }
        }
        Ok(format!(
            "[{}]",
            found
                .iter()
                .map(|(_, d)| d.as_str())
                .collect::<Vec<_>>()
                .join(",")
        )
        .into_bytes())
    }
}

/// Why a handler's read through the host failed.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Store(#[from] store::Error),
    /// What the handler asked is not a question (the SDK never sends it; a plugin without it may).
    #[error("{0}")]
    BadInput(String),
}

impl ReadError {
    fn is_permanent(&self) -> bool {
        match self {
            ReadError::Store(error) => error.is_permanent(),
            ReadError::BadInput(_) => true,
        }
    }
}

/// What to do about a handler's write over the limit (its message is dead-lettered with this).
const WRITE_FIX: &str = "the handled message fails for good; raise the limit and replay its dead letter, or have the handler write less (keep large payloads elsewhere and pass a reference)";

/// The services one plugin call sees: indexes are relative to the call's first message.
pub(crate) struct BufferView<'b, 'a> {
    buffer: &'b Buffer<'a>,
    offset: usize,
}

impl HostServices for BufferView<'_, '_> {
    fn raise_event(
        &self,
        index: u32,
        stream: &str,
        message_type: &str,
        data: &[u8],
        expected: Option<i64>,
    ) -> Result<(), String> {
        self.buffer.new_message(
            self.offset + index as usize,
            Kind::Event,
            stream,
            message_type,
            data,
            expected,
        )
    }

    fn send_command(
        &self,
        index: u32,
        stream: &str,
        message_type: &str,
        data: &[u8],
    ) -> Result<(), String> {
        self.buffer.new_message(
            self.offset + index as usize,
            Kind::Command,
            stream,
            message_type,
            data,
            None,
        )
    }

    fn read_stream(&self, stream: &str, from: u64) -> Result<Vec<u8>, String> {
        within(Phase::HandlerReads, || {
            self.buffer.read_stream(stream, from)
        })
        .map_err(|e| self.buffer.read_failed(self.offset, e))
    }

    fn get_document(&self, collection: &str, id: &str) -> Result<Option<Vec<u8>>, String> {
        within(Phase::HandlerReads, || {
            self.buffer.get_document(collection, id)
        })
        .map(|d| d.map(String::into_bytes))
        .map_err(|e| self.buffer.read_failed(self.offset, e))
    }

    fn put_document(
        &self,
        index: u32,
        collection: &str,
        id: &str,
        data: &[u8],
    ) -> Result<(), String> {
        let index = self.offset + index as usize;
        let what = || format!("document {collection}/{id}");
        if let Err(too_big) = TooBig::check(data.len(), self.buffer.limit, what, WRITE_FIX) {
            return self.buffer.refuse(index, too_big);
        }
        let data = match std::str::from_utf8(data) {
            Ok(data) => data,
            Err(e) => {
                let reason = format!("document {collection}/{id} is not UTF-8: {e}");
                return self.buffer.refuse(index, reason);
            }
        };
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(data) {
            let reason = format!("document {collection}/{id} is not JSON: {e}");
            return self.buffer.refuse(index, reason);
        }
        let write = DocumentWrite::Put {
            collection: collection.into(),
            id: id.into(),
            data: data.into(),
            expected: None,
        };
        self.buffer.write_document(index, write);
        Ok(())
    }

    fn delete_document(&self, index: u32, collection: &str, id: &str) -> Result<(), String> {
        let write = DocumentWrite::Delete {
            collection: collection.into(),
            id: id.into(),
            expected: None,
        };
        self.buffer
            .write_document(self.offset + index as usize, write);
        Ok(())
    }

    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value_json: &[u8],
    ) -> Result<Vec<u8>, String> {
        within(Phase::HandlerReads, || {
            self.buffer.find_documents(collection, field, value_json)
        })
        .map_err(|e| self.buffer.read_failed(self.offset, e))
    }

    fn schedule(&self, index: u32, scheduled: ScheduledMessage<'_>) -> Result<(), String> {
        self.buffer
            .schedule(self.offset + index as usize, scheduled)
    }

    fn cancel_schedule(&self, index: u32, key: &str) -> Result<(), String> {
        self.buffer
            .cancel_schedule(self.offset + index as usize, key)
    }

    fn now_ms(&self) -> i64 {
        self.buffer.clock.now_ms()
    }

    fn prefetch(&self, documents: &[(&str, &str)], streams: &[&str], finds: &[(&str, &str, &str)]) {
        within(Phase::HandlerReads, || {
            self.buffer.prefetch(documents, streams, finds);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn a_write_over_the_limit_is_refused_and_noted_until_its_message_is_discarded() {
        let store = MemoryStore::default();
        let causes = [Cause::default(); 3];
        let buffer = Buffer::new(&store, &crate::clock::SYSTEM, &causes, 4096);
        // A call whose first message is batch index 1.
        let view = buffer.view(1);
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(5000));
        view.raise_event(0, "s-1", "T.A.v1", br#"{"a":1}"#, None)
            .unwrap();
        let refused = view
            .put_document(0, "docs", "d1", big.as_bytes())
            .unwrap_err();
        assert_eq!(refused, "document docs/d1 is 5008 bytes, over server.max_message_bytes = 4096; the handled message fails for good; raise the limit and replay its dead letter, or have the handler write less (keep large payloads elsewhere and pass a reference)");
        let refused = view
            .raise_event(1, "s-1", "T.B.v1", big.as_bytes(), None)
            .unwrap_err();
        assert!(
            refused.starts_with("event T.B.v1 data written for stream s-1 is 5008 bytes"),
            "{refused}"
        );
        assert_eq!(buffer.refusal(0..3).map(|(i, _)| i), Some(1));
        assert_eq!(buffer.refusal(2..3).map(|(i, _)| i), Some(2));
        assert_eq!(buffer.refusal(0..1), None);
        // A refusal goes with its message's writes.
        buffer.discard_from(2);
        assert_eq!(buffer.refusal(0..3).map(|(i, _)| i), Some(1));
        buffer.discard_from(1);
        assert_eq!(buffer.refusal(0..3), None);
        let mut unit = UnitOfWork::default();
        buffer.drain_into(&mut unit);
        assert!(unit.is_empty(), "nothing refused was buffered: {unit:?}");
    }

    /// A read that can never succeed is noted against its call; one that may (nothing wrong with the
    /// question) is not. Writes that are not JSON fail their message for good, like writes too big.
    #[test]
    fn permanent_failures_of_the_host_services_are_noted_and_transient_ones_are_not() {
        let store = MemoryStore::default();
        let causes = [Cause::default(); 3];
        let buffer = Buffer::new(&store, &crate::clock::SYSTEM, &causes, 4096);
        let view = buffer.view(1);
        assert_eq!(view.find_documents("docs", "id", b"1").unwrap(), b"[]");
        assert_eq!(buffer.unreadable(1), None, "an answer is no failure");
        let bad = view
            .find_documents("docs", "not a field!", b"1")
            .unwrap_err();
        assert!(bad.contains("is not a plain identifier"), "{bad}");
        assert_eq!(buffer.unreadable(1), Some(bad));
        assert_eq!(buffer.unreadable(0), None, "noted against its own call");
        let other = buffer.view(2);
        let garbage = other.find_documents("docs", "id", b"{nope").unwrap_err();
        assert!(garbage.starts_with("find value is not JSON"), "{garbage}");
        assert_eq!(buffer.unreadable(2), Some(garbage));
        let not_json = other
            .raise_event(0, "s-1", "T.A.v1", b"{nope", None)
            .unwrap_err();
        assert!(
            not_json.starts_with("T.A.v1 data is not JSON"),
            "{not_json}"
        );
        assert_eq!(buffer.refusal(2..3), Some((2, not_json)));
        buffer.discard_from(2);
        assert_eq!(buffer.unreadable(2), None, "gone with its message's writes");
        assert!(buffer.unreadable(1).is_some());
    }
}

#[cfg(test)]
#[path = "unit_of_work_tests.rs"]
mod overlay_tests;
