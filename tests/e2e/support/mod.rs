//! Builds what the tests need once per test process, and runs the real binary.

mod build;
mod engine;
mod flow;
mod postgres;
mod redis;
mod replicas;
mod run;
mod server;

pub use build::{fixture_domain, host_binary, incompatible_sample, sample_domain, Incompatibility};
pub use engine::{backends, engine, postgres, types, TEST_CONFIG};
pub use flow::{count_of, each_order_exactly_once};
pub use postgres::PgServer;
pub use redis::RedisServer;
pub use replicas::{place, send_orders, start_replicas, wait_until};
pub use run::host;
