//! A domain: its name and its handlers, declared with builders that read like the domain.
//!
//! ```text
//! Domain::new("Fulfilment")
//!     .command_handler(CommandHandler::<Order>::new("orders").on(place_order))
//!     .event_handler(EventHandler::new("inventory").on(reserve_stock))
//! ```
//!
//! Invariant: a handler is called only with message types it registered; the host routes by type.

use std::{collections::HashMap, marker::PhantomData, sync::Arc};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{
    abi::HandlerKind,
    context::{Context, Document, HostServices, MessageInfo, Timeouts},
    error::{HandlerError, HandlerResult},
    handler::{EventFn, StepFn},
    message::{Command, Event, Message, Naming},
    panic,
};

/// Options a handler declares; the host's configuration can override them per handler.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HandlerOptions {
    /// Attempts after the first failure before a message is dead-lettered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Messages fetched and handled per batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_per_tick: Option<u32>,
    /// Process managers: the field of every handled event that names the process instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlate: Option<String>,
    /// Handle the messages of one key strictly in order, different keys in parallel: [`STREAM_KEY`] for
    /// the message's stream id, else a top-level field of its data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordered_by: Option<String>,
    /// Ordered handlers: what a key does after one of its messages is dead-lettered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_dead_letter: Option<AfterDeadLetter>,
    /// The longest one call of the handler (a batch of messages) may take, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The ordering key that stands for the message's stream id (`fulfilment::order-42`).
pub const STREAM_KEY: &str = "$stream";

/// What an ordered key does after one of its messages is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterDeadLetter {
    /// The key's later messages wait until the dead letter is replayed or discarded (the default for
    /// process managers: a step skipped would leave the process in a state it never reached).
    Park,
    /// The key's later messages are handled; the dead letter can be replayed out of order later (the
    /// default for other handlers).
    MoveOn,
}

/// A handler as the host sees it (hidden from authors: its kind is an ABI type).
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Unique within the domain; names the subscription.
    pub name: String,
    /// Event handler, command handler, projector or process manager.
    pub kind: HandlerKind,
    /// Full categories read (`fulfilment::order`).
    pub categories: Vec<String>,
    /// Full type names handled.
    pub message_types: Vec<String>,
    /// Declared options.
    pub options: HandlerOptions,
}

type Call = Box<dyn Fn(&[u8], &mut Context<'_>) -> HandlerResult + Send + Sync>;

/// Computes the command stream of a command from its JSON data.
type Target = Box<dyn Fn(&[u8], &Naming) -> Result<String, HandlerError> + Send + Sync>;

/// What a call of a route will read, known before the call (see [`HostServices::prefetch`]).
type Reads = Arc<dyn Fn(&MessageInfo<'_>, &[u8]) -> Option<Read> + Send + Sync>;

/// One read a call will make.
enum Read {
    Document {
        collection: String,
        id: String,
    },
    Stream(String),
    /// The stream of an aggregate, named when the domain's naming is known.
    Aggregate {
        category: &'static str,
        id: String,
    },
    /// The documents whose `field` holds `value` (JSON).
    Find {
        collection: &'static str,
        field: String,
        value: String,
    },
}

struct Route {
    class: &'static str,
    version: u32,
    category: &'static str,
    call: Call,
    target: Option<Target>,
    reads: Option<Reads>,
}

/// What every handler builder shares: a name, options and its routes.
#[doc(hidden)]
pub struct Spec {
    name: String,
    options: HandlerOptions,
    routes: Vec<Route>,
    /// What every call reads besides what its route says ([`Configure::reads_document`],
    /// [`Configure::reads_aggregate`], [`Configure::finds`]).
    reads_declared: Vec<Reads>,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let routes: Vec<_> = self.routes.iter().map(|r| r.class).collect();
        f.debug_struct("Spec")
            .field("name", &self.name)
            .field("routes", &routes)
            .finish_non_exhaustive()
    }
}

impl Spec {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            options: HandlerOptions::default(),
            routes: Vec::new(),
            reads_declared: Vec::new(),
        }
    }

    fn route<M: Message>(&mut self, category: &'static str, call: Call) {
        self.routes.push(Route {
            class: M::NAME,
            version: M::VERSION,
            category,
            call,
            target: None,
            reads: None,
        });
    }

    /// The last route added will read what `reads` says.
    fn reads(&mut self, reads: Reads) {
        if let Some(route) = self.routes.last_mut() {
            route.reads = Some(reads);
        }
    }
}

