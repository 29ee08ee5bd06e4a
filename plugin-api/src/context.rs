//! What a handler can do: load aggregates, raise events, send commands, read and write documents.
//!
//! Invariant: nothing a handler does is written when it does it. Every write is buffered by the host and
//! committed as one unit of work after the handler returns, or dropped if it fails.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{
    aggregate::{Aggregate, Recorded},
    error::{HandlerError, HandlerResult},
    message::{Command, Event, Naming},
};

/// A read model: a JSON document stored by collection and id.
pub trait Document: Serialize + DeserializeOwned {
    /// The collection the document lives in, e.g. `"reservations"`.
    const COLLECTION: &'static str;
    /// The document's id within its collection.
    fn id(&self) -> String;
}

/// The host services behind a [`Context`], in plain Rust: what a handler can ask of the host during one
/// batch. Writes are buffered and tagged with the index of the message in the batch that made them;
/// reads see what is buffered so far.
///
/// `protean-host` implements it (and adapts it to the ABI's [`Host`](crate::abi::Host)), as does
/// [`crate::testing::TestHost`]. Domain authors never call it directly, so it is hidden from their docs.
#[doc(hidden)]
pub trait HostServices {
    /// Buffer an event; `expected_version` is the stream's last position the handler saw.
    fn raise_event(
        &self,
        index: u32,
        stream: &str,
        message_type: &str,
        data: &[u8],
        expected_version: Option<i64>,
    ) -> Result<(), String>;
    /// Buffer a command for its command stream.
    fn send_command(
        &self,
        index: u32,
        stream: &str,
        message_type: &str,
        data: &[u8],
    ) -> Result<(), String>;
    /// Events of a stream from a position, as a JSON array of `{"type", "position", "data"}`.
    fn read_stream(&self, stream: &str, from_position: u64) -> Result<Vec<u8>, String>;
    /// A document, if it exists.
    fn get_document(&self, collection: &str, id: &str) -> Result<Option<Vec<u8>>, String>;
    /// Buffer a document write.
    fn put_document(
        &self,
        index: u32,
        collection: &str,
        id: &str,
        data: &[u8],
    ) -> Result<(), String>;
    /// Buffer a document delete.
    fn delete_document(&self, index: u32, collection: &str, id: &str) -> Result<(), String>;
    /// Documents whose top-level `field` equals `value_json`, as a JSON array.
    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value_json: &[u8],
    ) -> Result<Vec<u8>, String>;
    /// Buffer `scheduled` under its key, replacing whatever the key named. The defaults of these
    /// three are what a host without schedules answers (see [`crate::abi::host_call`]).
    fn schedule(&self, index: u32, scheduled: ScheduledMessage<'_>) -> Result<(), String> {
        let _ = (index, scheduled);
        Err(crate::abi::HOST_WITHOUT_SCHEDULES.into())
    }
    /// Buffer the cancellation of the pending schedule of `key`, if there is one.
    fn cancel_schedule(&self, index: u32, key: &str) -> Result<(), String> {
        let _ = (index, key);
        Err(crate::abi::HOST_WITHOUT_SCHEDULES.into())
    }
    /// Now on the engine's clock, in ms since the Unix epoch.
    fn now_ms(&self) -> i64 {
        crate::abi::system_now_ms()
    }
    /// A hint: the batch's handlers are about to read these documents and streams, and to find the
    /// documents of `finds` (collection, field, value as JSON). A host that keeps its store across a
    /// network reads them all at once, so that each read is then answered without a round trip. What
    /// it answers is the same either way, so a host may ignore it (the default).
    fn prefetch(&self, documents: &[(&str, &str)], streams: &[&str], finds: &[(&str, &str, &str)]) {
        let _ = (documents, streams, finds);
    }
}

/// A message to append when the engine's clock reaches `due_ms`, unless the schedule `key` names is
/// cancelled or set again first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledMessage<'m> {
    /// The schedule's name, as the host stores it.
    pub key: &'m str,
    /// When it is due, in ms since the Unix epoch.
    pub due_ms: i64,
    /// An event or a command.
    pub kind: MessageKind,
    /// Where it is appended.
    pub stream: &'m str,
    /// Its full type name.
    pub message_type: &'m str,
    /// Its data, as JSON.
    pub data: &'m [u8],
}

