//! `protean-host schedules` with the real binary on a SQLite store: schedules committed through the
//! store's API are listed, inspected and cancelled; one already fired or not there is an error line and
//! exit 1; bad input is a usage error; `subscriptions status` counts what is pending and overdue.

use protean_host::{
    message::Kind,
    store::{schedules::FiredSchedule, ScheduleState, SqliteStore, Store},
    unit_of_work::{NewMessage, ScheduleWrite, UnitOfWork},
};
use serde_json::Value;

use crate::support::{host, host_binary, sample_domain, Finished};

/// Schedule a `Fulfilment.Remind.v1` command for `due_ms` under `key`; its id.
fn set(store: &dyn Store, key: &str, due_ms: i64) -> String {
    let data = serde_json::json!({"order": key});
    let message = NewMessage::new(
        Kind::Command,
        "fulfilment::order:command-1",
        "Fulfilment.Remind.v1",
        &data,
        None,
        None,
        None,
    );
    let id = message.id.clone();
    let unit = UnitOfWork {
        schedules: vec![ScheduleWrite::Set {
            key: key.into(),
            due_ms,
            message,
        }],
        ..UnitOfWork::default()
    };
    store.commit(&unit).unwrap();
    id
}

/// Fire the schedule of `key` as the scheduler does: its message appended in the same unit.
fn fire(store: &dyn Store, key: &str) {
    let schedule = store.schedules().get(key).unwrap().unwrap();
    let now = chrono::Utc::now();
    let unit = UnitOfWork {
        messages: vec![schedule.message(now)],
        fired: vec![FiredSchedule {
            key: key.into(),
            id: schedule.id,
            at_ms: now.timestamp_millis(),
        }],
        ..UnitOfWork::default()
    };
    store.commit(&unit).unwrap();
}

fn json(run: Finished) -> Value {
    serde_json::from_str(&run.expect_code(0).stdout()).unwrap()
}

fn keys(rows: &Value) -> Vec<&str> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect()
}

