//! Ordered event-store subscriptions run by several workers in one process (the real binary on
//! SQLite, and PostgreSQL where it parks): every key's messages are handled once each and in order, a
//! failing key holds back only itself while the other keys, its worker's included, go on, and a key
//! dead-lettered by the sample's `recorder` (which parks) holds its later messages until its dead
//! letter is replayed or purged.

use std::{ops::RangeInclusive, path::Path, process::Output, sync::Arc, time::Duration};

use protean_host::{
    store::{DeadLetter, PostgresStore, Store, StoredMessage},
    unit_of_work::{NewMessage, Parking, PositionUpdate, UnitOfWork},
};
use serde_json::json;

use crate::support::{
    fixture_domain, host,
    sequencing::{new_numbered, record, SEQUENCE},
    sqlite, status_json, subscription, ticked, wait_until, PgServer, Server, TEST_CONFIG,
};

const LIMIT: Duration = Duration::from_secs(60);
const KEYS: u64 = 100;
const SEQS: u64 = 20;
const WORKERS: u32 = 4;

fn sequencing() -> String {
    format!("{}:sequencing", fixture_domain().display())
}

/// Fast retries that do not run out, and `workers` workers.
fn configure(dir: &Path, workers: u32) {
    configure_retries(dir, workers, 1_000_000);
}

fn configure_retries(dir: &Path, workers: u32, max_retries: u32) {
    configure_store(dir, workers, max_retries, "");
}

/// `store`: a `[store]` section, or none for the default SQLite file.
fn configure_store(dir: &Path, workers: u32, max_retries: u32, store: &str) {
    let config = format!(
        "{TEST_CONFIG}max_retries = {max_retries}\n{store}[server.ordering]\nworkers = {workers}\n"
    );
    std::fs::write(dir.join("protean.toml"), config).unwrap();
}

/// Messages `seqs` of `KEYS` keys, appended round by round so the keys interleave in the store;
/// `poisoned` (key, seq) fails while the poison file exists.
fn append_sequences(store: &dyn Store, seqs: RangeInclusive<u64>, poisoned: Option<(u64, u64)>) {
    for seq in seqs {
        let messages = (0..KEYS)
            .map(|key| {
                let poison = json!({ "poison": poisoned == Some((key, seq)) });
                new_numbered(&format!("k{key}"), seq, poison)
            })
            .collect();
        store
            .commit(&UnitOfWork {
                messages,
                ..UnitOfWork::default()
            })
            .unwrap();
    }
}

/// Message `seq` of each of `keys`, appended in that order.
fn append_keyed(store: &dyn Store, keys: &[u64], seq: u64) {
    let messages = keys
        .iter()
        .map(|key| new_numbered(&format!("k{key}"), seq, json!({})))
        .collect();
    store
        .commit(&UnitOfWork {
            messages,
            ..UnitOfWork::default()
        })
        .unwrap();
}

/// The sequence numbers recorded for `key`, in handling order.
fn seqs(store: &dyn Store, key: u64) -> Vec<u64> {
    record(store, &format!("k{key}"))
}

/// A test-mode run of the server in `dir`, which must complete.
fn run_to_completion(dir: &Path) -> Output {
    let run = host(dir)
        .args(["server", "--test-mode", "--domain", &sequencing()])
        .output()
        .expect_code(0);
    assert!(run.stdout().contains("completed"), "{}", run.stdout());
    run.0
}

/// The "batch committed" log lines of a run.
fn batch_lines(run: &Output) -> Vec<String> {
    String::from_utf8_lossy(&run.stderr)
        .lines()
        .filter(|l| l.contains("batch committed"))
        .map(str::to_owned)
        .collect()
}

/// The messages the batches handled.
fn handled(batches: &[String]) -> u64 {
    batches.iter().map(|l| figure(l, "handled")).sum()
}