/// Whether a message is an event or a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Appended to an aggregate's stream.
    Event,
    /// Appended to an aggregate's command stream.
    Command,
}

/// The longest schedule key a host keeps, in bytes.
pub const MAX_SCHEDULE_KEY_BYTES: usize = 200;

/// The latest due time a host keeps: the last millisecond of the year 9999, the end of RFC 3339 times.
pub const MAX_DUE_MS: i64 = 253_402_300_799_999;

/// Why a schedule of `key` due at `due_ms` cannot be kept, if it cannot: the rule every host applies
/// (the host refuses such a schedule, and the message that made it fails for good).
#[doc(hidden)]
pub fn schedule_refusal(key: &str, due_ms: Option<i64>) -> Option<String> {
    if key.is_empty() {
        return Some("a schedule key is empty; name the schedule".into());
    }
    if key.len() > MAX_SCHEDULE_KEY_BYTES {
        let start: String = key.chars().take(40).collect();
        return Some(format!(
            "schedule key {start:?}... is {} bytes, over the {MAX_SCHEDULE_KEY_BYTES} a host keeps; use a shorter key",
            key.len()
        ));
    }
    match due_ms {
        Some(ms) if !(0..=MAX_DUE_MS).contains(&ms) => Some(format!(
            "schedule {key:?} is due at {ms} ms since the Unix epoch, outside the times a host keeps (1970 to the end of 9999)"
        )),
        _ => None,
    }
}

/// The message being handled.
#[derive(Debug, Clone, Copy)]
pub struct MessageInfo<'a> {
    /// `metadata.headers.id`.
    pub id: &'a str,
    /// The stream it was read from.
    pub stream: &'a str,
    /// Its full type name.
    pub message_type: &'a str,
    /// Its position in its stream.
    pub position: u64,
    /// Its position in the whole store.
    pub global_position: u64,
    /// The raw `metadata` JSON.
    pub metadata: &'a [u8],
}

impl MessageInfo<'_> {
    /// `metadata.domain.correlation_id`, if present.
    pub fn correlation_id(&self) -> Option<String> {
        #[derive(Deserialize)]
        struct Meta {
            domain: Option<DomainMeta>,
        }
        #[derive(Deserialize)]
        struct DomainMeta {
            correlation_id: Option<String>,
        }
        serde_json::from_slice::<Meta>(self.metadata)
            .ok()?
            .domain?
            .correlation_id
    }
}

/// The handle a handler works through.
pub struct Context<'a> {
    services: &'a dyn HostServices,
    naming: &'a Naming,
    index: u32,
    message: MessageInfo<'a>,
    /// Last known position of each stream this handler loaded or wrote, for optimistic concurrency.
    versions: HashMap<String, i64>,
    /// The process-manager instance whose step this is, if it is one: its timeouts are named in it.
    timeouts: Option<Timeouts>,
}

/// The timeouts of the process-manager instance a step runs for.
#[derive(Debug)]
pub(crate) struct Timeouts {
    /// Every timeout key of the instance starts with it: `{domain}::pm::{manager}::{correlation}::`.
    prefix: String,
    /// Timeouts set (`true`) or cancelled (`false`) by the step, in order.
    pub(crate) changes: Vec<(String, bool)>,
}

impl Timeouts {
    /// The timeouts of the instance `correlation` of the process manager `manager`.
    pub(crate) fn new(naming: &Naming, manager: &str, correlation: &str) -> Self {
        Self {
            prefix: format!("{}::pm::{manager}::{correlation}::", naming.normalized()),
            changes: Vec::new(),
        }
    }

