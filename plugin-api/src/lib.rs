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
//! #[derive(Default)]
//! pub struct Account { balance: i64 }
//!
//! impl Aggregate for Account {
//!     const CATEGORY: &'static str = "account";
//!     fn apply(&mut self, event: &Recorded) -> Result<(), HandlerError> {
//!         if let Some(deposited) = event.decode::<Deposited>()? {
//!             self.balance += deposited.amount;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! // A command (type `Bank.Deposit.v1`, stream `bank::account:command-{id}`) ...
//! #[derive(Serialize, Deserialize)]
//! pub struct Deposit { account: String, amount: i64 }
//! impl Message for Deposit { const NAME: &'static str = "Deposit"; }
//! impl Command for Deposit {
//!     type Aggregate = Account;
//!     fn target_id(&self) -> String { self.account.clone() }
//! }
//!
//! // ... and the event it causes (stream `bank::account-{id}`).
//! #[derive(Serialize, Deserialize)]
//! pub struct Deposited { account: String, amount: i64 }
//! impl Message for Deposited { const NAME: &'static str = "Deposited"; }
//! impl Event for Deposited { type Aggregate = Account; }
//!
//! // A read model.
//! #[derive(Serialize, Deserialize)]
//! pub struct Balance { account: String, balance: i64 }
//! impl Document for Balance {
//!     const COLLECTION: &'static str = "balances";
//!     fn id(&self) -> String { self.account.clone() }
//! }
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
//! The four kinds of handler, and the subscriptions the host creates for them:
//!
//! | builder | reacts to | subscription |
//! |---|---|---|
//! | [`CommandHandler`] | commands of one aggregate | `commands:{category}`, shared by the aggregate's command handlers |
//! | [`EventHandler`] | events | one per handler, over all its categories |
//! | [`Projector`] | events, writing documents | one per category |
//! | [`ProcessManager`] | events correlated by a field, with a start and an end | one over all its categories |
//!
//! Handlers are synchronous: the host calls them on a blocking thread, in batches. Never start an async
//! runtime inside a handler. Log with the [`log`] crate's macros: the lines arrive in the host's logs with
//! the plugin as their source. A panic in a handler is caught and treated as a retryable failure.

#[allow(unsafe_code)]
pub mod abi;
mod aggregate;
mod context;
mod domain;
mod error;
#[doc(hidden)]
pub mod export;
mod message;
mod panic;
pub mod testing;

pub use aggregate::{Aggregate, Recorded};
pub use context::{Context, Document, HostServices, MessageInfo};
pub use domain::{
    AfterDeadLetter, CommandHandler, Configure, Domain, EventFn, EventHandler, HandlerOptions,
    ProcessManager, Projector, Registration, StepFn, STREAM_KEY,
};
pub use error::{HandlerError, HandlerResult};
pub use log;
pub use message::{category_of_stream, Command, Event, Message, Naming};

/// Everything a domain author needs, in one import.
pub mod prelude {
    pub use crate::{
        AfterDeadLetter, Aggregate, Command, CommandHandler, Configure, Context, Document, Domain,
        Event, EventHandler, HandlerError, HandlerResult, Message, ProcessManager, Projector,
        Recorded,
    };
    pub use log;
}