/// The number after `name=` in a log line.
fn figure(line: &str, name: &str) -> u64 {
    let start = line.find(&format!(" {name}=")).unwrap() + name.len() + 2;
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

fn all() -> Vec<u64> {
    (1..=SEQS).collect()
}

#[test]
fn workers_handle_every_key_once_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), WORKERS);
    let store: Arc<dyn Store> = sqlite(dir.path());
    append_sequences(store.as_ref(), 1..=SEQS, None);

    let run = run_to_completion(dir.path());
    for key in 0..KEYS {
        assert_eq!(seqs(store.as_ref(), key), all(), "key k{key}");
    }
    // Each message was handled by one worker, once: no worker met another's keys as work of its own
    // (which the processed markers would have turned into skips).
    let batches = batch_lines(&run);
    assert!(
        batches.iter().all(|l| l.contains(" skipped=0 ")),
        "{batches:#?}"
    );
    assert_eq!(handled(&batches), KEYS * SEQS);
    // Each worker kept its own position, and together they reached the end.
    let end = KEYS * SEQS;
    for w in 0..WORKERS {
        let position = store.position(&format!("recorder#{w}/{WORKERS}")).unwrap();
        assert!(position.is_some_and(|p| p > 0), "worker {w}: {position:?}");
    }
    let status = status_json(dir.path(), &sequencing());
    let recorder = subscription(&status, "recorder");
    assert_eq!(recorder["lag"], 0, "{recorder}");
    assert!(recorder["position"].as_u64().unwrap() <= end, "{recorder}");
}

#[test]
fn a_failing_key_holds_back_only_itself_and_resumes_in_order() {
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), WORKERS);
    let poison = dir.path().join("poison");
    std::fs::write(&poison, "").unwrap();
    let store: Arc<dyn Store> = sqlite(dir.path());
    append_sequences(store.as_ref(), 1..=SEQS, Some((7, 5)));

    let mut server = host(dir.path())
        .env("SEQUENCING_POISON_FILE", &poison)
        .args(["server", "--domain", &sequencing()])
        .spawn();
    server.wait_for(&["failed processing", "k7 #5 is poisoned"], LIMIT);
    wait_until(LIMIT, "every other key to complete", || {
        (0..KEYS)
            .filter(|&key| key != 7)
            .all(|key| seqs(store.as_ref(), key) == all())
    });
    assert_eq!(seqs(store.as_ref(), 7), [1, 2, 3, 4], "k7 waits at #5");
    // Status counts from the lowest worker position, which stays before k7 #5.
    let recorder = status_json(dir.path(), &sequencing());
    let lag = subscription(&recorder, "recorder")["lag"].as_u64().unwrap();
    assert!(
        (SEQS - 4..KEYS * SEQS).contains(&lag),
        "lag {lag}: at least k7's 16 messages, less than everything"
    );

    std::fs::remove_file(&poison).unwrap();
    wait_until(LIMIT, "k7 to complete", || seqs(store.as_ref(), 7) == all());
    // The held-back position then moves past k7 #5 to the end.
    wait_until(LIMIT, "every worker position to reach the end", || {
        (0..WORKERS).all(|w| {
            let name = format!("recorder#{w}/{WORKERS}");
            store.position(&name).unwrap() == Some(KEYS * SEQS)
        })
    });
    server.signal(libc::SIGTERM);
    let (code, log) = server.wait();
    assert_eq!(code, Some(0), "{log}");
    for key in 0..KEYS {
        assert_eq!(seqs(store.as_ref(), key), all(), "key k{key}");
    }
    assert!(store.dead_letters(None).unwrap().is_empty());
}

#[test]
fn a_changed_worker_count_loses_nothing_and_handles_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = sqlite(dir.path());
    let half = SEQS / 2;
    configure(dir.path(), WORKERS);
    append_sequences(store.as_ref(), 1..=half, None);
    run_to_completion(dir.path());
    assert_eq!(seqs(store.as_ref(), 0), (1..=half).collect::<Vec<_>>());

    // Two workers have no positions yet: they read again from the start, and the processed markers
    // keep them from handling the first half again.
    configure(dir.path(), 2);
    append_sequences(store.as_ref(), half + 1..=SEQS, None);
    let run = run_to_completion(dir.path());
    assert_eq!(handled(&batch_lines(&run)), KEYS * (SEQS - half));
    for key in 0..KEYS {
        assert_eq!(seqs(store.as_ref(), key), all(), "key k{key}");
    }
    assert!(store.position("recorder#1/2").unwrap().is_some());
}