    /// The schedule key of the instance's timeout `name`.
    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        services: &'a dyn HostServices,
        naming: &'a Naming,
        index: u32,
        message: MessageInfo<'a>,
    ) -> Self {
        Self {
            services,
            naming,
            index,
            message,
            versions: HashMap::new(),
            timeouts: None,
        }
    }

    /// Run `step` as a step of the process-manager instance whose timeouts are `timeouts`; they come
    /// back with what the step set and cancelled.
    pub(crate) fn in_instance<R>(
        &mut self,
        timeouts: Timeouts,
        step: impl FnOnce(&mut Self) -> R,
    ) -> (R, Timeouts) {
        self.timeouts = Some(timeouts);
        let result = step(self);
        let timeouts = self
            .timeouts
            .take()
            .expect("the step's timeouts stay in place");
        (result, timeouts)
    }

    /// The message being handled.
    pub fn message(&self) -> &MessageInfo<'a> {
        &self.message
    }

    /// The domain's naming rules.
    pub fn naming(&self) -> &Naming {
        self.naming
    }

    /// Load aggregate `A` with `id` by applying its events; `None` if its stream is empty.
    ///
    /// Events raised later for the same id are appended with the loaded version as the expected one, so a
    /// concurrent writer makes this unit of work fail and be retried.
    pub fn load<A: Aggregate>(&mut self, id: &str) -> Result<Option<A>, HandlerError> {
        let stream = self.naming.stream_of::<A>(id);
        let bytes = self
            .services
            .read_stream(&stream, 0)
            .map_err(HandlerError::retry)?;
        let events: Vec<Recorded> = serde_json::from_slice(&bytes).map_err(|e| {
            HandlerError::retry(format!("host returned unreadable stream {stream}: {e}"))
        })?;
        let Some(last) = events.last() else {
            self.versions.insert(stream, -1);
            return Ok(None);
        };
        self.versions.insert(stream, last.position() as i64);
        let mut aggregate = A::default();
        for event in &events {
            aggregate.apply(event)?;
        }
        Ok(Some(aggregate))
    }

    /// Raise `event` on the aggregate with `id`. It is stored in the aggregate's stream when the handler's
    /// unit of work commits.
    pub fn raise<E: Event>(&mut self, id: &str, event: &E) -> Result<(), HandlerError> {
        let stream = self.naming.stream_of::<E::Aggregate>(id);
        let data = to_json(event)?;
        let expected = self.versions.get(&stream).copied();
        self.services
            .raise_event(
                self.index,
                &stream,
                &self.naming.type_of::<E>(),
                &data,
                expected,
            )
            .map_err(HandlerError::retry)?;
        if let Some(version) = self.versions.get_mut(&stream) {
            *version += 1;
        }
        Ok(())
    }

    /// Send `command` to its aggregate's command stream.
    pub fn send<C: Command>(&mut self, command: &C) -> Result<(), HandlerError> {
        let stream = self.naming.command_stream_of(command);
        let data = to_json(command)?;
        self.services
            .send_command(self.index, &stream, &self.naming.type_of::<C>(), &data)
            .map_err(HandlerError::retry)
    }

    /// The document `D` with `id`, if it exists (including writes buffered earlier in this batch). The
    /// host notes the version read, so a later `put` or `delete` of it cannot overwrite a concurrent
    /// write (see [`Context::put`]).
    pub fn get<D: Document>(&self, id: &str) -> Result<Option<D>, HandlerError> {
        let found = self
            .services
            .get_document(D::COLLECTION, id)
            .map_err(HandlerError::retry)?;
        found
            .map(|bytes| from_json(&bytes, D::COLLECTION))
            .transpose()
    }

    /// Write `document` (insert or replace). If this batch read it (`get` or `find`), the write commits
    /// only if nobody wrote the document since (insert only if it is still absent when it was read as
    /// absent); otherwise the host re-runs the batch on the new document. A document not read first is
    /// written whatever is stored.
    pub fn put<D: Document>(&mut self, document: &D) -> Result<(), HandlerError> {
        let data = to_json(document)?;
        self.services
            .put_document(self.index, D::COLLECTION, &document.id(), &data)
            .map_err(HandlerError::retry)
    }

    /// Delete the document `D` with `id` (no error if it does not exist).
    pub fn delete<D: Document>(&mut self, id: &str) -> Result<(), HandlerError> {
        self.services
            .delete_document(self.index, D::COLLECTION, id)
            .map_err(HandlerError::retry)
    }

    /// The documents `D` whose top-level `field` equals `value`.
    pub fn find<D: Document>(
        &self,
        field: &str,
        value: impl Serialize,
    ) -> Result<Vec<D>, HandlerError> {
        let value = to_json(&value)?;
        let bytes = self
            .services
            .find_documents(D::COLLECTION, field, &value)
            .map_err(HandlerError::retry)?;
        from_json(&bytes, D::COLLECTION)
    }
}

