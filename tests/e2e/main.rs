//! One integration test binary for the whole workspace (see `support` for how plugins and the binary
//! are built, and how servers are started).
#![allow(missing_docs, unreachable_pub)]

mod support;

mod cli;
mod compat;
mod crash;
mod discovery;
mod documents;
mod engine;
mod interop;
mod isolation;
mod limits;
mod live;
mod loading;
mod loss_hunter;
mod messagedb;
mod ops;
mod ordered;
mod ordered_store;
mod outbox;
mod postgres;
mod protean;
mod redis;
mod reload;
mod schedules;
mod schedules_cli;
mod security;
mod send;
mod server;
mod sqlite;
mod template;