/// The recorder's status row: parked keys, held messages, dead letters and lag.
fn parking_figures(dir: &Path) -> (u64, u64, u64, u64) {
    figures_of(dir, &sequencing(), "recorder")
}

/// The status row of `name` of `domain`: parked keys, held messages, dead letters and lag.
fn figures_of(dir: &Path, domain: &str, name: &str) -> (u64, u64, u64, u64) {
    let status = status_json(dir, domain);
    let recorder = subscription(&status, name);
    let figure = |name: &str| {
        recorder[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name}: {recorder}"))
    };
    (
        figure("parked_keys"),
        figure("held_messages"),
        figure("dead_letters"),
        figure("lag"),
    )
}

/// The stored messages of key `k{key}`, in order.
fn messages_of(store: &dyn Store, key: u64) -> Vec<StoredMessage> {
    store.read_stream(&format!("{SEQUENCE}-k{key}"), 0).unwrap()
}

/// Every message of `k{key}` has the recorder's processed marker.
#[track_caller]
fn every_message_marked(store: &dyn Store, key: u64) {
    let identities: Vec<String> = messages_of(store, key)
        .iter()
        .map(StoredMessage::identity)
        .collect();
    let ids: Vec<&str> = identities.iter().map(String::as_str).collect();
    let marked = store.processed("recorder", &ids).unwrap();
    assert_eq!(marked.len(), ids.len(), "k{key}: {marked:?} of {ids:?}");
}

/// The server on `dir`'s store, failing poisoned messages while `poison` exists.
fn serve(dir: &Path, poison: &Path) -> Server {
    host(dir)
        .env("SEQUENCING_POISON_FILE", poison)
        .args(["server", "--domain", &sequencing()])
        .spawn()
}

/// The whole story of a parked key on one store (`pg`, or the SQLite file): k7 #5 is dead-lettered,
/// k7 parks and holds its later messages (also those appended later, also across a restart) while the
/// other keys finish and every worker's position reaches the end; the replay of its dead letter
/// releases it, and its held messages are handled in order, each once, before it is unparked.
fn a_parked_key_holds_its_messages_until_its_replay(pg: Option<&PgServer>, workers: u32) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = match pg {
        Some(pg) => {
            configure_store(dir.path(), workers, 2, &pg.config());
            let store = PostgresStore::connect(&pg.store_config()).unwrap();
            store.setup().unwrap();
            Arc::new(store)
        }
        None => {
            configure_store(dir.path(), workers, 2, "");
            sqlite(dir.path())
        }
    };
    let poison = dir.path().join("poison");
    std::fs::write(&poison, "").unwrap();
    append_sequences(store.as_ref(), 1..=SEQS, Some((7, 5)));
    let mut server = serve(dir.path(), &poison);
    server.wait_for(&["key parked", "sequence-k7"], LIMIT);
    let others_complete = |store: &dyn Store| {
        (0..KEYS)
            .filter(|&k| k != 7)
            .all(|k| seqs(store, k).len() as u64 >= SEQS)
    };
    wait_until(LIMIT, "every other key to complete", || {
        others_complete(store.as_ref())
    });
    // The positions pass k7's held messages: nothing but them waits.
    let end = KEYS * SEQS;
    let positions = |store: &dyn Store| match workers {
        1 => vec![store.position("recorder").unwrap()],
        _ => (0..workers)
            .map(|w| store.position(&format!("recorder#{w}/{workers}")).unwrap())
            .collect(),
    };
    wait_until(LIMIT, "every position to reach the end", || {
        positions(store.as_ref()).iter().all(|p| *p == Some(end))
    });
    assert_eq!(seqs(store.as_ref(), 7), [1, 2, 3, 4], "k7 parked at #5");
    assert_eq!(parking_figures(dir.path()), (1, SEQS - 5, 1, 0));

    // Later messages of k7 are held too; k3 goes on.
    append_keyed(store.as_ref(), &[3, 7], SEQS + 1);
    wait_until(LIMIT, "k3 #21", || seqs(store.as_ref(), 3).len() == 21);
    server.stop_cleanly();
    let server = serve(dir.path(), &poison);
    append_keyed(store.as_ref(), &[7, 3], SEQS + 2);
    wait_until(LIMIT, "k3 #22 after the restart", || {
        seqs(store.as_ref(), 3).len() == 22
    });
    assert_eq!(seqs(store.as_ref(), 7), [1, 2, 3, 4], "still parked");
    assert_eq!(parking_figures(dir.path()), (1, SEQS - 5 + 2, 1, 0));

    std::fs::remove_file(&poison).unwrap();
    let dead = store.dead_letters(Some("recorder")).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let id = dead[0].global_position.to_string();
    let replay = host(dir.path())
        .args(["dlq", "replay", &id, "--subscription", "recorder"])
        .args(["--domain", &sequencing()])
        .output()
        .expect_code(0);
    assert!(
        replay
            .stdout()
            .contains(&format!("released key {SEQUENCE}-k7: its 17 held messages")),
        "{}",
        replay.stdout()
    );
    let to_22: Vec<u64> = (1..=SEQS + 2).collect();
    wait_until(LIMIT, "k7 to be handled to its end", || {
        seqs(store.as_ref(), 7) == to_22
    });
    wait_until(LIMIT, "k7 to be unparked", || {
        store.parked_keys("recorder").unwrap().is_empty()
    });
    server.stop_cleanly();
    assert_eq!(seqs(store.as_ref(), 7), to_22, "in order, each once");
    every_message_marked(store.as_ref(), 7);
    for key in (0..KEYS).filter(|&k| k != 7 && k != 3) {
        assert_eq!(seqs(store.as_ref(), key), all(), "key k{key}");
    }
    assert_eq!(seqs(store.as_ref(), 3), to_22, "k3 went on, each once");
    assert_eq!(parking_figures(dir.path()), (0, 0, 0, 0));
}

