//! Test handlers in-process, without building a `.so` or running a host.
//!
//! [`TestHost`] plays the host: it calls a handler of a [`Domain`] with one message, commits what the
//! handler produced into its in-memory streams and documents when it succeeds, and drops it when it fails,
//! exactly like the real unit of work.
//!
//! ```
//! # use protean_plugin_api::prelude::*;
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Default, Aggregate)] struct Counter;
//! # #[derive(Serialize, Deserialize, Event)] #[event(aggregate = Counter)] struct Bumped { id: String }
//! # #[derive(Serialize, Deserialize, Document)] #[document(collection = "tallies")]
//! # struct Tally { id: String, n: u32 }
//! fn count(event: Bumped, ctx: &mut Context) -> HandlerResult {
//!     let n = ctx.get::<Tally>(&event.id)?.map_or(0, |t| t.n);
//!     ctx.put(&Tally { id: event.id, n: n + 1 })
//! }
//! let domain = Domain::new("Demo").projector(Projector::new("tally").on(count));
//! let host = protean_plugin_api::testing::TestHost::new(domain);
//! host.handle_event("tally", "c1", &Bumped { id: "c1".into() }).unwrap();
//! host.handle_event("tally", "c1", &Bumped { id: "c1".into() }).unwrap();
//! assert_eq!(host.document::<Tally>("c1").unwrap().n, 2);
//! ```

use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::{
    context::{
        schedule_refusal, time_of, Document, HostServices, MessageInfo, MessageKind,
        ScheduledMessage,
    },
    domain::Domain,
    error::HandlerError,
    message::{Command, Event, Message},
};

/// An event or command a handler produced, as the test host stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct Produced {
    /// The stream it was written to.
    pub stream: String,
    /// Its full type name.
    pub message_type: String,
    /// Its data.
    pub data: Value,
}

/// A message scheduled and not yet fired nor cancelled, as the test host keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled {
    /// The schedule's key as the host stores it: `{domain}::{key}` for [`Context::schedule`]
    /// (`crate::Context`), `{domain}::pm::{manager}::{correlation}::{name}` for a process manager's
    /// timeout.
    pub key: String,
    /// When it is due, on the test host's clock.
    pub due: SystemTime,
    /// Whether it is an event or a command.
    pub kind: MessageKind,
    /// The message it appends.
    pub message: Produced,
}

#[derive(Default, Clone)]
struct State {
    streams: BTreeMap<String, Vec<Produced>>,
    documents: BTreeMap<(String, String), Value>,
    commands: Vec<Produced>,
    /// Pending schedules, in the order they were (last) set.
    schedules: Vec<Scheduled>,
}

/// An in-process host for unit tests of handlers. Its clock is virtual: it starts at
/// [`TestHost::START`] and moves only by [`TestHost::advance`], which fires the schedules that come due.
///
/// ```
/// # use protean_plugin_api::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// # use std::time::Duration;
/// # #[derive(Default, Aggregate)] struct Kettle;
/// # #[derive(Serialize, Deserialize, Command)] #[command(aggregate = Kettle, target = id)]
/// # struct Boil { id: String }
/// # #[derive(Serialize, Deserialize, Command)] #[command(aggregate = Kettle, target = id)]
/// # struct Whistle { id: String }
/// fn boil(command: Boil, ctx: &mut Context) -> HandlerResult {
///     let key = format!("whistle-{}", command.id);
///     ctx.schedule(&key).after(Duration::from_secs(180)).send(&Whistle { id: command.id })
/// }
/// # fn whistle(_: Whistle) {}
/// let domain = Domain::new("Kitchen")
///     .command_handler(CommandHandler::<Kettle>::new("kettles").on(boil).on(whistle));
/// let host = protean_plugin_api::testing::TestHost::new(domain);
/// host.handle_command("kettles", &Boil { id: "k1".into() }).unwrap();
/// assert!(host.advance(Duration::from_secs(179)).is_empty());
/// let fired = host.advance(Duration::from_secs(1));
/// assert_eq!(fired[0].message_type, "Kitchen.Whistle.v1");
/// assert_eq!(host.commands(), fired, "a fired command is sent like any other");
/// ```
pub struct TestHost {
    domain: Domain,
    committed: RefCell<State>,
    pending: RefCell<Option<State>>,
    now_ms: Cell<i64>,
}