#[test]
fn schedules_are_listed_inspected_and_cancelled_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    std::fs::write(
        dir.path().join("protean.toml"),
        format!(
            "[store]\nprovider = \"sqlite\"\npath = \"{}\"\n[server.scheduler]\noverdue_after_ms = 60000\n",
            path.display()
        ),
    )
    .unwrap();
    let store = SqliteStore::open(&path).unwrap();
    // Built first, so that the times seeded are as far from now when the binary reads them.
    let domain = sample_domain().display().to_string();
    host_binary();
    let now = chrono::Utc::now().timestamp_millis();
    let remind = set(&store, "remind-1", now + 3_600_000);
    set(&store, "late-1", now - 7_200_000);
    set(&store, "fired-1", now - 10_800_000);
    fire(&store, "fired-1");
    let run = |args: &[&str]| host(dir.path()).args(args).output();

    let list = run(&["schedules", "list"]).expect_code(0).stdout();
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 5, "a header, 3 schedules, the counts: {list}");
    let rows: Vec<(&str, &str)> = lines[1..4]
        .iter()
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            (words[0], words[1])
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("fired-1", "fired"),
            ("late-1", "pending"),
            ("remind-1", "pending")
        ],
        "by due time: {list}"
    );
    assert!(lines[2].contains(" 2.0 h ago "), "{list}");
    assert!(
        lines[3].contains(" in 60 min ") || lines[3].contains(" in 59 min "),
        "{list}"
    );
    assert!(lines[3].ends_with(" Fulfilment.Remind.v1"), "{list}");
    assert_eq!(
        lines[4],
        "3 listed; schedules: 2 pending, 1 overdue (more than 60 s past due)"
    );
    let pending = json(run(&["schedules", "list", "--state", "pending", "--json"]));
    assert_eq!(keys(&pending), ["late-1", "remind-1"], "{pending}");
    assert_eq!(pending[1]["data"]["order"], "remind-1", "{pending}");
    let first = json(run(&["schedules", "list", "--limit", "1", "--json"]));
    assert_eq!(keys(&first), ["fired-1"], "{first}");

    let inspected = run(&["schedules", "inspect", "remind-1"])
        .expect_code(0)
        .stdout();
    assert!(inspected.contains("\nstate:    pending\n"), "{inspected}");
    assert!(
        inspected.contains("data:\n  {\n    \"order\": \"remind-1\"\n  }\n"),
        "{inspected}"
    );
    let view = json(run(&["schedules", "inspect", "remind-1", "--json"]));
    assert_eq!(view["id"], remind.as_str(), "{view}");
    assert_eq!(view["stream"], "fulfilment::order:command-1", "{view}");
    assert_eq!(view["due_ms"], now + 3_600_000, "{view}");
    assert_eq!(
        view["metadata"]["headers"]["type"], "Fulfilment.Remind.v1",
        "metadata as JSON, not JSON text: {view}"
    );

    let cancelled = run(&["schedules", "cancel", "remind-1"])
        .expect_code(0)
        .stdout();
    assert!(
        cancelled.starts_with(
            "cancelled schedule remind-1: its Fulfilment.Remind.v1 to fulfilment::order:command-1"
        ),
        "{cancelled}"
    );
    let stored = store.schedules().get("remind-1").unwrap().unwrap();
    assert_eq!(stored.state, ScheduleState::Cancelled);
    let again = run(&["schedules", "cancel", "remind-1"])
        .expect_code(0)
        .stdout();
    assert!(
        again.starts_with("schedule remind-1 was not pending: already cancelled at "),
        "{again}"
    );
    let fired = run(&["schedules", "cancel", "fired-1"]).expect_code(1);
    assert_eq!(fired.error_lines().len(), 1, "{}", fired.stderr());
    assert!(
        fired.error_lines()[0]
            .starts_with("error: schedule fired-1 was not pending: already fired at "),
        "{}",
        fired.stderr()
    );
    assert_eq!(
        store.schedules().get("fired-1").unwrap().unwrap().state,
        ScheduleState::Fired
    );
    for action in ["cancel", "inspect"] {
        let missing = run(&["schedules", action, "nope"]).expect_code(1);
        assert_eq!(
            missing.error_lines(),
            ["error: no schedule with key \"nope\"; list them with `protean-host schedules list`"],
            "{action}"
        );
    }

    let status = run(&["subscriptions", "status", "--domain", &domain]);
    assert!(
        status
            .stdout()
            .contains("\nschedules: 1 pending, 1 overdue (more than 60 s past due)\n"),
        "{}",
        status.stdout()
    );
    let status = json(run(&[
        "subscriptions",
        "status",
        "--json",
        "--domain",
        &domain,
    ]));
    assert_eq!(status["schedules"]["pending"], 1, "{status}");
    assert_eq!(status["schedules"]["overdue"], 1, "{status}");
    assert_eq!(status["schedules_overdue_after_ms"], 60_000, "{status}");
}

#[test]
fn bad_schedules_input_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["schedules", "list", "--state", "late"][..],
        &["schedules", "list", "--limit", "0"],
        &["schedules", "inspect"],
        &["schedules", "cancel"],
    ] {
        let run = host(dir.path()).args(args).output().expect_code(2);
        assert_eq!(run.error_lines().len(), 1, "{args:?}: {}", run.stderr());
    }
    std::fs::write(
        dir.path().join("protean.toml"),
        "[store]\nprovider = \"memory\"\n",
    )
    .unwrap();
    let run = host(dir.path())
        .args(["schedules", "list"])
        .output()
        .expect_code(1);
    assert_eq!(run.error_lines().len(), 1, "{}", run.stderr());
    assert!(
        run.error_lines()[0].starts_with("error: the memory store lives inside the server process"),
        "{}",
        run.stderr()
    );
}