#[test]
fn a_parked_key_holds_its_messages_until_its_replay_on_sqlite() {
    a_parked_key_holds_its_messages_until_its_replay(None, WORKERS);
}

#[test]
fn a_parked_key_holds_its_messages_until_its_replay_on_postgres() {
    let pg = PgServer::start();
    a_parked_key_holds_its_messages_until_its_replay(Some(&pg), 1);
}

#[test]
fn purging_a_parked_keys_dead_letter_releases_its_held_messages() {
    let dir = tempfile::tempdir().unwrap();
    configure_retries(dir.path(), WORKERS, 2);
    let poison = dir.path().join("poison");
    std::fs::write(&poison, "").unwrap();
    let store: Arc<dyn Store> = sqlite(dir.path());
    append_sequences(store.as_ref(), 1..=SEQS, Some((7, 5)));
    let run_once = || {
        host(dir.path())
            .env("SEQUENCING_POISON_FILE", &poison)
            .args(["server", "--test-mode", "--domain", &sequencing()])
            .output()
            .expect_code(0)
    };
    let first = run_once();
    assert!(
        first.stdout().contains("dead-lettered 1"),
        "{}",
        first.stdout()
    );
    assert_eq!(seqs(store.as_ref(), 7), [1, 2, 3, 4]);
    for key in (0..KEYS).filter(|&key| key != 7) {
        assert_eq!(seqs(store.as_ref(), key), all(), "key k{key}");
    }
    assert_eq!(parking_figures(dir.path()), (1, SEQS - 5, 1, 0));

    let purge = host(dir.path())
        .args(["dlq", "purge", "--subscription", "recorder", "--yes"])
        .args(["--domain", &sequencing()])
        .output()
        .expect_code(0);
    assert!(
        purge.stdout().contains("released key"),
        "{}",
        purge.stdout()
    );
    // The poison is still there: #5 is discarded, not handled again; the held ones are.
    run_once();
    let mut without_5 = all();
    without_5.retain(|&seq| seq != 5);
    assert_eq!(seqs(store.as_ref(), 7), without_5);
    assert_eq!(parking_figures(dir.path()), (0, 0, 0, 0));
}

