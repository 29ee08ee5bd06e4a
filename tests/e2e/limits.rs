//! `server.max_message_bytes` on every way in: `send` refuses a command over it before anything is
//! stored; a message over it that another writer put in the store or on Redis is dead-lettered with
//! the reason, unhandled, while the rest of its batch goes on; a handler's write over it fails that
//! message for good and nothing it wrote is committed.

use std::{path::Path, sync::Arc};

use protean_host::{
    engine::{Outcome, Replay, RunReport},
    message::{wire_json, Kind},
    store::{Store, StoredMessage},
    unit_of_work::{NewMessage, UnitOfWork},
};
use serde_json::{json, Value};

use crate::support::{backends, engine, fixture_domain, host, sqlite, RedisServer, TEST_CONFIG};

/// The smallest limit allowed, so that the tests' large messages stay small.
const LIMIT: &str = "max_message_bytes = 4096\n";

const COMMANDS: &str = "probe::probe:command";

fn config() -> String {
    // TEST_CONFIG ends in its [server] table.
    format!("{TEST_CONFIG}{LIMIT}")
}

fn run_command(id: &str, behaviour: &str, pad: usize) -> Value {
    json!({ "id": id, "behaviour": behaviour, "pad": "x".repeat(pad) })
}

fn command(id: &str, pad: usize) -> NewMessage {
    NewMessage::new(
        Kind::Command,
        &format!("{COMMANDS}-{id}"),
        "Probe.Run.v1",
        &run_command(id, "ok", pad),
        None,
        None,
        None,
    )
}

fn ran(store: &dyn Store, id: &str) -> Vec<String> {
    store
        .read_stream(&format!("probe::probe-{id}"), 0)
        .unwrap()
        .into_iter()
        .map(|m| m.message_type)
        .collect()
}

fn commands(store: &dyn Store) -> Vec<StoredMessage> {
    store
        .read_categories(&[COMMANDS.into()], 0, usize::MAX)
        .unwrap()
}

fn send(dir: &Path, data: &str) -> crate::support::Finished {
    let lib = format!("{}:probe", fixture_domain().display());
    host(dir)
        .args(["send", "--domain", &lib, "Probe.Run.v1", data])
        .output()
}

#[test]
fn send_refuses_a_command_over_the_limit_in_one_line_and_stores_nothing() {
    let lib = format!("{}:probe", fixture_domain().display());
    // The default limit, 1 MiB: a 2 MB line on stdin is refused without being read whole.
    let dir = tempfile::tempdir().unwrap();
    let line = run_command("huge", "ok", 2_000_000).to_string();
    let refused = host(dir.path())
        .args(["send", "--domain", &lib, "Probe.Run.v1", "-"])
        .output_with_stdin(&format!("{line}\n"))
        .expect_code(65);
    let errors = refused.error_lines();
    assert_eq!(errors.len(), 1, "{}", refused.stderr());
    assert_eq!(
        errors[0],
        format!("error: stdin line 1: the command data is {} bytes, over server.max_message_bytes = 1048576; nothing was stored; send less data, or raise the limit in the config file (for every replica)", line.len())
    );
    assert!(commands(sqlite(dir.path()).as_ref()).is_empty());

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("[server]\n{LIMIT}"),
    )
    .unwrap();
    // Data under the limit, but not with the metadata every message carries.
    let data = run_command("edge", "ok", 3900).to_string();
    assert!(data.len() < 4096);
    let refused = send(dir.path(), &data).expect_code(65);
    assert_eq!(refused.error_lines().len(), 1, "{}", refused.stderr());
    let error = &refused.error_lines()[0];
    assert!(
        error.starts_with("error: command Probe.Run.v1 with its metadata is ")
            && error.contains(" bytes, over server.max_message_bytes = 4096; nothing was stored"),
        "{error}"
    );
    assert!(refused.stdout().is_empty());
    let store = sqlite(dir.path());
    assert!(commands(store.as_ref()).is_empty(), "nothing stored");
    // A command under the limit is stored as ever.
    send(dir.path(), &run_command("small", "ok", 10).to_string()).expect_code(0);
    assert_eq!(commands(store.as_ref()).len(), 1);
}

#[test]
fn a_bad_limit_is_refused_in_one_line() {
    let lib = format!("{}:probe", fixture_domain().display());
    for (value, expected) in [
        ("1", "error: config file protean.toml: server.max_message_bytes: 1 is below 4096; the value is in bytes (1 MiB = 1048576)"),
        ("\"1MB\"", "error: config file protean.toml: server.max_message_bytes: invalid type: string \"1MB\", expected u64"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("protean.toml"),
            format!("[server]\nmax_message_bytes = {value}\n"),
        )
        .unwrap();
        let run = host(dir.path())
            .args(["--test-mode", "--domain", &lib])
            .output()
            .expect_code(1);
        assert_eq!(run.stderr().lines().count(), 1, "{}", run.stderr());
        assert_eq!(run.error_lines()[0], expected);
    }
}

