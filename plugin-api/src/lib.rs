//! Write a domain for `protean-host` in plain Rust.
//!
//! A domain is a Rust `cdylib` that declares its messages as serde types, its aggregates as state rebuilt
//! from events, and its handlers as plain functions; [`export_domains!`] makes it loadable by
//! `protean-host --domain=libmy_domain.so`. The host runs the handlers against subscriptions and commits
//! what each call produced (events, commands, documents) as one unit of work.
//!
//! A complete small domain (the whole `src/lib.rs` of a `cdylib` crate):
//!
//! ```
//! use protean_plugin_api::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! // An event-sourced aggregate: state rebuilt from its events.
//! #[derive(Default, Aggregate)]
//! #[aggregate(category = "account", applies(Deposited))]
//! pub struct Account { balance: i64 }
//!
//! impl Apply<Deposited> for Account {
//!     fn apply(&mut self, event: Deposited) { self.balance += event.amount; }
//! }
//!
//! // A command (type `Bank.Deposit.v1`, stream `bank::account:command-{id}`) ...
//! #[derive(Serialize, Deserialize, Command)]
//! #[command(aggregate = Account, target = account)]
//! pub struct Deposit { account: String, amount: i64 }
//!
//! // ... and the event it causes (stream `bank::account-{id}`).
//! #[derive(Serialize, Deserialize, Event)]
//! #[event(aggregate = Account)]
//! pub struct Deposited { account: String, amount: i64 }
//!
//! // A read model, stored in collection `balances` under its `account`.
//! #[derive(Serialize, Deserialize, Document)]
//! #[document(collection = "balances", id = account)]
//! pub struct Balance { account: String, balance: i64 }
//!
//! fn deposit(command: Deposit, ctx: &mut Context) -> HandlerResult {
//!     if command.amount <= 0 {
//!         return Err(HandlerError::reject("a deposit must be positive"));
//!     }
//!     ctx.load::<Account>(&command.account)?; // remembers the version: concurrent writers conflict
//!     ctx.raise(&command.account, &Deposited { account: command.account.clone(), amount: command.amount })
//! }
//!
//! fn project_balance(event: Deposited, ctx: &mut Context) -> HandlerResult {
//!     let before = ctx.get::<Balance>(&event.account)?.map_or(0, |b| b.balance);
//!     log::info!("account {} now holds {}", event.account, before + event.amount);
//!     ctx.put(&Balance { account: event.account, balance: before + event.amount })
//! }
//!
//! pub fn bank() -> Domain {
//!     Domain::new("Bank")
//!         .command_handler(CommandHandler::<Account>::new("accounts").on(deposit))
//!         .projector(Projector::new("balances").on(project_balance).max_retries(5))
//! }
//!
//! protean_plugin_api::export_domains! { "domain" => bank }
//!
//! // Handlers are testable in-process, without a `.so`:
//! # fn main() {
//! let host = protean_plugin_api::testing::TestHost::new(bank());
//! host.handle_command("accounts", &Deposit { account: "a1".into(), amount: 5 }).unwrap();
//! assert_eq!(host.events::<Account>("a1").len(), 1);
//! host.handle_event("balances", "a1", &Deposited { account: "a1".into(), amount: 5 }).unwrap();
//! assert_eq!(host.document::<Balance>("a1").unwrap().balance, 5);
//! assert!(host.handle_command("accounts", &Deposit { account: "a1".into(), amount: 0 }).is_err());
//! # }
//! ```
//!
//! The derives write the impls: [`Event`](derive@Event) and [`Command`](derive@Command) name the
//! message after its type (`name = "..."` and `version = N` override), [`Aggregate`](derive@Aggregate)
//! writes `apply` from its [`Apply`] impls, [`Document`](derive@Document) takes the id from a field.
//! Each trait can still be implemented by hand.
//!
//! The four kinds of handler, and the subscriptions the host creates for them:
//!
//! | builder | reacts to | subscription |
//! |---|---|---|
//! | [`CommandHandler`] | commands of one aggregate | `commands:{category}`, shared by the aggregate's command handlers |
//! | [`EventHandler`] | events | one per handler, over all its categories |
//! | [`Projector`] | events, writing documents | one per category |
//! | [`ProcessManager`] | events correlated by a field, with a start and an end | one over all its categories |
//!
//! A handler is a plain function that takes the message first, then what it needs: the [`Context`]
//! (to load, raise, send, read and write), the message's [`Metadata`], both (in either order) or
//! neither; it returns a [`HandlerResult`], any `Result<(), E>` whose error converts into a
//! [`HandlerError`], or nothing ([`EventFn`] lists the forms).
//!
//! Time is the host's: [`Context::now`] reads its clock, [`Context::schedule`] has a message appended
//! later (under a key that [`Context::cancel`] cancels and scheduling again resets), and a process
//! manager's steps set named timeouts of their instance ([`Context::set_timeout`]), cancelled when it
//! ends. [`testing::TestHost`] keeps a virtual clock that moves only when a test says so.
//!
//! Handlers are synchronous: the host calls them on a blocking thread, in batches. Never start an async
//! runtime inside a handler. Log with the [`log`] crate's macros: the lines arrive in the host's logs with
//! the plugin as their source. A panic in a handler is caught and treated as a retryable failure.

// The README's example domain, compiled and run as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct Readme;

// The binary interface: public for protean-host and `export_domains!`, hidden from authors.
#[allow(unsafe_code)]
#[doc(hidden)]
pub mod abi;
mod aggregate;
mod context;
mod domain;
mod error;
#[doc(hidden)]
pub mod export;
mod handler;
mod message;
mod panic;
pub mod testing;

pub use aggregate::{Aggregate, Apply, Recorded};
#[doc(hidden)]
pub use context::schedule_refusal;
pub use context::{
    Context, Document, Due, HostServices, MessageInfo, MessageKind, Schedule, ScheduledMessage,
    MAX_DUE_MS, MAX_SCHEDULE_KEY_BYTES,
};
pub use domain::{
    AfterDeadLetter, CommandHandler, Configure, Domain, EventHandler, HandlerOptions,
    ProcessManager, Projector, Registration, STREAM_KEY,
};
pub use error::{HandlerError, HandlerResult};
#[doc(hidden)]
pub use handler::{Args, Ctx};
pub use handler::{EventFn, IntoHandlerResult, Metadata, StepFn};
pub use log;
pub use message::{category_of_stream, Command, Event, Message, Naming};
pub use protean_plugin_api_derive::{Aggregate, Command, Document, Event, Message};

// The derives name this crate by its absolute path; this lets its own tests use them too.
extern crate self as protean_plugin_api;

/// Everything a domain author needs, in one import.
pub mod prelude {
    pub use crate::{
        AfterDeadLetter, Aggregate, Apply, Command, CommandHandler, Configure, Context, Document,
        Domain, Event, EventHandler, HandlerError, HandlerResult, Message, Metadata,
        ProcessManager, Projector, Recorded,
    };
    pub use log;
}