impl std::fmt::Debug for TestHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestHost")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl TestHost {
    /// Where the test host's clock starts: 2026-01-01T00:00:00Z.
    pub const START: Duration = Duration::from_secs(1_767_225_600);

    /// A host with empty streams and documents, its clock at [`TestHost::START`].
    pub fn new(domain: Domain) -> Self {
        Self {
            domain,
            committed: RefCell::default(),
            pending: RefCell::default(),
            now_ms: Cell::new(Self::START.as_millis() as i64),
        }
    }

    /// The same host, its clock at `time` (at or after the Unix epoch).
    pub fn starting_at(self, time: SystemTime) -> Self {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.now_ms
            .set(i64::try_from(since.as_millis()).unwrap_or(i64::MAX));
        self
    }

    /// Now on the test host's clock: what [`Context::now`](crate::Context::now) answers.
    pub fn now(&self) -> SystemTime {
        time_of(self.now_ms.get())
    }

    /// The schedules pending (set, not yet fired nor cancelled), earliest due first.
    pub fn scheduled(&self) -> Vec<Scheduled> {
        let mut pending = self.committed.borrow().schedules.clone();
        pending.sort_by_key(|s| s.due);
        pending
    }

    /// Move the clock on by `by` and fire the schedules that came due, earliest first (in the order
    /// they were set when due together): each message is appended to its stream, or sent if it is a
    /// command, and returned. Nothing is handled: call the handlers with what came back.
    pub fn advance(&self, by: Duration) -> Vec<Produced> {
        assert!(
            self.pending.borrow().is_none(),
            "the clock cannot move inside a handler"
        );
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.now_ms.set(self.now_ms.get().saturating_add(by));
        let now = self.now();
        let mut committed = self.committed.borrow_mut();
        let (mut due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut committed.schedules)
            .into_iter()
            .partition(|s| s.due <= now);
        committed.schedules = waiting;
        // Stable: schedules due at the same time fire in the order they were set.
        due.sort_by_key(|s| s.due);
        for fired in &due {
            let message = fired.message.clone();
            match fired.kind {
                MessageKind::Event => committed
                    .streams
                    .entry(message.stream.clone())
                    .or_default()
                    .push(message),
                MessageKind::Command => committed.commands.push(message),
            }
        }
        due.into_iter().map(|s| s.message).collect()
    }

    /// Store `event` in the stream of aggregate `id`, as if an earlier unit of work had raised it.
    pub fn given<E: Event>(&self, id: &str, event: &E) {
        let stream = self.domain.naming().stream_of::<E::Aggregate>(id);
        let produced = self.produced(&stream, self.domain.naming().type_of::<E>(), event);
        self.committed
            .borrow_mut()
            .streams
            .entry(stream)
            .or_default()
            .push(produced);
    }

    /// Call handler `handler` with `event` of aggregate `id`.
    pub fn handle_event<E: Event>(
        &self,
        handler: &str,
        id: &str,
        event: &E,
    ) -> Result<(), HandlerError> {
        let stream = self.domain.naming().stream_of::<E::Aggregate>(id);
        self.handle(
            handler,
            &stream,
            &self.domain.naming().type_of::<E>(),
            event,
        )
    }

    /// Call handler `handler` with `command`.
    pub fn handle_command<C: Command>(
        &self,
        handler: &str,
        command: &C,
    ) -> Result<(), HandlerError> {
        let stream = self.domain.naming().command_stream_of(command);
        self.handle(
            handler,
            &stream,
            &self.domain.naming().type_of::<C>(),
            command,
        )
    }

    /// The events stored in the stream of aggregate `A` with `id`.
    pub fn events<A: crate::Aggregate>(&self, id: &str) -> Vec<Produced> {
        let stream = self.domain.naming().stream_of::<A>(id);
        self.committed
            .borrow()
            .streams
            .get(&stream)
            .cloned()
            .unwrap_or_default()
    }

    /// The commands sent so far.
    pub fn commands(&self) -> Vec<Produced> {
        self.committed.borrow().commands.clone()
    }

    /// The document `D` with `id`.
    pub fn document<D: Document>(&self, id: &str) -> Option<D> {
        let committed = self.committed.borrow();
        let value = committed
            .documents
            .get(&(D::COLLECTION.to_owned(), id.to_owned()))?;
        serde_json::from_value(value.clone()).ok()
    }

    fn produced(
        &self,
        stream: &str,
        message_type: String,
        message: &impl serde::Serialize,
    ) -> Produced {
        let data = serde_json::to_value(message).expect("test messages serialize to JSON");
        Produced {
            stream: stream.to_owned(),
            message_type,
            data,
        }
    }

    fn handle<M: Message>(
        &self,
        handler: &str,
        stream: &str,
        message_type: &str,
        message: &M,
    ) -> Result<(), HandlerError> {
        let data = serde_json::to_vec(message).expect("test messages serialize to JSON");
        let info = MessageInfo {
            id: "test-message",
            stream,
            message_type,
            position: 0,
            global_position: 0,
            metadata: b"{}",
        };
        *self.pending.borrow_mut() = Some(self.committed.borrow().clone());
        let (_, error) = self.domain.handle_batch(handler, &[(info, &data)], self);
        let pending = self
            .pending
            .borrow_mut()
            .take()
            .expect("a batch is in progress");
        match error {
            None => {
                *self.committed.borrow_mut() = pending;
                Ok(())
            }
            Some(error) => Err(error),
        }
    }

    fn with_pending<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(self
            .pending
            .borrow_mut()
            .as_mut()
            .expect("host services are only available inside a handler"))
    }
}

