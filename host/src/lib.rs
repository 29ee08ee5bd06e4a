//! protean-host: runs the handlers of a Protean domain written in Rust and loaded as a plugin.
//!
//! The path of one message: a subscription reads a batch (from the event store by category, or from a
//! broker stream), the engine routes each message to its handler and calls the plugin on a blocking
//! thread, the plugin's writes are buffered, and the engine commits them with the processed markers and the
//! new position as one unit of work. See `DESIGN.md` and the README for the whole picture.

// Every module opens with its concept and invariant; field-level docs are required only in plugin-api,
// whose items are the authoring surface.
#![allow(missing_docs)]

pub mod broker;
pub mod clock;
pub mod config;
pub mod engine;
pub mod inspect;
pub mod message;
pub mod ops;
pub(crate) mod ordering;
pub(crate) mod outbox;
pub mod ownership;
pub mod plugin;
pub mod redact;
pub mod reload;
pub mod store;
pub mod subscription;
pub(crate) mod sync;
pub mod template;
pub mod unit_of_work;

// The store tests share the end-to-end tests' PostgreSQL helper, which names this crate by its name.
#[cfg(test)]
extern crate self as protean_host;