/// Time and schedules.
impl<'a> Context<'a> {
    /// Now, on the host's clock: the time handlers must go by (in a test run of the host, or in a
    /// [`TestHost`](crate::testing::TestHost), the clock is virtual and moves only when told).
    pub fn now(&self) -> SystemTime {
        time_of(self.services.now_ms())
    }

    /// Schedule a message under `key`: say when with [`Schedule::after`] or [`Schedule::at`], then what
    /// with [`Due::send`] or [`Due::raise`]. The key names one schedule in the domain: scheduling it
    /// again replaces it (a reset), [`Context::cancel`] cancels it. Like every write, the schedule is
    /// kept only if the handler succeeds; when it comes due, the host appends the message as if a
    /// handler had written it then, caused by the message being handled now.
    ///
    /// ```
    /// # use protean_plugin_api::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # use std::time::Duration;
    /// # #[derive(Default, Aggregate)] struct Order;
    /// # #[derive(Serialize, Deserialize, Event)] #[event(aggregate = Order)] struct OrderPlaced { id: String }
    /// # #[derive(Serialize, Deserialize, Event)] #[event(aggregate = Order)] struct OrderPaid { id: String }
    /// # #[derive(Serialize, Deserialize, Command)] #[command(aggregate = Order, target = id)]
    /// # struct CancelOrder { id: String }
    /// fn on_placed(event: OrderPlaced, ctx: &mut Context) -> HandlerResult {
    ///     // Cancel an unpaid order after a day; a second `OrderPlaced` would reset the day.
    ///     let key = format!("unpaid-{}", event.id);
    ///     ctx.schedule(&key).after(Duration::from_secs(86_400)).send(&CancelOrder { id: event.id })
    /// }
    ///
    /// fn on_paid(event: OrderPaid, ctx: &mut Context) -> HandlerResult {
    ///     ctx.cancel(&format!("unpaid-{}", event.id))
    /// }
    /// # let domain = Domain::new("Shop").event_handler(EventHandler::new("payments").on(on_placed).on(on_paid));
    /// # let host = protean_plugin_api::testing::TestHost::new(domain);
    /// # host.handle_event("payments", "o1", &OrderPlaced { id: "o1".into() }).unwrap();
    /// # assert_eq!(host.scheduled().len(), 1);
    /// # host.handle_event("payments", "o1", &OrderPaid { id: "o1".into() }).unwrap();
    /// # assert!(host.scheduled().is_empty());
    /// ```
    pub fn schedule<'c>(&'c mut self, key: &str) -> Schedule<'c, 'a> {
        let key = self.schedule_key(key);
        Schedule { ctx: self, key }
    }

    /// Cancel the schedule named `key` if it has not fired yet (no error if there is none).
    pub fn cancel(&mut self, key: &str) -> HandlerResult {
        let key = self.schedule_key(key);
        self.services
            .cancel_schedule(self.index, &key)
            .map_err(host_error)
    }

    /// Inside a process-manager step: send `command` after `delay` unless the timeout `name` of this
    /// instance is cancelled first. Setting it again resets it; the instance's timeouts are cancelled
    /// when it ends. Outside a process-manager step it fails for good (use [`Context::schedule`]).
    ///
    /// ```
    /// # use protean_plugin_api::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # use std::time::Duration;
    /// # #[derive(Default, Aggregate)] struct Order;
    /// # #[derive(Serialize, Deserialize, Event)] #[event(aggregate = Order)] struct OrderPlaced { order: String }
    /// # #[derive(Serialize, Deserialize, Event)] #[event(aggregate = Order)] struct OrderShipped { order: String }
    /// # #[derive(Serialize, Deserialize, Command)] #[command(aggregate = Order, target = order)]
    /// # struct Escalate { order: String }
    /// #[derive(Default, Serialize, Deserialize)]
    /// struct Shipping { placed: bool }
    ///
    /// fn placed(state: &mut Shipping, event: OrderPlaced, ctx: &mut Context) -> HandlerResult {
    ///     state.placed = true;
    ///     ctx.set_timeout("late", Duration::from_secs(2 * 86_400), &Escalate { order: event.order })
    /// }
    ///
    /// fn shipped(_: &mut Shipping, _: OrderShipped) {} // ending the instance cancels "late"
    ///
    /// let manager = ProcessManager::<Shipping>::new("shipping", "order").start(placed).end(shipped);
    /// # let host = protean_plugin_api::testing::TestHost::new(Domain::new("Shop").process_manager(manager));
    /// # host.handle_event("shipping", "o1", &OrderPlaced { order: "o1".into() }).unwrap();
    /// # assert_eq!(host.scheduled().len(), 1);
    /// # host.handle_event("shipping", "o1", &OrderShipped { order: "o1".into() }).unwrap();
    /// # assert!(host.scheduled().is_empty());
    /// ```
    pub fn set_timeout<C: Command>(
        &mut self,
        name: &str,
        delay: Duration,
        command: &C,
    ) -> HandlerResult {
        let key = self.timeout_key(name, "set_timeout")?;
        let due_ms = due_after(self.services.now_ms(), delay)?;
        self.schedule_message(&key, due_ms, Outgoing::command(self.naming, command)?)?;
        self.note_timeout(name, true);
        Ok(())
    }

    /// Inside a process-manager step: cancel this instance's timeout `name` if it has not fired yet.
    pub fn cancel_timeout(&mut self, name: &str) -> HandlerResult {
        let key = self.timeout_key(name, "cancel_timeout")?;
        self.services
            .cancel_schedule(self.index, &key)
            .map_err(host_error)?;
        self.note_timeout(name, false);
        Ok(())
    }

    /// The store's name of the domain's schedule `key`: schedules of different domains never meet.
    fn schedule_key(&self, key: &str) -> String {
        format!("{}::{key}", self.naming.normalized())
    }

    fn timeout_key(&self, name: &str, call: &str) -> Result<String, HandlerError> {
        let Some(timeouts) = &self.timeouts else {
            return Err(HandlerError::reject(format!(
                "{call}({name:?}) works only in a process-manager step, whose instance the timeout belongs to; elsewhere use ctx.schedule(key)"
            )));
        };
        if name.is_empty() {
            return Err(HandlerError::reject(format!(
                "{call} with an empty timeout name"
            )));
        }
        Ok(timeouts.key(name))
    }

    fn note_timeout(&mut self, name: &str, set: bool) {
        if let Some(timeouts) = &mut self.timeouts {
            timeouts.changes.push((name.to_owned(), set));
        }
    }

    /// Cancel the timeouts `names` of the instance the step runs for (it ends).
    pub(crate) fn cancel_timeouts(&mut self, names: &[String]) -> HandlerResult {
        for name in names {
            self.cancel_timeout(name)?;
        }
        Ok(())
    }

    fn schedule_message(&self, key: &str, due_ms: i64, message: Outgoing) -> HandlerResult {
        let scheduled = ScheduledMessage {
            key,
            due_ms,
            kind: message.kind,
            stream: &message.stream,
            message_type: &message.message_type,
            data: &message.data,
        };
        self.services
            .schedule(self.index, scheduled)
            .map_err(host_error)
    }
}

