//! Event-sourced aggregates: state rebuilt by applying the events of their stream.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{error::HandlerError, message::Event};

/// An event-sourced aggregate. Its state is `Default` plus every event of its stream, applied in order.
///
/// Derive it: `#[derive(Default, Aggregate)] #[aggregate(category = "order", applies(OrderPlaced))]`
/// writes `apply`, which hands each stored event of a listed type, decoded, to the aggregate's
/// [`Apply`] impl for it and ignores the others.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an aggregate",
    note = "derive it: `#[derive(Default, Aggregate)] #[aggregate(applies(..))]`"
)]
pub trait Aggregate: Default + 'static {
    /// The aggregate's category within its domain, e.g. `"order"`.
    const CATEGORY: &'static str;

    /// Change the state by one stored event. Unknown event types should be ignored.
    fn apply(&mut self, event: &Recorded) -> Result<(), HandlerError>;
}

/// How aggregate `Self` changes by one event `E`. A derived [`Aggregate`] calls it for every stored `E`
/// of its stream, in order.
///
/// ```
/// # use protean_plugin_api::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// #[derive(Default, Aggregate)]
/// #[aggregate(category = "account", applies(Deposited))]
/// struct Account { balance: i64 }
///
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(aggregate = Account)]
/// struct Deposited { amount: i64 }
///
/// impl Apply<Deposited> for Account {
///     fn apply(&mut self, event: Deposited) {
///         self.balance += event.amount;
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "aggregate `{Self}` applies `{E}` but has no `Apply<{E}>` impl",
    label = "listed in `#[aggregate(applies(..))]`",
    note = "add `impl Apply<{E}> for {Self} {{ fn apply(&mut self, event: {E}) {{ .. }} }}`"
)]
pub trait Apply<E: Event> {
    /// Change the state by one event of type `E`.
    fn apply(&mut self, event: E);
}

/// One stored event, as an aggregate sees it while being loaded.
#[derive(Debug, Deserialize)]
pub struct Recorded {
    #[serde(rename = "type")]
    message_type: String,
    position: u64,
    data: Box<RawValue>,
}

impl Recorded {
    /// The full type name (`Fulfilment.OrderPlaced.v1`).
    pub fn message_type(&self) -> &str {
        &self.message_type
    }

    /// The event's position in its stream (0-based).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Whether the event is an `E` (by class name and version).
    pub fn is<E: Event>(&self) -> bool {
        let Some((rest, version)) = self.message_type.rsplit_once(".v") else {
            return false;
        };
        let class = rest.rsplit_once('.').map_or(rest, |(_, class)| class);
        class == E::NAME && version.parse() == Ok(E::VERSION)
    }

    /// The event as an `E`, or `None` if it is another type.
    pub fn decode<E: Event>(&self) -> Result<Option<E>, HandlerError> {
        if !self.is::<E>() {
            return Ok(None);
        }
        serde_json::from_str(self.data.get())
            .map(Some)
            .map_err(|e| {
                HandlerError::reject(format!("cannot decode stored {}: {e}", self.message_type))
            })
    }
}
