//! Operations: what operators and their tools see of a running engine, and of a domain at rest.
//!
//! - [`status`]: each subscription's position or group, lag, pending entries, dead letters, consumers
//!   and state, measured through the store and broker traits (`protean-host subscriptions status`, the
//!   body of `/readyz`, the gauges of `/metrics`);
//! - [`metrics`]: the Prometheus registry; counters are recorded where the engine already counts (after
//!   each batch, after each outbox round), gauges are set from a status snapshot at scrape time;
//! - [`health`]: the HTTP server (`/healthz`, `/livez`, `/readyz`, `/metrics`) and the stall check;
//! - [`probe`]: the client side of `protean-host health`, for container probes;
//! - [`schedules`]: what `protean-host schedules` shows, and its cancel.
//!
//! Invariant: nothing here changes what the engine does; a scrape or a probe only reads. The one write
//! is an operator's `schedules cancel`, which a handler could make as well.

pub mod health;
pub(crate) mod metrics;
pub mod probe;
pub mod schedules;
pub mod status;