/// Options every handler builder accepts.
pub trait Configure: Sized {
    #[doc(hidden)]
    fn spec(&mut self) -> &mut Spec;

    /// Retries after the first failure before the message is dead-lettered.
    fn max_retries(mut self, retries: u32) -> Self {
        self.spec().options.max_retries = Some(retries);
        self
    }

    /// Messages fetched and handled per batch.
    fn messages_per_tick(mut self, count: u32) -> Self {
        self.spec().options.messages_per_tick = Some(count);
        self
    }

    /// The longest one call of the handler (a batch of messages) may take; past it the call counts as
    /// failed (see the host's `handler_timeout_ms`, which operators can set over this).
    fn timeout(mut self, limit: std::time::Duration) -> Self {
        self.spec().options.timeout_ms = Some(limit.as_millis().try_into().unwrap_or(u64::MAX));
        self
    }

    /// Handle the messages of one stream (one aggregate) strictly in order, while different streams
    /// run in parallel across workers and replicas. A process manager orders by its correlation field.
    fn ordered(mut self) -> Self {
        let spec = self.spec();
        spec.options.ordered_by = Some(
            spec.options
                .correlate
                .clone()
                .unwrap_or_else(|| STREAM_KEY.to_owned()),
        );
        self
    }

    /// Handle the messages with the same value of the top-level field `field` (an order id, a customer
    /// id) strictly in order, while different values run in parallel.
    fn ordered_by(mut self, field: &str) -> Self {
        self.spec().options.ordered_by = Some(field.to_owned());
        self
    }

    /// What an ordered key does after one of its messages is dead-lettered (park for process managers,
    /// move on for other handlers, unless set here).
    fn after_dead_letter(mut self, policy: AfterDeadLetter) -> Self {
        self.spec().options.after_dead_letter = Some(policy);
        self
    }

    /// Each call reads (with [`Context::get`]) the document `D` whose id is the top-level field `field`
    /// of the message: a projector's `order_id`. Said here, the host reads the documents of a whole
    /// batch in one store call before the calls, where each `get` is otherwise a round trip of its own
    /// to a store across a network. Only a hint: a message without the field, or a call that reads
    /// something else, reads as before. A process manager's instance and a command handler's
    /// aggregate are read ahead without it.
    fn reads_document<D: Document>(mut self, field: &str) -> Self {
        let field = field.to_owned();
        self.spec().reads_declared.push(Arc::new(move |_, data| {
            let id = correlation_value(data, &field).ok()?;
            Some(Read::Document {
                collection: D::COLLECTION.to_owned(),
                id,
            })
        }));
        self
    }

    /// Each call loads (with [`Context::load`]) the aggregate `A` whose id is the top-level field
    /// `field` of the message: an event handler that charges the order its event names. The host then
    /// reads the aggregates' streams of a whole batch in one store call before the calls, as it does
    /// for a command handler's own aggregate. Only a hint, like [`Configure::reads_document`]; a
    /// handler may declare several reads.
    fn reads_aggregate<A: crate::Aggregate>(mut self, field: &str) -> Self {
        let field = field.to_owned();
        self.spec().reads_declared.push(Arc::new(move |_, data| {
            let id = correlation_value(data, &field).ok()?;
            Some(Read::Aggregate {
                category: A::CATEGORY,
                id,
            })
        }));
        self
    }

    /// Each call finds (with [`Context::find`]) the documents `D` whose `field` holds the value of the
    /// message's top-level field `message_field`: billing finding the reservation of the order its
    /// event names (`.finds::<Reservation>("order_id", "order_id")`). The host then makes a whole
    /// batch's finds in one store call before the calls, where each `find` is otherwise a round trip
    /// of its own. Only a hint, like [`Configure::reads_document`]: a message without the field, or a
    /// call that finds something else, finds as before.
    fn finds<D: Document>(mut self, field: &str, message_field: &str) -> Self {
        let (field, message_field) = (field.to_owned(), message_field.to_owned());
        self.spec().reads_declared.push(Arc::new(move |_, data| {
            let message: serde_json::Value = serde_json::from_slice(data).ok()?;
            let value = message.get(&message_field)?;
            Some(Read::Find {
                collection: D::COLLECTION,
                field: field.clone(),
                value: value.to_string(),
            })
        }));
        self
    }
}

