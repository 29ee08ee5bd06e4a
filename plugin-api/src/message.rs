//! Commands and events: serde types with Protean's names.
//!
//! A message's full type name is `{Domain}.{NAME}.v{VERSION}` (`Fulfilment.OrderPlaced.v1`), its category
//! `{domain}::{aggregate category}` (`fulfilment::order`), its stream `{category}-{id}`, and a command's
//! stream `{category}:command-{id}`: exactly Protean's, so Python and Rust services can share a store.

use serde::{de::DeserializeOwned, Serialize};

use crate::aggregate::Aggregate;

/// Anything that travels as a message. Deriving [`Event`](crate::Event) or
/// [`Command`](crate::Command) implements it too.
pub trait Message: Serialize + DeserializeOwned + 'static {
    /// The class name, e.g. `"OrderPlaced"`.
    const NAME: &'static str;
    /// The schema version; part of the type name.
    const VERSION: u32 = 1;
}

/// A fact that happened to an aggregate. Derive it: `#[derive(Event)] #[event(aggregate = Order)]`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an event",
    note = "derive it: `#[derive(Serialize, Deserialize, Event)] #[event(aggregate = Order)]`",
    note = "a handler takes its event by value: `fn(event: E, ctx: &mut Context) -> HandlerResult`"
)]
pub trait Event: Message {
    /// The aggregate whose stream the event is stored in.
    type Aggregate: Aggregate;
}

/// An intention addressed to an aggregate. Derive it:
/// `#[derive(Command)] #[command(aggregate = Order, target = order_id)]`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a command",
    note = "derive it: `#[derive(Serialize, Deserialize, Command)] #[command(aggregate = Order, target = order_id)]`",
    note = "a handler takes its command by value: `fn(command: C, ctx: &mut Context) -> HandlerResult`"
)]
pub trait Command: Message {
    /// The aggregate that handles the command.
    type Aggregate: Aggregate;
    /// The identity of the target aggregate; names the command stream.
    fn target_id(&self) -> String;
}

/// The names a domain gives to its messages and streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    camel: String,
    normalized: String,
}

impl Naming {
    /// Names for a domain called `name` (`"Fulfilment"` or `"OrderFulfilment"`).
    pub fn new(name: &str) -> Self {
        Self {
            camel: camel_case(name),
            normalized: snake_case(name),
        }
    }

    /// The domain name as used in type names (`Fulfilment`).
    pub fn camel(&self) -> &str {
        &self.camel
    }

    /// The domain name as used in categories (`fulfilment`).
    pub fn normalized(&self) -> &str {
        &self.normalized
    }

    /// `{Domain}.{Class}.v{N}`.
    pub fn type_name(&self, class: &str, version: u32) -> String {
        format!("{}.{class}.v{version}", self.camel)
    }

    /// The full type name of message `M`.
    pub fn type_of<M: Message>(&self) -> String {
        self.type_name(M::NAME, M::VERSION)
    }

    /// `{domain}::{aggregate category}`.
    pub fn category_of<A: Aggregate>(&self) -> String {
        format!("{}::{}", self.normalized, A::CATEGORY)
    }

    /// `{category}-{id}`.
    pub fn stream_of<A: Aggregate>(&self, id: &str) -> String {
        self.stream_in(A::CATEGORY, id)
    }

    /// `{domain}::{category}-{id}`: the stream of the aggregate of `category` (its `CATEGORY`) with `id`.
    pub(crate) fn stream_in(&self, category: &str, id: &str) -> String {
        format!("{}::{category}-{id}", self.normalized)
    }

    /// `{category}:command-{id}`.
    pub fn command_stream_of<C: Command>(&self, command: &C) -> String {
        format!(
            "{}:command-{}",
            self.category_of::<C::Aggregate>(),
            command.target_id()
        )
    }
}

/// The category of a stream: the text before the first `-` (Protean's rule).
pub fn category_of_stream(stream: &str) -> &str {
    stream
        .split_once('-')
        .map_or(stream, |(category, _)| category)
}

fn camel_case(name: &str) -> String {
    name.split(['_', ' ', '-'])
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_uppercase().chain(chars).collect()
            })
        })
        .collect()
}

fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, ch) in name.chars().enumerate() {
        if ch.is_uppercase() {
            if i > 0 && !out.ends_with('_') {
                out.push('_');
            }
            out.extend(ch.to_lowercase());
        } else if ch == ' ' || ch == '-' {
            out.push('_');
        } else {
            out.push(ch);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_protean() {
        let naming = Naming::new("OrderFulfilment");
        assert_eq!(naming.camel(), "OrderFulfilment");
        assert_eq!(naming.normalized(), "order_fulfilment");
        assert_eq!(
            naming.type_name("OrderPlaced", 2),
            "OrderFulfilment.OrderPlaced.v2"
        );
        let snake = Naming::new("order_fulfilment");
        assert_eq!(snake.camel(), "OrderFulfilment");
        assert_eq!(snake.normalized(), "order_fulfilment");
    }

    #[test]
    fn category_is_text_before_first_dash() {
        assert_eq!(
            category_of_stream("fulfilment::order-42-a"),
            "fulfilment::order"
        );
        assert_eq!(
            category_of_stream("fulfilment::order:command-7"),
            "fulfilment::order:command"
        );
        assert_eq!(category_of_stream("nodash"), "nodash");
    }
}
