//! A domain's handlers played from a script, for unit tests of the engine: each message (named by
//! its data's `id`) does what the script says on each of its calls, in turn, and is handled once its
//! script is used up.
//!
//! Every call of a message first writes its effect: an event `Test.Done.v1` appended to
//! `done-{id}` at the version the handler read through the host (so a competing writer makes the
//! commit conflict), then acts. A failed message's effect must therefore be dropped by the engine.
//! The calls are recorded, to assert which messages were called together.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use protean_plugin_api::HandlerOptions;

use super::{
    CommandStreamError, Delivery, Failure, Handlers, HostServices, Kind, Outcome, Registration,
};

/// What one call of a message does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// Fail, retryably.
    Retry,
    /// Fail for good (a rejection).
    Reject,
    /// Never return: the worker process running the call died (isolated mode). Which message of the
    /// call did it is unknown, so none of the call counts as handled.
    Crash,
    /// Return as if handled everything before it, reporting no failure for it.
    Stop,
    /// Find documents by a field name the store refuses, and fail with its error, retryably (as the
    /// SDK reports every host error).
    BadRead,
}

/// The effect's message type.
pub(crate) const DONE: &str = "Test.Done.v1";

/// A hook run at each call of a message, with its id, before the message acts.
type Hook = Box<dyn Fn(&str) + Send + Sync>;

/// Handlers that follow a script. One handler of the kind, categories and types given.
pub(crate) struct Scripted {
    registrations: Vec<Registration>,
    script: Mutex<HashMap<String, VecDeque<Act>>>,
    calls: Mutex<Vec<Vec<String>>>,
    hook: Option<Hook>,
}

impl std::fmt::Debug for Scripted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scripted")
            .field("registrations", &self.registrations)
            .finish_non_exhaustive()
    }
}

impl Scripted {
    /// One handler `name` of `kind` over `categories`, handling `types`.
    pub(crate) fn new(name: &str, kind: Kind, categories: &[&str], types: &[&str]) -> Self {
        let registration = Registration {
            name: name.into(),
            kind,
            categories: categories.iter().map(|c| (*c).to_owned()).collect(),
            message_types: types.iter().map(|t| (*t).to_owned()).collect(),
            options: HandlerOptions::default(),
        };
        Self {
            registrations: vec![registration],
            script: Mutex::default(),
            calls: Mutex::default(),
            hook: None,
        }
    }

    /// The same handler, with `options`.
    pub(crate) fn options(mut self, options: HandlerOptions) -> Self {
        self.registrations[0].options = options;
        self
    }

    /// Message `id`'s next calls do `acts`, in turn; after them it is handled.
    pub(crate) fn script(self, id: &str, acts: &[Act]) -> Self {
        self.script
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default()
            .extend(acts);
        self
    }

    /// Run `hook` with the message's id at each call of a message, before it acts.
    pub(crate) fn hook(mut self, hook: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }

    /// The ids of each call's messages, in call order.
    pub(crate) fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().unwrap().clone()
    }

    /// Call message `index` of a call, of `id`: its effect, the hook, then its next act, if any.
    fn call(&self, index: usize, id: &str, host: &dyn HostServices) -> Option<Outcome> {
        if let Err(message) = write_effect(index, id, host) {
            return Some(Outcome {
                handled: index,
                failure: Some(failure(true, message)),
            });
        }
        if let Some(hook) = &self.hook {
            hook(id);
        }
        let act = self
            .script
            .lock()
            .unwrap()
            .get_mut(id)
            .and_then(VecDeque::pop_front)?;
        let (handled, failure) = match act {
            Act::Retry => (index, Some(failure(true, format!("{id} failed")))),
            Act::Reject => (index, Some(failure(false, format!("{id} rejected")))),
            Act::Crash => {
                let died = format!("the worker died handling {id}");
                let crashed = Failure {
                    crashed: true,
                    ..failure(true, died)
                };
                (0, Some(crashed))
            }
            Act::Stop => (index, None),
            Act::BadRead => {
                let error = host
                    .find_documents("docs", "not a field!", b"1")
                    .unwrap_err();
                (index, Some(failure(true, error)))
            }
        };
        Some(Outcome { handled, failure })
    }
}

fn failure(retryable: bool, message: String) -> Failure {
    Failure {
        retryable,
        message,
        crashed: false,
    }
}

/// Append `Test.Done.v1` to `done-{id}`, expecting the version read through `host`.
fn write_effect(index: usize, id: &str, host: &dyn HostServices) -> Result<(), String> {
    let stream = format!("done-{id}");
    let read = host.read_stream(&stream, 0)?;
    let events: Vec<serde_json::Value> =
        serde_json::from_slice(&read).map_err(|e| e.to_string())?;
    let expected = events.len() as i64 - 1;
    let data = serde_json::json!({ "id": id }).to_string();
    host.raise_event(index as u32, &stream, DONE, data.as_bytes(), Some(expected))
}

/// The `id` of each message `unit` appended (each is a handled message's effect).
pub(crate) fn effects(unit: &crate::unit_of_work::UnitOfWork) -> Vec<String> {
    unit.messages
        .iter()
        .map(|m| {
            assert_eq!(m.message_type, DONE);
            m.stream.trim_start_matches("done-").to_owned()
        })
        .collect()
}

/// The identities `unit` marked processed.
pub(crate) fn markers(unit: &crate::unit_of_work::UnitOfWork) -> Vec<String> {
    unit.processed
        .iter()
        .map(|p| p.message_id.clone())
        .collect()
}

/// The `id` of a message's data.
fn id_of(delivery: &Delivery<'_>) -> String {
    let data: serde_json::Value = serde_json::from_slice(delivery.data).unwrap_or_default();
    data["id"].as_str().unwrap_or_default().to_owned()
}

impl Handlers for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    fn build_id(&self) -> &str {
        "scripted"
    }

    fn registrations(&self) -> &[Registration] {
        &self.registrations
    }

    fn handle_batch(
        &self,
        _handler: &str,
        batch: &[Delivery<'_>],
        host: &dyn HostServices,
        _limit: std::time::Duration,
    ) -> Outcome {
        let ids: Vec<String> = batch.iter().map(id_of).collect();
        self.calls.lock().unwrap().push(ids.clone());
        for (index, id) in ids.iter().enumerate() {
            if let Some(outcome) = self.call(index, id, host) {
                return outcome;
            }
        }
        Outcome {
            handled: batch.len(),
            failure: None,
        }
    }

    fn command_stream(
        &self,
        message_type: &str,
        _data: &[u8],
    ) -> Result<String, CommandStreamError> {
        Err(CommandStreamError::NotACommand(format!(
            "{message_type} is not a command of the scripted domain"
        )))
    }
}