fn erase<M: Message, A>(f: impl EventFn<M, A>) -> Call {
    Box::new(move |data, ctx| f.call(decode::<M>(data)?, ctx))
}

fn decode<M: Message>(data: &[u8]) -> Result<M, HandlerError> {
    serde_json::from_slice(data)
        .map_err(|e| HandlerError::reject(format!("cannot decode {}: {e}", M::NAME)))
}

/// Reacts to events, possibly raising events and sending commands. One subscription per handler.
#[derive(Debug)]
pub struct EventHandler(Spec);

impl EventHandler {
    /// An event handler named `name` (unique in the domain; names its subscription).
    pub fn new(name: &str) -> Self {
        Self(Spec::new(name))
    }

    /// Handle events of type `E` with `f` (any form of [`EventFn`]).
    pub fn on<E: Event, A>(mut self, f: impl EventFn<E, A>) -> Self {
        self.0
            .route::<E>(<E::Aggregate as crate::Aggregate>::CATEGORY, erase(f));
        self
    }
}

impl Configure for EventHandler {
    fn spec(&mut self) -> &mut Spec {
        &mut self.0
    }
}

/// Maintains read models (documents) from events. One subscription per category.
#[derive(Debug)]
pub struct Projector(Spec);

impl Projector {
    /// A projector named `name`.
    pub fn new(name: &str) -> Self {
        Self(Spec::new(name))
    }

    /// Project events of type `E` with `f` (any form of [`EventFn`]).
    pub fn on<E: Event, A>(mut self, f: impl EventFn<E, A>) -> Self {
        self.0
            .route::<E>(<E::Aggregate as crate::Aggregate>::CATEGORY, erase(f));
        self
    }
}

impl Configure for Projector {
    fn spec(&mut self) -> &mut Spec {
        &mut self.0
    }
}

/// Handles the commands of aggregate `A`. All command handlers of one aggregate share the
/// `commands:{category}` subscription.
#[derive(Debug)]
pub struct CommandHandler<A>(Spec, PhantomData<fn() -> A>);

impl<A: crate::Aggregate> CommandHandler<A> {
    /// A command handler named `name` for aggregate `A`.
    pub fn new(name: &str) -> Self {
        Self(Spec::new(name), PhantomData)
    }

    /// Handle commands of type `C` with `f` (any form of [`EventFn`]).
    pub fn on<C: Command<Aggregate = A>, Form>(mut self, f: impl EventFn<C, Form>) -> Self {
        self.0.route::<C>(A::CATEGORY, erase(f));
        let target: Target =
            Box::new(|data, naming| Ok(naming.command_stream_of(&decode::<C>(data)?)));
        if let Some(route) = self.0.routes.last_mut() {
            route.target = Some(target);
        }
        // A command of `{category}:command-{id}` is most often handled by loading `{category}-{id}`.
        self.0.reads(Arc::new(|info, _| {
            let (category, id) = info.stream.split_once(":command-")?;
            Some(Read::Stream(format!("{category}-{id}")))
        }));
        self
    }
}

impl<A> Configure for CommandHandler<A> {
    fn spec(&mut self) -> &mut Spec {
        &mut self.0
    }
}

/// How a process-manager step changes the instance's life.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Continue,
    End,
}

/// The stored form of one process instance.
#[derive(Serialize, Deserialize)]
struct Instance<S> {
    state: S,
    ended: bool,
    /// The names of the timeouts its steps set and did not cancel (some may have fired): cancelled
    /// when it ends. Absent from instances stored before timeouts, and left out while empty, so an
    /// instance without timeouts is stored as it always was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    timeouts: Vec<String>,
}

impl<S> Instance<S> {
    /// Note what a step did to the instance's timeouts.
    fn update_timeouts(&mut self, changes: Vec<(String, bool)>) {
        for (name, set) in changes {
            self.timeouts.retain(|t| *t != name);
            if set {
                self.timeouts.push(name);
            }
        }
    }
}