#[test]
fn one_worker_reads_as_before_with_the_plain_position() {
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), 1);
    let store: Arc<dyn Store> = sqlite(dir.path());
    append_sequences(store.as_ref(), 1..=SEQS, None);
    let run = run_to_completion(dir.path());
    assert!(batch_lines(&run).iter().all(|l| !l.contains("worker=")));
    for key in 0..KEYS {
        assert_eq!(seqs(store.as_ref(), key), all(), "key k{key}");
    }
    assert_eq!(store.position("recorder").unwrap(), Some(KEYS * SEQS));
    assert_eq!(store.position("recorder#0/1").unwrap(), None);
}

/// Keys a build that parked left parked are still handled by a build that moves on (the policy
/// changed): their held messages, and the later ones of their keys, wait for the release and are
/// handled then; nothing is left behind for good.
#[test]
fn keys_an_earlier_build_parked_are_released_and_handled_by_one_that_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    configure_retries(dir.path(), 1, 2);
    let store: Arc<dyn Store> = sqlite(dir.path());
    let stream = "probe::probe-1";
    append(store.as_ref(), (1..=2).map(|n| ticked(stream, n)).collect());
    // What a parking build left: #1 dead-lettered, its key parked, #2 held, the position past both.
    let first = &store.read_stream(stream, 0).unwrap()[0];
    store
        .commit(&UnitOfWork {
            dead_letters: vec![dead_letter("noop", first)],
            parking: Parking {
                subscription: "noop".into(),
                park: vec![(stream.into(), 1)],
                hold: vec![(stream.into(), 2)],
                ..Parking::default()
            },
            position: Some(PositionUpdate {
                subscription: "noop".into(),
                position: 2,
            }),
            ..UnitOfWork::default()
        })
        .unwrap();
    append(store.as_ref(), vec![ticked(stream, 3)]);
    let domain = format!("{}:ordered_noop", fixture_domain().display());
    let run = || {
        host(dir.path())
            .args(["server", "--test-mode", "--domain", &domain])
            .output()
            .expect_code(0)
    };
    let first_run = run();
    assert!(
        first_run.stderr().contains("no longer parks"),
        "{}",
        first_run.stderr()
    );
    let handled = |store: &dyn Store| {
        let ids: Vec<String> = store
            .read_stream(stream, 0)
            .unwrap()
            .iter()
            .map(StoredMessage::identity)
            .collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        store.processed("noop", &ids).unwrap().len()
    };
    assert_eq!(handled(store.as_ref()), 0, "#2 and #3 wait behind #1");
    assert_eq!(figures_of(dir.path(), &domain, "noop"), (1, 2, 1, 0));
    host(dir.path())
        .args([
            "dlq",
            "purge",
            "--subscription",
            "noop",
            "--yes",
            "--domain",
            &domain,
        ])
        .output()
        .expect_code(0);
    run();
    assert_eq!(
        handled(store.as_ref()),
        2,
        "#2 and #3 handled once released"
    );
    assert!(store.parked_keys("noop").unwrap().is_empty());
    let status = status_json(dir.path(), &domain);
    let noop = subscription(&status, "noop");
    assert!(
        noop.get("parked_keys").is_none(),
        "nothing parked, and it does not park: {noop}"
    );
    assert_eq!(
        (&noop["dead_letters"], &noop["lag"]),
        (&json!(0), &json!(0))
    );
}

fn append(store: &dyn Store, messages: Vec<NewMessage>) {
    store
        .commit(&UnitOfWork {
            messages,
            ..UnitOfWork::default()
        })
        .unwrap();
}

fn dead_letter(subscription: &str, m: &StoredMessage) -> DeadLetter {
    DeadLetter {
        subscription: subscription.into(),
        handler: subscription.into(),
        message_id: m.id.clone(),
        stream: m.stream.clone(),
        global_position: m.global_position,
        message_type: m.message_type.clone(),
        data: m.data.clone(),
        metadata: m.metadata.clone(),
        error: "failed in an earlier build".into(),
        attempts: 1,
        build_id: "earlier".into(),
        failed_at: "2026-01-01T00:00:00.000000+00:00".into(),
    }
}