/// A schedule being made: [`Context::schedule`] named it; [`Schedule::after`] or [`Schedule::at`] says
/// when it is due.
#[derive(Debug)]
#[must_use = "a schedule is made only by `.send(..)` or `.raise(..)` after `.after(..)` or `.at(..)`"]
pub struct Schedule<'c, 'a> {
    ctx: &'c mut Context<'a>,
    key: String,
}

impl<'c, 'a> Schedule<'c, 'a> {
    /// Due `delay` from now on the host's clock.
    pub fn after(self, delay: Duration) -> Due<'c, 'a> {
        let due_ms = due_after(self.ctx.services.now_ms(), delay);
        Due {
            ctx: self.ctx,
            key: self.key,
            due_ms,
        }
    }

    /// Due at `time` (a time already past fires at once).
    pub fn at(self, time: SystemTime) -> Due<'c, 'a> {
        Due {
            ctx: self.ctx,
            key: self.key,
            due_ms: ms_of(time),
        }
    }
}

/// A schedule with its due time: [`Due::send`] or [`Due::raise`] says what it appends.
#[derive(Debug)]
#[must_use = "a schedule is made only by `.send(..)` or `.raise(..)`"]
pub struct Due<'c, 'a> {
    ctx: &'c mut Context<'a>,
    key: String,
    due_ms: Result<i64, HandlerError>,
}