fn parse(data: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(data).map_err(|e| e.to_string())
}

impl HostServices for TestHost {
    fn raise_event(
        &self,
        _: u32,
        stream: &str,
        message_type: &str,
        data: &[u8],
        expected: Option<i64>,
    ) -> Result<(), String> {
        let data = parse(data)?;
        self.with_pending(|state| {
            let events = state.streams.entry(stream.to_owned()).or_default();
            let current = events.len() as i64 - 1;
            if let Some(expected) = expected.filter(|&e| e != current) {
                return Err(format!(
                    "version conflict on {stream}: expected {expected}, found {current}"
                ));
            }
            events.push(Produced {
                stream: stream.to_owned(),
                message_type: message_type.to_owned(),
                data,
            });
            Ok(())
        })
    }

    fn send_command(
        &self,
        _: u32,
        stream: &str,
        message_type: &str,
        data: &[u8],
    ) -> Result<(), String> {
        let data = parse(data)?;
        self.with_pending(|state| {
            state.commands.push(Produced {
                stream: stream.to_owned(),
                message_type: message_type.to_owned(),
                data,
            });
            Ok(())
        })
    }

    fn read_stream(&self, stream: &str, from: u64) -> Result<Vec<u8>, String> {
        self.with_pending(|state| {
            let events = state.streams.get(stream).map(Vec::as_slice).unwrap_or_default();
            let list: Vec<Value> = events
                .iter()
                .enumerate()
                .skip(from as usize)
                .map(|(i, e)| serde_json::json!({"type": e.message_type, "position": i, "data": e.data}))
                .collect();
            serde_json::to_vec(&list).map_err(|e| e.to_string())
        })
    }

    fn get_document(&self, collection: &str, id: &str) -> Result<Option<Vec<u8>>, String> {
        self.with_pending(|state| {
            let key = (collection.to_owned(), id.to_owned());
            Ok(state
                .documents
                .get(&key)
                .map(|v| v.to_string().into_bytes()))
        })
    }

    fn put_document(&self, _: u32, collection: &str, id: &str, data: &[u8]) -> Result<(), String> {
        let data = parse(data)?;
        self.with_pending(|state| {
            state
                .documents
                .insert((collection.to_owned(), id.to_owned()), data);
            Ok(())
        })
    }

    fn delete_document(&self, _: u32, collection: &str, id: &str) -> Result<(), String> {
        self.with_pending(|state| {
            state
                .documents
                .remove(&(collection.to_owned(), id.to_owned()));
            Ok(())
        })
    }

    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value_json: &[u8],
    ) -> Result<Vec<u8>, String> {
        let wanted = parse(value_json)?;
        self.with_pending(|state| {
            let found: Vec<&Value> = state
                .documents
                .iter()
                .filter(|((c, _), doc)| c == collection && doc.get(field) == Some(&wanted))
                .map(|(_, doc)| doc)
                .collect();
            serde_json::to_vec(&found).map_err(|e| e.to_string())
        })
    }

    fn schedule(&self, _: u32, scheduled: ScheduledMessage<'_>) -> Result<(), String> {
        let ScheduledMessage {
            key,
            due_ms,
            kind,
            stream,
            message_type,
            data,
        } = scheduled;
        if let Some(refusal) = schedule_refusal(key, Some(due_ms)) {
            return Err(refusal);
        }
        let data = parse(data)?;
        self.with_pending(|state| {
            state.schedules.retain(|s| s.key != key);
            state.schedules.push(Scheduled {
                key: key.to_owned(),
                due: time_of(due_ms),
                kind,
                message: Produced {
                    stream: stream.to_owned(),
                    message_type: message_type.to_owned(),
                    data,
                },
            });
            Ok(())
        })
    }

    fn cancel_schedule(&self, _: u32, key: &str) -> Result<(), String> {
        if let Some(refusal) = schedule_refusal(key, None) {
            return Err(refusal);
        }
        self.with_pending(|state| {
            state.schedules.retain(|s| s.key != key);
            Ok(())
        })
    }

    fn now_ms(&self) -> i64 {
        self.now_ms.get()
    }
}