#[test]
fn a_message_over_the_limit_in_the_store_is_dead_lettered_unhandled_and_the_batch_goes_on() {
    for (backend, store, _keep) in backends() {
        // Another writer, which knows no limit, appends a large command between two small ones.
        let big = command("big", 10_000);
        let big_id = big.id.clone();
        store
            .commit(&UnitOfWork {
                messages: vec![command("a", 0), big, command("b", 0)],
                ..UnitOfWork::default()
            })
            .unwrap();
        let report = engine(fixture_domain(), "probe", store.clone(), &config())
            .run()
            .unwrap();
        assert_eq!(report.outcome, Outcome::Quiescent, "{backend}");
        assert_eq!(
            (report.totals.retries, report.totals.dead_lettered),
            (0, 1),
            "{backend}"
        );
        let dead = store.dead_letters(None).unwrap();
        assert_eq!(dead.len(), 1, "{backend}");
        assert_eq!(
            (
                dead[0].message_id.as_str(),
                dead[0].handler.as_str(),
                dead[0].attempts
            ),
            (big_id.as_str(), "", 1),
            "{backend}: unhandled, not retried"
        );
        let size = dead[0].data.len() + dead[0].metadata.len();
        assert_eq!(
            dead[0].error,
            format!("message is {size} bytes, over server.max_message_bytes = 4096; raise the limit and replay the dead letter (protean-host dlq replay), or keep large payloads out of messages and send a reference"),
            "{backend}"
        );
        assert!(ran(store.as_ref(), "big").is_empty(), "{backend}");
        for id in ["a", "b"] {
            assert_eq!(ran(store.as_ref(), id), ["Probe.Ran.v1"], "{backend}: {id}");
        }
        // The dead letter keeps the whole message: raised, the limit lets its replay through.
        let raised = engine(fixture_domain(), "probe", store.clone(), TEST_CONFIG);
        let position = dead[0].global_position;
        assert_eq!(
            raised
                .replay_dead_letter("commands:probe::probe", position)
                .unwrap(),
            Replay::Handled,
            "{backend}"
        );
        assert_eq!(ran(store.as_ref(), "big"), ["Probe.Ran.v1"], "{backend}");
    }
}

#[test]
fn a_message_over_the_limit_on_redis_is_dead_lettered_unhandled_and_the_batch_goes_on() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    let config = format!(
        "{}{}[server.handlers.runner]\nsubscription_type = \"stream\"\n",
        config(),
        redis.config()
    );
    let run = |store: &Arc<dyn Store>| -> RunReport {
        let report = engine(fixture_domain(), "probe", store.clone(), &config)
            .run()
            .unwrap();
        assert_eq!(report.outcome, Outcome::Quiescent);
        report
    };
    // The consumer group exists once a first run has created it.
    run(&store);
    // Another writer puts three entries on the stream at once: one batch.
    let entries: Vec<Vec<String>> = [("a", 0), ("big", 10_000), ("b", 0)]
        .iter()
        .enumerate()
        .map(|(n, (id, pad))| {
            let m = command(id, *pad);
            let wire = wire_json(&m.data, &m.metadata, 0, 1000 + n as u64).unwrap();
            ["XADD", COMMANDS, "*", "data", &wire]
                .map(str::to_owned)
                .to_vec()
        })
        .collect();
    redis.pipe(&entries);
    let report = run(&store);
    assert_eq!((report.totals.retries, report.totals.dead_lettered), (0, 1));
    assert!(ran(store.as_ref(), "big").is_empty());
    for id in ["a", "b"] {
        assert_eq!(ran(store.as_ref(), id), ["Probe.Ran.v1"], "{id}");
    }
    let dead = redis.cli(&["XRANGE", "commands:probe::probe:dlq", "-", "+"]);
    assert_eq!(dead.matches("original_id").count(), 1, "{dead}");
    assert!(
        dead.contains("bytes, over server.max_message_bytes = 4096; raise the limit and replay the dead letter"),
        "{dead}"
    );
    assert!(
        dead.contains(&"x".repeat(10_000)),
        "the whole entry is kept"
    );
    let pending = redis.cli(&["XPENDING", COMMANDS, "commands:probe::probe"]);
    assert!(pending.starts_with("0\n"), "all acknowledged: {pending}");
}

#[test]
fn a_handler_write_over_the_limit_fails_its_message_for_good_and_commits_nothing_of_it() {
    for (backend, store, _keep) in backends() {
        let engine = engine(fixture_domain(), "probe", store.clone(), &config());
        // `big` returns the host's error, `big-quiet` ignores it; `edge` raises data under the limit
        // that its metadata takes over.
        for (id, behaviour) in [
            ("loud", "big:10000"),
            ("quiet", "big-quiet:10000"),
            ("edge", "big:3900"),
            ("after", "ok"),
        ] {
            engine
                .send(
                    "Probe.Run.v1",
                    &json!({ "id": id, "behaviour": behaviour }),
                    None,
                )
                .unwrap();
        }
        let report = engine.run().unwrap();
        assert_eq!(report.outcome, Outcome::Quiescent, "{backend}");
        assert_eq!(
            (report.totals.retries, report.totals.dead_lettered),
            (0, 3),
            "{backend}: failed for good, at once"
        );
        let dead = store.dead_letters(None).unwrap();
        let errors: Vec<(&str, u32, &str)> = dead
            .iter()
            .map(|d| (d.handler.as_str(), d.attempts, d.error.as_str()))
            .collect();
        assert_eq!(errors.len(), 3, "{backend}: {errors:?}");
        for ((handler, attempts, error), id) in errors.iter().zip(["loud", "quiet"]) {
            assert_eq!((*handler, *attempts), ("runner", 1), "{backend}");
            assert!(
                error.starts_with(&format!("event Probe.Stuffed.v1 data written for stream probe::probe-{id} is "))
                    && error.contains(" bytes, over server.max_message_bytes = 4096; the handled message fails for good; raise the limit and replay its dead letter"),
                "{backend}: {error}"
            );
        }
        assert!(
            errors[2]
                .2
                .starts_with("event Probe.Stuffed.v1 written for stream probe::probe-edge is "),
            "{backend}: {}",
            errors[2].2
        );
        for id in ["loud", "quiet", "edge"] {
            assert!(
                ran(store.as_ref(), id).is_empty(),
                "{backend}: the Ran that {id} raised first is not committed"
            );
        }
        assert_eq!(ran(store.as_ref(), "after"), ["Probe.Ran.v1"], "{backend}");
    }
}
