//! The loss hunter on each store (see `support::hunt`): several replicas of the sample domain, other
//! writers, random kills, pauses and broker outages, then the stores' own contents checked against
//! every guarantee the README states. `scripts/soak` runs the same hunts larger and repeatedly.

use crate::support::hunt::{hunt, Scenario};

#[track_caller]
fn hunt_and_check(scenario: Scenario) {
    let report = hunt(scenario);
    eprintln!("{report}");
    assert!(report.violations.is_empty(), "{report}");
    assert!(
        report.kills + report.pauses + report.broker_outages > 0,
        "no fault was injected: nothing tested"
    );
}

#[test]
fn hunt_sqlite_replicas_with_concurrent_senders() {
    hunt_and_check(Scenario {
        name: "sqlite",
        postgres: false,
        redis: false,
        message_db_writer: false,
    });
}

#[test]
fn hunt_postgres_replicas_with_senders_and_a_message_db_writer() {
    hunt_and_check(Scenario {
        name: "postgres",
        postgres: true,
        redis: false,
        message_db_writer: true,
    });
}

#[test]
fn hunt_postgres_and_redis_replicas_through_broker_outages() {
    hunt_and_check(Scenario {
        name: "postgres+redis",
        postgres: true,
        redis: true,
        message_db_writer: false,
    });
}

#[test]
fn hunt_sqlite_and_redis_replicas_through_broker_outages() {
    hunt_and_check(Scenario {
        name: "sqlite+redis",
        postgres: false,
        redis: true,
        message_db_writer: false,
    });
}
