//! The seam between the engine and a domain: the calls the engine makes to the domain's handlers.
//!
//! The engine (batches, commands, generations) holds a domain only as `dyn Handlers`. A [`Plugin`]
//! is one, whether its library is mapped here or runs in worker processes; so is a domain linked into
//! this binary ([`Plugin::linked`], for tests that run the engine without building a library), and
//! so is any scripted stand-in a unit test needs.

use std::time::Duration;

use super::{Delivery, HostServices, LoadError, Outcome, Plugin, Registration};

/// Why a domain named no stream for a command.
#[derive(Debug, thiserror::Error)]
pub enum CommandStreamError {
    /// The domain's answer: the data is not a command of that type. Asking again answers the same.
    #[error("{0}")]
    NotACommand(String),
    /// No worker process could be started to ask (an isolated instance).
    #[error(transparent)]
    NoWorker(Box<LoadError>),
    /// The worker process asked died or ran out of time before it answered.
    #[error("{0}")]
    WorkerLost(String),
}

/// A domain's handlers, as the engine calls them.
pub(crate) trait Handlers: Send + Sync + std::fmt::Debug {
    /// The instance's name (`domain`, `reporting`, ...).
    fn name(&self) -> &str;

    /// Which build of the domain this is: carried by processed markers and dead letters.
    fn build_id(&self) -> &str;

    /// Every handler the domain registered; the engine plans its subscriptions from them.
    fn registrations(&self) -> &[Registration];

    /// Call `handler` with `batch`, its writes going to `host`. Blocking: run it on a blocking thread.
    /// `limit` is the handler's deadline (the engine also watches it, `engine::deadlines`).
    fn handle_batch(
        &self,
        handler: &str,
        batch: &[Delivery<'_>],
        host: &dyn HostServices,
        limit: Duration,
    ) -> Outcome;

    /// The stream a command of `message_type` with `data` goes to; an error says why `data` is not
    /// such a command.
    fn command_stream(&self, message_type: &str, data: &[u8])
        -> Result<String, CommandStreamError>;

    /// Whether calls run in worker processes, so that a call that crashes costs only itself
    /// (`engine::turns`); a domain in this process takes every call in flight down with it.
    fn isolated(&self) -> bool {
        false
    }
}

impl Handlers for Plugin {
    fn name(&self) -> &str {
        Plugin::name(self)
    }

    fn build_id(&self) -> &str {
        Plugin::build_id(self)
    }

    fn registrations(&self) -> &[Registration] {
        Plugin::registrations(self)
    }

    fn handle_batch(
        &self,
        handler: &str,
        batch: &[Delivery<'_>],
        host: &dyn HostServices,
        limit: Duration,
    ) -> Outcome {
        Plugin::handle_batch(self, handler, batch, host, limit)
    }

    fn command_stream(
        &self,
        message_type: &str,
        data: &[u8],
    ) -> Result<String, CommandStreamError> {
        Plugin::command_stream(self, message_type, data)
    }

    fn isolated(&self) -> bool {
        Plugin::isolated(self)
    }
}