/// Coordinates a long-running flow across aggregates, one instance per value of its correlation field.
/// Its state `S` is stored as a document in the collection `pm::{name}`. Events for an instance that has
/// not started, or has ended, are skipped. One subscription spans all its categories, so it sees events
/// in the order they were stored.
#[derive(Debug)]
pub struct ProcessManager<S>(Spec, PhantomData<fn() -> S>);

impl<S> ProcessManager<S>
where
    S: Serialize + DeserializeOwned + Default + 'static,
{
    /// A process manager named `name`, correlating events by their field `correlate`.
    pub fn new(name: &str, correlate: &str) -> Self {
        let mut spec = Spec::new(name);
        spec.options.correlate = Some(correlate.to_owned());
        Self(spec, PhantomData)
    }

    /// `E` starts a new instance.
    pub fn start<E: Event, A>(self, f: impl StepFn<S, E, A>) -> Self {
        self.step(Phase::Start, f)
    }

    /// `E` moves a started instance along.
    pub fn on<E: Event, A>(self, f: impl StepFn<S, E, A>) -> Self {
        self.step(Phase::Continue, f)
    }

    /// `E` ends the instance; later events for it are skipped.
    pub fn end<E: Event, A>(self, f: impl StepFn<S, E, A>) -> Self {
        self.step(Phase::End, f)
    }

    fn step<E: Event, A>(mut self, phase: Phase, f: impl StepFn<S, E, A>) -> Self {
        let name = self.0.name.clone();
        let collection = format!("pm::{name}");
        let field = self.0.options.correlate.clone().unwrap_or_default();
        let call: Call = Box::new(move |data, ctx| {
            let key = correlation_value(data, &field)?;
            let stored: Option<Instance<S>> = ctx.get_raw(&collection, &key)?;
            let mut instance = match (stored, phase) {
                (Some(instance), _) if instance.ended => return Ok(()),
                (Some(instance), _) => instance,
                (None, Phase::Start) => Instance {
                    state: S::default(),
                    ended: false,
                    timeouts: Vec::new(),
                },
                (None, _) => return Ok(()),
            };
            let event = decode::<E>(data)?;
            let scope = Timeouts::new(ctx.naming(), &name, &key);
            let (result, scope) =
                ctx.in_instance(scope, |ctx| f.call(&mut instance.state, event, ctx));
            result?;
            instance.update_timeouts(scope.changes);
            if phase == Phase::End {
                let pending = std::mem::take(&mut instance.timeouts);
                ctx.in_instance(Timeouts::new(ctx.naming(), &name, &key), |ctx| {
                    ctx.cancel_timeouts(&pending)
                })
                .0?;
                instance.ended = true;
            }
            ctx.put_raw(&collection, &key, &instance)
        });
        self.0
            .route::<E>(<E::Aggregate as crate::Aggregate>::CATEGORY, call);
        let (collection, field) = (
            format!("pm::{}", self.0.name),
            self.0.options.correlate.clone(),
        );
        self.0.reads(Arc::new(move |_, data| {
            let id = correlation_value(data, field.as_deref().unwrap_or_default()).ok()?;
            let collection = collection.clone();
            Some(Read::Document { collection, id })
        }));
        self
    }
}

impl<S> Configure for ProcessManager<S> {
    fn spec(&mut self) -> &mut Spec {
        &mut self.0
    }
}

fn correlation_value(data: &[u8], field: &str) -> Result<String, HandlerError> {
    let value: serde_json::Value = serde_json::from_slice(data)
        .map_err(|e| HandlerError::reject(format!("cannot decode event: {e}")))?;
    match value.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(v @ serde_json::Value::Number(_)) => Ok(v.to_string()),
        _ => Err(HandlerError::reject(format!(
            "event has no correlation field {field:?}"
        ))),
    }
}

struct Resolved {
    registration: Registration,
    routes: HashMap<String, Call>,
    reads: HashMap<String, Vec<Reads>>,
}

