//! Builds what the tests need once per test process, and runs the real binary.

mod build;
mod engine;
mod flow;
pub mod http;
pub mod hunt;
mod postgres;
mod redis;
mod replicas;
mod run;
pub mod sequencing;
mod server;
mod status;
mod tls;
mod wait;
mod watch;

pub use build::{
    bad_build, cargo, compat_build, fixture_domain, host_binary, incompatible_fixture,
    reload_fixture, sample_domain, workspace, BadBuild, CompatBuild, Incompatibility, ReloadBuild,
    OLDEST_PLUGIN_API,
};
pub use engine::{backends, engine, idle_runs, postgres, sqlite, ticked, types, TEST_CONFIG};
pub use flow::{count_of, each_order_exactly_once};
pub use postgres::PgServer;
pub use redis::RedisServer;
pub use replicas::{orders, place, send_orders, start_replicas, start_servers};
pub use run::{assert_probe_gone, host, Finished, HostCommand};
pub use server::Server;
pub use status::{status_json, subscription};
pub use tls::make_certificates;
pub use wait::wait_until;
pub use watch::Created;