impl Due<'_, '_> {
    /// Send `command` to its aggregate's command stream when due.
    pub fn send<C: Command>(self, command: &C) -> HandlerResult {
        let message = Outgoing::command(self.ctx.naming, command)?;
        self.ctx.schedule_message(&self.key, self.due_ms?, message)
    }

    /// Raise `event` on the aggregate with `id` when due (appended without a concurrency check: the
    /// aggregate's version then is not known now).
    pub fn raise<E: Event>(self, id: &str, event: &E) -> HandlerResult {
        let message = Outgoing {
            kind: MessageKind::Event,
            stream: self.ctx.naming.stream_of::<E::Aggregate>(id),
            message_type: self.ctx.naming.type_of::<E>(),
            data: to_json(event)?,
        };
        self.ctx.schedule_message(&self.key, self.due_ms?, message)
    }
}

/// A message to schedule, as the host takes it.
struct Outgoing {
    kind: MessageKind,
    stream: String,
    message_type: String,
    data: Vec<u8>,
}

impl Outgoing {
    fn command<C: Command>(naming: &Naming, command: &C) -> Result<Self, HandlerError> {
        Ok(Self {
            kind: MessageKind::Command,
            stream: naming.command_stream_of(command),
            message_type: naming.type_of::<C>(),
            data: to_json(command)?,
        })
    }
}

/// A host error as the handler sees it: retryable, except that a host without schedules will never
/// have them (the message is dead-lettered, to replay once the host is upgraded).
fn host_error(error: String) -> HandlerError {
    if error == crate::abi::HOST_WITHOUT_SCHEDULES {
        HandlerError::reject(error)
    } else {
        HandlerError::retry(error)
    }
}

/// The time `ms` milliseconds after the Unix epoch (before it when negative).
pub(crate) fn time_of(ms: i64) -> SystemTime {
    let offset = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        UNIX_EPOCH + offset
    } else {
        UNIX_EPOCH - offset
    }
}

/// Milliseconds since the Unix epoch of `time`, if a host can keep it as a due time.
fn ms_of(time: SystemTime) -> Result<i64, HandlerError> {
    let unkept =
        || HandlerError::reject(format!("{time:?} is not a time a host keeps schedules for"));
    let since = time.duration_since(UNIX_EPOCH).map_err(|_| unkept())?;
    i64::try_from(since.as_millis()).map_err(|_| unkept())
}

fn due_after(now_ms: i64, delay: Duration) -> Result<i64, HandlerError> {
    i64::try_from(delay.as_millis())
        .ok()
        .and_then(|delay| now_ms.checked_add(delay))
        .ok_or_else(|| {
            HandlerError::reject(format!(
                "a delay of {delay:?} is past any time a host keeps"
            ))
        })
}

impl Context<'_> {
    /// A JSON document from a collection named at run time (process-manager state).
    pub(crate) fn get_raw<T: DeserializeOwned>(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Option<T>, HandlerError> {
        let found = self
            .services
            .get_document(collection, id)
            .map_err(HandlerError::retry)?;
        found.map(|bytes| from_json(&bytes, collection)).transpose()
    }

    /// Write a JSON document to a collection named at run time.
    pub(crate) fn put_raw<T: Serialize>(
        &mut self,
        collection: &str,
        id: &str,
        value: &T,
    ) -> Result<(), HandlerError> {
        let data = to_json(value)?;
        self.services
            .put_document(self.index, collection, id, &data)
            .map_err(HandlerError::retry)
    }
}

fn to_json(value: &impl Serialize) -> Result<Vec<u8>, HandlerError> {
    serde_json::to_vec(value).map_err(|e| HandlerError::reject(format!("cannot serialize: {e}")))
}

fn from_json<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, HandlerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| HandlerError::reject(format!("cannot decode {what}: {e}")))
}