impl Resolved {
    /// Tell the host what the calls of `batch` will read, when any of them knows in advance.
    fn prefetch(
        &self,
        batch: &[(MessageInfo<'_>, &[u8])],
        naming: &Naming,
        services: &dyn HostServices,
    ) {
        if self.reads.is_empty() {
            return;
        }
        let (mut documents, mut streams, mut finds) = (Vec::new(), Vec::new(), Vec::new());
        for (info, data) in batch {
            let reads = self.reads.get(info.message_type).into_iter().flatten();
            for read in reads.filter_map(|r| r(info, data)) {
                match read {
                    Read::Document { collection, id } => documents.push((collection, id)),
                    Read::Stream(stream) => streams.push(stream),
                    Read::Aggregate { category, id } => {
                        streams.push(naming.stream_in(category, &id))
                    }
                    Read::Find {
                        collection,
                        field,
                        value,
                    } => finds.push((collection, field, value)),
                }
            }
        }
        if documents.is_empty() && streams.is_empty() && finds.is_empty() {
            return;
        }
        let documents: Vec<(&str, &str)> = documents
            .iter()
            .map(|(c, i)| (c.as_str(), i.as_str()))
            .collect();
        let streams: Vec<&str> = streams.iter().map(String::as_str).collect();
        let finds: Vec<(&str, &str, &str)> = finds
            .iter()
            .map(|(c, f, v)| (*c, f.as_str(), v.as_str()))
            .collect();
        services.prefetch(&documents, &streams, &finds);
    }
}

/// Where commands of one type go.
struct CommandTarget {
    target: Target,
}

/// A domain: a name and its handlers. Build one with [`Domain::new`] and the handler methods, and export it
/// with [`crate::export_domains`].
pub struct Domain {
    naming: Arc<Naming>,
    handlers: Vec<Resolved>,
    by_name: HashMap<String, usize>,
    commands: HashMap<String, CommandTarget>,
    errors: Vec<String>,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("naming", &self.naming)
            .field("handlers", &self.by_name.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Domain {
    /// A domain named `name`: `"Fulfilment"` gives types `Fulfilment.X.v1` and categories `fulfilment::x`.
    pub fn new(name: &str) -> Self {
        Self {
            naming: Arc::new(Naming::new(name)),
            handlers: Vec::new(),
            by_name: HashMap::new(),
            commands: HashMap::new(),
            errors: Vec::new(),
        }
    }

    /// Add an event handler.
    pub fn event_handler(self, handler: EventHandler) -> Self {
        self.add(HandlerKind::EVENT_HANDLER, handler.0)
    }

    /// Add a projector.
    pub fn projector(self, projector: Projector) -> Self {
        self.add(HandlerKind::PROJECTOR, projector.0)
    }

    /// Add a command handler.
    pub fn command_handler<A: crate::Aggregate>(self, handler: CommandHandler<A>) -> Self {
        self.add(HandlerKind::COMMAND_HANDLER, handler.0)
    }

    /// Add a process manager.
    pub fn process_manager<S>(self, manager: ProcessManager<S>) -> Self {
        self.add(HandlerKind::PROCESS_MANAGER, manager.0)
    }

    /// The domain's naming rules.
    pub fn naming(&self) -> &Naming {
        &self.naming
    }

    /// Every handler, in the order they were added (for the host).
    #[doc(hidden)]
    pub fn registrations(&self) -> Vec<Registration> {
        self.handlers
            .iter()
            .map(|h| h.registration.clone())
            .collect()
    }

    /// Problems found while building the domain (duplicate names, empty handlers); the host refuses to
    /// load a domain that has any.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    fn add(mut self, kind: HandlerKind, spec: Spec) -> Self {
        if self.by_name.contains_key(&spec.name) {
            self.errors.push(format!(
                "two handlers are named {:?}; handler names must be unique",
                spec.name
            ));
            return self;
        }
        if spec.routes.is_empty() {
            self.errors.push(format!(
                "handler {:?} handles no message type; add one with .on(..)",
                spec.name
            ));
            return self;
        }
        let naming = Arc::clone(&self.naming);
        let mut categories: Vec<String> = Vec::new();
        let mut routes = HashMap::new();
        let mut reads = HashMap::new();
        let reads_declared = spec.reads_declared;
        for route in spec.routes {
            let category = format!("{}::{}", naming.normalized(), route.category);
            let category = if kind == HandlerKind::COMMAND_HANDLER {
                format!("{category}:command")
            } else {
                category
            };
            if !categories.contains(&category) {
                categories.push(category);
            }
            let message_type = naming.type_name(route.class, route.version);
            if let Some(target) = route.target {
                self.commands
                    .insert(message_type.clone(), CommandTarget { target });
            }
            let route_reads: Vec<Reads> = route
                .reads
                .into_iter()
                .chain(reads_declared.iter().cloned())
                .collect();
            if !route_reads.is_empty() {
                reads.insert(message_type.clone(), route_reads);
            }
            routes.insert(message_type, route.call);
        }
        let mut message_types: Vec<String> = routes.keys().cloned().collect();
        message_types.sort();
        self.by_name.insert(spec.name.clone(), self.handlers.len());
        self.handlers.push(Resolved {
            registration: Registration {
                name: spec.name,
                kind,
                categories,
                message_types,
                options: spec.options,
            },
            routes,
            reads,
        });
        self
    }

    /// The command stream of a command of `message_type` with `data`, checking that the data decodes
    /// (for the host's `send`).
    #[doc(hidden)]
    pub fn command_stream(&self, message_type: &str, data: &[u8]) -> Result<String, HandlerError> {
        let Some(command) = self.commands.get(message_type) else {
            let mut known: Vec<&str> = self.commands.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(HandlerError::reject(format!(
                "no command handler handles {message_type}; commands of this domain: {}",
                known.join(", ")
            )));
        };
        (command.target)(data, &self.naming)
    }

    /// Handle a batch with handler `name`, stopping at the first failure. Panics become failures.
    pub(crate) fn handle_batch(
        &self,
        name: &str,
        batch: &[(MessageInfo<'_>, &[u8])],
        services: &dyn HostServices,
    ) -> (u32, Option<HandlerError>) {
        let Some(handler) = self.by_name.get(name).map(|&i| &self.handlers[i]) else {
            return (
                0,
                Some(HandlerError::reject(format!(
                    "this domain has no handler named {name:?}"
                ))),
            );
        };
        // One message alone gains nothing from a read ahead.
        if batch.len() > 1 {
            handler.prefetch(batch, &self.naming, services);
        }
        for (index, (info, data)) in batch.iter().enumerate() {
            let index = index as u32;
            // The host routes by type; an unknown one here is a routing bug, so it is skipped, not failed.
            let Some(call) = handler.routes.get(info.message_type) else {
                continue;
            };
            let mut ctx = Context::new(services, &self.naming, index, *info);
            let result = panic::catch(|| call(data, &mut ctx)).unwrap_or_else(|panic| {
                Err(HandlerError::retry(format!("handler panicked: {panic}")))
            });
            if let Err(error) = result {
                return (index, Some(error));
            }
        }
        (batch.len() as u32, None)
    }
}

#[cfg(test)]
mod tests {
    use super::Instance;

    #[test]
    fn an_instance_stored_before_timeouts_loads_and_one_without_timeouts_is_stored_as_before() {
        let stored = r#"{"state":3,"ended":false}"#;
        let instance: Instance<u32> = serde_json::from_str(stored).unwrap();
        assert!(instance.timeouts.is_empty());
        assert_eq!(serde_json::to_string(&instance).unwrap(), stored);
        let mut timed = instance;
        timed.update_timeouts(vec![
            ("late".into(), true),
            ("early".into(), true),
            ("late".into(), false),
            ("late".into(), true),
        ]);
        assert_eq!(timed.timeouts, ["early", "late"]);
        assert_eq!(
            serde_json::to_string(&timed).unwrap(),
            r#"{"state":3,"ended":false,"timeouts":["early","late"]}"#
        );
    }
}

#[cfg(test)]
mod reads_tests {
    use std::cell::RefCell;

    use serde::{Deserialize, Serialize};

    use super::{Domain, EventHandler, ProcessManager};
    use crate::{
        context::{HostServices, MessageInfo},
        prelude::*,
    };

    #[derive(Debug, Default, Aggregate)]
    struct Order;

    #[derive(Serialize, Deserialize, Event)]
    #[event(aggregate = Order)]
    struct Paid {
        order_id: String,
    }

    #[derive(Serialize, Deserialize, Document)]
    #[document(collection = "summaries", id = order_id)]
    struct Summary {
        order_id: String,
    }

    #[derive(Default, Serialize, Deserialize)]
    struct Flow {
        paid: bool,
    }

    fn paid(flow: &mut Flow, _: Paid) {
        flow.paid = true;
    }

    /// Answers every read with nothing and records the hints.
    #[derive(Default)]
    struct Hints(RefCell<Vec<String>>);

    impl HostServices for Hints {
        fn raise_event(
            &self,
            _: u32,
            _: &str,
            _: &str,
            _: &[u8],
            _: Option<i64>,
        ) -> Result<(), String> {
            Ok(())
        }
        fn send_command(&self, _: u32, _: &str, _: &str, _: &[u8]) -> Result<(), String> {
            Ok(())
        }
        fn read_stream(&self, _: &str, _: u64) -> Result<Vec<u8>, String> {
            Ok(b"[]".to_vec())
        }
        fn get_document(&self, _: &str, _: &str) -> Result<Option<Vec<u8>>, String> {
            Ok(None)
        }
        fn put_document(&self, _: u32, _: &str, _: &str, _: &[u8]) -> Result<(), String> {
            Ok(())
        }
        fn delete_document(&self, _: u32, _: &str, _: &str) -> Result<(), String> {
            Ok(())
        }
        fn find_documents(&self, _: &str, _: &str, _: &[u8]) -> Result<Vec<u8>, String> {
            Ok(b"[]".to_vec())
        }
        fn prefetch(
            &self,
            documents: &[(&str, &str)],
            streams: &[&str],
            finds: &[(&str, &str, &str)],
        ) {
            let documents = documents.iter().map(|(c, id)| format!("{c}/{id}"));
            let streams = streams.iter().map(|s| s.to_string());
            let finds = finds.iter().map(|(c, f, v)| format!("{c}?{f}={v}"));
            self.0
                .borrow_mut()
                .extend(documents.chain(streams).chain(finds));
        }
    }

    fn hints_of(domain: &Domain, handler: &str) -> Vec<String> {
        let data = [br#"{"order_id":"o1"}"#.as_slice(), br#"{"order_id":"o2"}"#];
        let info = |stream| MessageInfo {
            id: "id",
            stream,
            message_type: "Shop.Paid.v1",
            position: 0,
            global_position: 1,
            metadata: b"{}",
        };
        let batch = [
            (info("shop::order-o1"), data[0]),
            (info("shop::order-o2"), data[1]),
        ];
        let hints = Hints::default();
        let (handled, failure) = domain.handle_batch(handler, &batch, &hints);
        assert!(failure.is_none() && handled == 2, "{failure:?}");
        hints.0.into_inner()
    }

    #[test]
    fn a_handler_says_every_read_it_declared_and_its_routes_own() {
        let domain = Domain::new("Shop")
            .event_handler(
                EventHandler::new("notify")
                    .on(|_: Paid| {})
                    .reads_document::<Summary>("order_id")
                    .reads_aggregate::<Order>("order_id"),
            )
            .event_handler(
                EventHandler::new("charge")
                    .on(|_: Paid| {})
                    .finds::<Summary>("order", "order_id")
                    .finds::<Summary>("missing", "no_such_field"),
            )
            .process_manager(
                ProcessManager::<Flow>::new("flow", "order_id")
                    .start(paid)
                    .reads_aggregate::<Order>("order_id"),
            );
        assert_eq!(
            hints_of(&domain, "notify"),
            [
                "summaries/o1",
                "summaries/o2",
                "shop::order-o1",
                "shop::order-o2"
            ]
        );
        // A find by the message's field, its value as JSON; a message without the field, no hint.
        assert_eq!(
            hints_of(&domain, "charge"),
            [r#"summaries?order="o1""#, r#"summaries?order="o2""#]
        );
        // The instance (the route's own hint) and the declared aggregate.
        assert_eq!(
            hints_of(&domain, "flow"),
            [
                "pm::flow/o1",
                "pm::flow/o2",
                "shop::order-o1",
                "shop::order-o2"
            ]
        );
    }
}
