//! Crash containment against the real binary, with a fixture handler that aborts, segfaults, exits,
//! allocates without bound or spins forever. In process nothing can stop such a handler from taking the
//! process down (or, spinning, from never returning), so these tests play the supervisor: they restart
//! what died, kill what `/livez` says is stuck, and then check from the store and the dead letters that
//! every other message was handled exactly once and the culprit was dead-lettered, with the cause, after
//! `max_retries` calls, on every store and with three replicas on Redis.

use std::{
    os::unix::process::ExitStatusExt,
    path::Path,
    process::ExitStatus,
    sync::Arc,
    time::{Duration, Instant},
};

use protean_host::store::{self, Store, StoreConfig};
use serde_json::{json, Value};

use crate::support::{
    fixture_domain, host, http::get, wait_until, Finished, HostCommand, PgServer, RedisServer,
    Server, TEST_CONFIG,
};

const MAX_RETRIES: usize = 2;
const LIMIT: Duration = Duration::from_secs(60);
const COMMANDS: &str = "commands:probe::probe";

/// The fixture's probe domain: its `runner` command handler unordered, or ordered by stream.
const PROBE: &str = "probe";
const ORDERED: &str = "probe_ordered";

fn probe_lib() -> String {
    lib(PROBE)
}

fn lib(instance: &str) -> String {
    format!("{}:{instance}", fixture_domain().display())
}

/// Fast retries, the store section `store`, `server` keys, and the probe's command handler (which
/// declares 3 in code) told `max_retries = 2` and `runner` keys.
fn configure(dir: &Path, store: &str, server: &str, runner: &str) {
    let config = format!(
        "{TEST_CONFIG}{server}\n[server.handlers.runner]\nmax_retries = {MAX_RETRIES}\n{runner}\n{store}"
    );
    std::fs::write(dir.join("protean.toml"), config).unwrap();
}

fn run(dir: &Path, args: &[&str]) -> HostCommand {
    host(dir)
        .args(["--log-level", "warn", "--domain", &probe_lib()])
        .args(args)
}

/// A server of the probe domain, logging at INFO.
fn serve(dir: &Path) -> Server {
    serve_as(dir, PROBE)
}

/// A server of the probe domain's `instance`, logging at INFO.
fn serve_as(dir: &Path, instance: &str) -> Server {
    host(dir).args(["--domain", &lib(instance)]).spawn()
}

/// Send `Run` commands in one `send`, so that they are stored together and read as one batch.
fn send(dir: &Path, commands: &[(&str, &str)]) {
    let lines: String = commands
        .iter()
        .map(|(id, behaviour)| json!({ "id": id, "behaviour": behaviour }).to_string() + "\n")
        .collect();
    run(dir, &["send", "Probe.Run.v1", "-"])
        .output_with_stdin(&lines)
        .expect_code(0);
}

/// The store the server of `dir` uses: its SQLite file, or `pg`'s database.
fn open(dir: &Path, pg: Option<&PgServer>) -> Arc<dyn Store> {
    let config = match pg {
        Some(pg) => StoreConfig::Postgres(pg.store_config()),
        None => StoreConfig::Sqlite {
            path: dir.join(".protean/store.db"),
        },
    };
    store::open(&config).unwrap()
}

/// How many `Ran` events the probe raised for command `id`: how many times it was handled and committed.
fn handled(store: &dyn Store, id: &str) -> usize {
    store
        .read_stream(&format!("probe::probe-{id}"), 0)
        .unwrap()
        .iter()
        .filter(|m| m.message_type == "Probe.Ran.v1")
        .count()
}

/// The dead letters `dlq list --json` shows.
fn dead_letters(dir: &Path) -> Vec<Value> {
    let listed = run(dir, &["dlq", "list", "--json"]).output().expect_code(0);
    serde_json::from_str::<Value>(&listed.stdout())
        .unwrap_or_else(|e| panic!("{e}: {}", listed.stdout()))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Exactly one dead letter: the culprit's, after `max_retries + 1` calls, saying the process died.
#[track_caller]
fn assert_culprit_dead_lettered(dir: &Path, culprit: &str) {
    assert_dead_lettered(dir, &[(culprit, "died or was stopped")]);
}

/// The dead letters are exactly the `culprits`' (ids as sent), each after `max_retries + 1` calls,
/// with its cause in the error.
#[track_caller]
fn assert_dead_lettered(dir: &Path, culprits: &[(&str, &str)]) {
    let rows = dead_letters(dir);
    assert_eq!(rows.len(), culprits.len(), "{rows:#?}");
    for (culprit, cause) in culprits {
        let fields = rows
            .iter()
            .map(|row| &row["fields"])
            .find(|fields| is_of(fields, culprit))
            .unwrap_or_else(|| panic!("{culprit} dead-lettered: {rows:#?}"));
        assert_cause(fields, culprit, cause);
    }
}

/// Whether the dead letter of `fields` is `culprit`'s (its id as sent).
fn is_of(fields: &Value, culprit: &str) -> bool {
    let data = fields["data"].as_str().map_or(Value::Null, |d| {
        serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_owned()))
    });
    // A store's dead letter names the stream and holds the data; a broker's holds the whole entry.
    fields["stream"]
        .as_str()
        .is_some_and(|s| s.ends_with(culprit))
        || data["id"] == *culprit
        || data["data"]["id"] == *culprit
}

/// The dead letter of `fields` came after `max_retries + 1` calls, with `cause` in its error.
#[track_caller]
fn assert_cause(fields: &Value, culprit: &str, cause: &str) {
    let error = fields["error"].as_str().unwrap_or_default();
    assert!(error.contains(cause), "{culprit}: {error}");
    assert_eq!(
        fields["attempts"].to_string().trim_matches('"'),
        (MAX_RETRIES + 1).to_string(),
        "{culprit}: {fields:#}"
    );
}

/// Run test mode again after every death, as a supervisor restarting the process would, until a run
/// ends cleanly; how each run that died ended, and the log of every run.
fn supervise_test_mode(dir: &Path, instance: &str) -> (Vec<ExitStatus>, String) {
    let mut deaths = Vec::new();
    let mut log = String::new();
    loop {
        let Finished(output) = host(dir)
            .args(["--domain", &lib(instance), "--test-mode"])
            .output();
        log += &format!("---- run {}\n", deaths.len() + 1);
        log += &String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            return (deaths, log);
        }
        deaths.push(output.status);
        assert!(
            deaths.len() <= MAX_RETRIES + 2,
            "still dying after {} runs: {:?}; last stderr:\n{}",
            deaths.len(),
            deaths,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The crash of `behaviour` among `goods` good commands sent together, in the probe domain's
/// `instance`, on the store `store`.
fn a_crash_loop_ends_in_a_dead_letter(
    instance: &str,
    goods: usize,
    behaviour: &str,
    died: fn(ExitStatus) -> bool,
    pg: Option<&PgServer>,
) {
    let dir = tempfile::tempdir().unwrap();
    let section = pg.map(PgServer::config).unwrap_or_default();
    // A dead owner's lease runs out sooner than by default.
    configure(dir.path(), &section, "lease_ttl_ms = 2000", "");
    if let Some(pg) = pg {
        pg.psql(
            "DROP SCHEMA IF EXISTS protean CASCADE; DROP SCHEMA IF EXISTS message_store CASCADE;",
        );
        run(dir.path(), &["db", "setup"]).output().expect_code(0);
    }
    let ids: Vec<String> = (0..goods).map(|n| format!("good-{n}")).collect();
    let mut commands: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "ok")).collect();
    commands.insert(goods / 2, ("culprit", behaviour));
    send(dir.path(), &commands);
    let (deaths, log) = supervise_test_mode(dir.path(), instance);
    assert_eq!(
        deaths.len(),
        MAX_RETRIES + 1,
        "{instance} {behaviour}: one death per call: {deaths:?}\n{log}"
    );
    assert!(deaths.iter().all(|s| died(*s)), "{behaviour}: {deaths:?}");
    let store = open(dir.path(), pg);
    for id in &ids {
        assert_eq!(
            handled(store.as_ref(), id),
            1,
            "{instance} {behaviour}: {id} handled once\n{log}"
        );
    }
    assert_eq!(handled(store.as_ref(), "culprit"), 0);
    assert_culprit_dead_lettered(dir.path(), "culprit");
    assert!(
        store.recorded_calls(COMMANDS, None).unwrap().is_empty(),
        "{behaviour}: every call record (and busy mark) cleared\n{log}"
    );
}

fn by_signal(signal: i32) -> impl Fn(ExitStatus) -> bool {
    move |status| status.signal() == Some(signal)
}

#[test]
fn a_handler_that_aborts_segfaults_or_exits_is_dead_lettered_after_max_retries_on_sqlite() {
    let abort = |s| by_signal(libc::SIGABRT)(s);
    a_crash_loop_ends_in_a_dead_letter(PROBE, 2, "abort", abort, None);
    a_crash_loop_ends_in_a_dead_letter(PROBE, 2, "segfault", |s| by_signal(libc::SIGSEGV)(s), None);
    a_crash_loop_ends_in_a_dead_letter(PROBE, 2, "exit:3", |s| s.code() == Some(3), None);
}

#[test]
fn a_handler_that_aborts_or_segfaults_is_dead_lettered_after_max_retries_on_postgres() {
    let pg = PgServer::start();
    let abort = |s| by_signal(libc::SIGABRT)(s);
    a_crash_loop_ends_in_a_dead_letter(PROBE, 2, "abort", abort, Some(&pg));
    a_crash_loop_ends_in_a_dead_letter(
        PROBE,
        2,
        "segfault",
        |s| by_signal(libc::SIGSEGV)(s),
        Some(&pg),
    );
}

#[test]
fn a_handler_that_allocates_without_bound_under_a_memory_limit_is_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), "", "", "");
    send(
        dir.path(),
        &[("before", "ok"), ("hog", "alloc"), ("after", "ok")],
    );
    let mut deaths = Vec::new();
    loop {
        // As a container's memory limit would: the allocation that passes it fails and aborts.
        let Finished(output) = run(dir.path(), &["--test-mode"])
            .memory_limit(512 << 20)
            .output();
        if output.status.success() {
            break;
        }
        deaths.push(output.status);
        assert!(deaths.len() <= MAX_RETRIES + 2, "{deaths:?}");
    }
    assert_eq!(deaths.len(), MAX_RETRIES + 1, "{deaths:?}");
    let store = open(dir.path(), None);
    assert_eq!(
        (
            handled(store.as_ref(), "before"),
            handled(store.as_ref(), "after")
        ),
        (1, 1)
    );
    assert_culprit_dead_lettered(dir.path(), "hog");
}

#[test]
fn a_handler_past_its_deadline_fails_liveness_and_is_dead_lettered_after_restarts() {
    let dir = tempfile::tempdir().unwrap();
    configure(
        dir.path(),
        "[server.health]\nport = 0\n",
        "handler_timeout_ms = 300",
        "",
    );
    send(
        dir.path(),
        &[("before", "ok"), ("stuck", "spin"), ("after", "ok")],
    );
    let mut stuck = 0;
    let store = open(dir.path(), None);
    let finished = |store: &dyn Store| handled(store, "after") == 1;
    while !finished(store.as_ref()) {
        assert!(
            stuck <= MAX_RETRIES + 1,
            "still stuck after {stuck} restarts"
        );
        let mut server = serve(dir.path());
        let address = server.health_address();
        // Either the spinning call passes its deadline, or (once dead-lettered) the rest is handled.
        let deadline = Instant::now() + LIMIT;
        loop {
            let (status, body) = get(&address, "/livez");
            if status == 503 {
                assert!(
                    body.contains("handler runner of commands:probe::probe"),
                    "{body}"
                );
                assert!(body.contains("past its deadline of 300 ms"), "{body}");
                stuck += 1;
                // The supervisor's answer to a failed liveness probe.
                server.signal(libc::SIGKILL);
                break;
            }
            if finished(store.as_ref()) {
                break;
            }
            assert!(Instant::now() < deadline, "neither stuck nor done");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(stuck, MAX_RETRIES + 1);
    assert_eq!(handled(store.as_ref(), "before"), 1);
    assert_culprit_dead_lettered(dir.path(), "stuck");
}

/// Three replicas of the probe domain's `instance` configured in `dir`, with aborting commands (the
/// `culprits`) among ten good ones, restarted by the test as a supervisor would until every good
/// command is handled and every culprit dead-lettered: each handled once, no replica left dead.
/// `after_first_death` runs once, when the first replica has died; with it, a culprit may have up to
/// `entries` dead letters. `drained` says whether the source has nothing left to deliver, so that no
/// entry is still on its way to a replica when the test stops them. Commands for a broker are published
/// before the replicas start ([`publish_before_serving`]). How each replica that died ended.
fn three_replicas_survive_an_aborting_command(
    dir: &Path,
    instance: &str,
    store: &dyn Store,
    culprits: &[&str],
    after_first_death: impl FnOnce(),
    entries: usize,
    drained: &dyn Fn() -> bool,
) -> Vec<ExitStatus> {
    let mut commands: Vec<(String, &str)> = (0..10).map(|n| (format!("good-{n}"), "ok")).collect();
    for (n, culprit) in culprits.iter().enumerate() {
        commands.insert(5 + n, ((*culprit).to_owned(), "abort"));
    }
    let refs: Vec<(&str, &str)> = commands.iter().map(|(id, b)| (id.as_str(), *b)).collect();
    send(dir, &refs);
    publish_before_serving(dir, store);
    let mut replicas: Vec<Server> = (0..3).map(|_| serve_as(dir, instance)).collect();
    let missing = || {
        let good: Vec<usize> = (0..10)
            .map(|n| handled(store, &format!("good-{n}")))
            .collect();
        let dead = dead_letters(dir);
        let every = culprits
            .iter()
            .all(|c| dead.iter().any(|row| is_of(&row["fields"], c)));
        let done = good.iter().all(|&n| n >= 1) && every && drained();
        (!done).then(|| {
            format!(
                "every good command handled and every culprit dead-lettered: handled {good:?}, {} \
                 dead letter(s)",
                dead.len()
            )
        })
    };
    let deaths = keep_alive_until(
        dir,
        instance,
        store,
        &mut replicas,
        after_first_death,
        missing,
    );
    for n in 0..10 {
        assert_eq!(handled(store, &format!("good-{n}")), 1, "good-{n} once");
    }
    // Each culprit's entries are dead-lettered at most once each.
    let rows = dead_letters(dir);
    for culprit in culprits {
        let theirs: Vec<&Value> = rows
            .iter()
            .map(|row| &row["fields"])
            .filter(|fields| is_of(fields, culprit))
            .collect();
        assert!(theirs.len() <= entries, "{culprit}: {rows:#?}");
        for fields in theirs {
            assert_cause(fields, culprit, "died or was stopped");
        }
    }
    assert!(rows.len() <= culprits.len() * entries, "{rows:#?}");
    for replica in replicas {
        replica.stop_cleanly();
    }
    deaths
}

/// Restart each of `replicas` that dies, as a supervisor would, until `missing` says nothing is (it
/// names what is missing meanwhile); `after_first_death` runs once, after the first death. How each
/// replica that died ended. Past two minutes, panics with what is missing and what each replica said
/// last: enough to tell a stuck partition from a slow machine.
fn keep_alive_until(
    dir: &Path,
    instance: &str,
    store: &dyn Store,
    replicas: &mut Vec<Server>,
    after_first_death: impl FnOnce(),
    missing: impl Fn() -> Option<String>,
) -> Vec<ExitStatus> {
    let mut after_first_death = Some(after_first_death);
    let mut deaths = Vec::new();
    // What each replica that died said last: the calls it made and the counts it recovered.
    let mut last_words = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for replica in replicas.iter_mut() {
            if let Some(status) = replica.exited() {
                deaths.push(status);
                let dead = std::mem::replace(replica, serve_as(dir, instance));
                last_words.push(tail(&dead.wait().1));
            }
        }
        if !deaths.is_empty() {
            if let Some(hook) = after_first_death.take() {
                hook();
            }
        }
        let Some(missing) = missing() else {
            return deaths;
        };
        if Instant::now() >= deadline {
            let logs: Vec<String> = std::mem::take(replicas)
                .into_iter()
                .map(|replica| tail(&replica.stop().1))
                .collect();
            let calls = store.recorded_calls(COMMANDS, None);
            panic!(
                "timed out waiting for {missing}; deaths {deaths:?}, calls recorded {calls:?}\n\
                 the replicas that died, in order:\n{}\n====\nthe replicas left:\n{}",
                last_words.join("\n----\n"),
                logs.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last lines of a replica's `log`.
fn tail(log: &str) -> String {
    let last: Vec<&str> = log.lines().rev().take(15).collect();
    last.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// A Redis server, and a directory configured for it with the command handler on a Redis stream
/// (replicas share its consumer group), `isolated` or in process; the store its servers use.
fn on_redis_streams(isolated: bool) -> (RedisServer, tempfile::TempDir, Arc<dyn Store>) {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let stream = "subscription_type = \"stream\"";
    match isolated {
        true => configure_isolated(dir.path(), &redis.config(), stream),
        false => configure(dir.path(), &redis.config(), "", stream),
    }
    let store = open(dir.path(), None);
    (redis, dir, store)
}

/// Three replicas of the probe domain's `instance` on Redis, an aborting command among ten good ones,
/// its entry published twice if `twice`. An ordered subscription reads both entries in one batch:
/// the second is settled with the first. A consumer group may hand them to different replicas, each
/// entry a delivery of its own: each may be dead-lettered, after its own deaths.
fn three_replicas_on_redis_survive_a_handler_that_aborts_in(instance: &str, twice: bool) {
    three_replicas_on_redis_survive_handlers_that_abort(instance, &["culprit"], twice);
}

/// [`three_replicas_on_redis_survive_a_handler_that_aborts_in`] with several `culprits`, each a
/// command of its own.
fn three_replicas_on_redis_survive_handlers_that_abort(
    instance: &str,
    culprits: &[&str],
    twice: bool,
) {
    let (redis, dir, store) = on_redis_streams(false);
    // The outbox publishes again what it published just before its replica died: here, the culprit,
    // once its first call has killed a replica (so its entry is in the stream, and not dead-lettered).
    let publish_again = || {
        if twice {
            let copied = redis.cli(&["EVAL", COPY_CULPRIT, "1", "probe::probe:command"]);
            assert!(
                copied.trim().contains('-'),
                "the culprit's entry copied: {copied}"
            );
        }
    };
    let entries = if twice && instance == PROBE { 2 } else { 1 };
    // A consumer group may deliver the copy after the first entry's dead letter: wait for it too.
    // (An ordered subscription reads the stream without a group.)
    let drained = || instance != PROBE || redis.groups_drained("probe::probe:command");
    let deaths = three_replicas_survive_an_aborting_command(
        dir.path(),
        instance,
        store.as_ref(),
        culprits,
        publish_again,
        entries,
        &drained,
    );
    assert!(
        deaths.len() > MAX_RETRIES,
        "each call of the culprit killed a replica: {deaths:?}"
    );
    // Each culprit dies in `max_retries + 1` calls of its entry; the first call may have held them all.
    let most = culprits.len() * entries * (MAX_RETRIES + 1);
    assert!(deaths.len() <= most, "{deaths:?}");
}

/// Publish the commands sent so far by a replica with no handlers, before any replica that runs them
/// starts. A replica the culprit kills may have published it a moment before, in its own outbox round,
/// and not yet marked that round: another replica's outbox would publish the culprit again once the
/// dead one's lease ran out, at any moment of the test, even after the test saw it dead-lettered and
/// the group drained (a new entry, a new crash loop). Published first, the culprit's entries are the
/// one `send` made and the copy a test makes itself (`COPY_CULPRIT`: that republication, at a moment
/// of its choosing).
fn publish_before_serving(dir: &Path, store: &dyn Store) {
    let waiting = || store.outbox().unwrap().counts(1).unwrap().pending;
    if waiting() == 0 {
        // No broker: nothing to publish.
        return;
    }
    let publisher = serve_as(dir, "empty");
    wait_until(LIMIT, "every command published", || waiting() == 0);
    publisher.stop_cleanly();
}

/// Append a copy of the culprit's entry to the stream `KEYS[1]`; the copy's id.
const COPY_CULPRIT: &str = "for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do \
    for i = 2, #e[2], 2 do \
        if string.find(e[2][i], '\"culprit\"', 1, true) then \
            return redis.call('XADD', KEYS[1], '*', unpack(e[2])) \
        end \
    end \
end \
return false";

#[test]
fn three_replicas_on_redis_survive_a_handler_that_aborts() {
    three_replicas_on_redis_survive_a_handler_that_aborts_in(PROBE, false);
}

#[test]
fn three_replicas_on_redis_survive_an_ordered_handler_that_aborts() {
    // Ordered by stream on Redis: partitions leased to replicas, every call recorded.
    three_replicas_on_redis_survive_a_handler_that_aborts_in(ORDERED, false);
}

#[test]
fn two_aborting_commands_on_redis_are_each_dead_lettered_once_after_their_deaths() {
    // Called one after the other in the batches of redelivered entries: the first is dead-lettered in
    // the store's commit, and the second's call kills the replica before Redis has that dead letter.
    // Its call record stays until then, so its next reader dead-letters it again without a call
    // (before: its count was gone, and its crash loop started over).
    three_replicas_on_redis_survive_handlers_that_abort(PROBE, &["culprit-a", "culprit-b"], false);
    three_replicas_on_redis_survive_handlers_that_abort(
        ORDERED,
        &["culprit-a", "culprit-b"],
        false,
    );
}

#[test]
fn an_aborting_command_published_twice_ends_in_a_dead_letter_on_redis() {
    // As an outbox does when its replica dies between publishing and marking. Both entries in one
    // batch are each a suspect of its own unit: once the first is dead-lettered, its second must be
    // settled too, not called afresh (twelve deaths and no dead letter, before: the crash loop never
    // ended).
    three_replicas_on_redis_survive_a_handler_that_aborts_in(ORDERED, true);
    three_replicas_on_redis_survive_a_handler_that_aborts_in(PROBE, true);
}

#[test]
fn a_dead_lettered_aborting_command_published_again_or_replayed_kills_one_replica_on_redis() {
    // An outbox publishes a command again when its replica died before marking it, and the culprit's
    // call is what kills that replica: the copy may come long after the first entry's dead letter, to
    // a consumer group that acknowledged it. The copy's first delivery is called unchecked and kills a
    // replica; redelivered, it finds the call record the dead letter kept, and is dead-lettered again
    // without a call. Before, its count had ended with the first dead letter: `max_retries + 1` more
    // deaths for each copy, and a copy can leave another, as its replica dies unmarked. A replay from
    // the dead letters is such an entry too.
    let (redis, dir, store) = on_redis_streams(false);
    let stream = "probe::probe:command";
    let drained = || redis.groups_drained(stream);
    let culprit = ["culprit"];
    three_replicas_survive_an_aborting_command(
        dir.path(),
        PROBE,
        store.as_ref(),
        &culprit,
        || {},
        1,
        &drained,
    );
    let copied = redis.cli(&["EVAL", COPY_CULPRIT, "1", stream]);
    assert!(copied.trim().contains('-'), "the culprit copied: {copied}");
    let deaths = deaths_until_dead_letters(dir.path(), store.as_ref(), 2, &drained);
    assert_eq!(deaths.len(), 1, "the copy killed one replica: {deaths:?}");
    let rows = dead_letters(dir.path());
    let id = rows[0]["id"].as_str().unwrap();
    run(
        dir.path(),
        &["dlq", "replay", id, "--subscription", COMMANDS],
    )
    .output()
    .expect_code(0);
    assert_eq!(dead_letters(dir.path()).len(), 1, "replayed");
    let replays = format!("{COMMANDS}:replay");
    let both = || drained() && redis.groups_drained(&replays);
    let deaths = deaths_until_dead_letters(dir.path(), store.as_ref(), 2, &both);
    assert_eq!(deaths.len(), 1, "the replay killed one replica: {deaths:?}");
    for n in 0..10 {
        assert_eq!(
            handled(store.as_ref(), &format!("good-{n}")),
            1,
            "good-{n} once"
        );
    }
    assert_eq!(handled(store.as_ref(), "culprit"), 0);
}

/// Three replicas of the probe, kept alive until `dir` holds `dead` dead letters, each the culprit's
/// after `max_retries + 1` calls, and the source is `drained`; how the replicas that died ended, each
/// by the culprit's abort.
fn deaths_until_dead_letters(
    dir: &Path,
    store: &dyn Store,
    dead: usize,
    drained: &dyn Fn() -> bool,
) -> Vec<ExitStatus> {
    let mut replicas: Vec<Server> = (0..3).map(|_| serve(dir)).collect();
    let missing = || {
        let now = dead_letters(dir).len();
        (now < dead || !drained()).then(|| format!("{dead} dead letters: {now} so far"))
    };
    let deaths = keep_alive_until(dir, PROBE, store, &mut replicas, || {}, missing);
    for replica in replicas {
        replica.stop_cleanly();
    }
    assert!(
        deaths.iter().all(|&d| by_signal(libc::SIGABRT)(d)),
        "{deaths:?}"
    );
    let rows = dead_letters(dir);
    assert_eq!(rows.len(), dead, "{rows:#?}");
    for row in &rows {
        assert_cause(&row["fields"], "culprit", "died or was stopped");
        assert!(is_of(&row["fields"], "culprit"), "{row:#}");
    }
    deaths
}

#[test]
fn an_ordered_handler_that_aborts_is_dead_lettered_after_max_retries_on_sqlite_and_postgres() {
    // Ordered by stream on the event store: workers in one process, one lease. The culprit's crash
    // also ends its sibling workers' calls; only it may be charged for its later crashes.
    let abort = |s| by_signal(libc::SIGABRT)(s);
    a_crash_loop_ends_in_a_dead_letter(ORDERED, 12, "abort", abort, None);
    let pg = PgServer::start();
    a_crash_loop_ends_in_a_dead_letter(ORDERED, 12, "abort", abort, Some(&pg));
}

/// Isolated mode: the handler's ways of killing its process, each between good commands, and what each
/// dead letter says.
const CULPRITS: [(&str, &str, &str); 5] = [
    ("aborts", "abort", "died handling this call (SIGABRT)"),
    ("segfaults", "segfault", "died handling this call (SIGSEGV)"),
    ("exits", "exit:3", "exited with code 3 handling this call"),
    (
        "spins",
        "spin",
        "passed its deadline of 1000 ms handling this call and was killed",
    ),
    ("hoards", "alloc", "memory allocation of"),
];

/// Worker processes with a memory limit, and the handler's deadline, for `store`.
fn configure_isolated(dir: &Path, store: &str, runner: &str) {
    let store = format!("[server.worker]\nmemory_limit_mb = 256\n{store}");
    let runner = format!("handler_timeout_ms = 1000\n{runner}");
    configure(dir, &store, "isolation = \"process\"", &runner);
}

/// Ten good commands with every culprit among them, in one `send` (so, one batch to start with).
fn send_goods_and_culprits(dir: &Path) {
    let mut commands: Vec<(String, &str)> = (0..10).map(|n| (format!("good-{n}"), "ok")).collect();
    for (n, (id, behaviour, _)) in CULPRITS.iter().enumerate() {
        commands.insert(2 * n + 1, ((*id).to_owned(), behaviour));
    }
    let refs: Vec<(&str, &str)> = commands.iter().map(|(id, b)| (id.as_str(), *b)).collect();
    send(dir, &refs);
}

/// Every good command handled exactly once, no culprit ever, every culprit dead-lettered with its cause.
#[track_caller]
fn assert_only_culprits_lost(dir: &Path, store: &dyn Store) {
    for n in 0..10 {
        assert_eq!(handled(store, &format!("good-{n}")), 1, "good-{n} once");
    }
    let causes: Vec<(&str, &str)> = CULPRITS
        .iter()
        .map(|(id, _, cause)| (*id, *cause))
        .collect();
    for (id, _) in &causes {
        assert_eq!(handled(store, id), 0, "{id} never completes");
    }
    assert_dead_lettered(dir, &causes);
}

#[test]
fn isolated_every_crash_costs_a_worker_never_the_host_on_postgres() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    configure_isolated(dir.path(), &pg.config(), "");
    run(dir.path(), &["db", "setup"]).output().expect_code(0);
    send_goods_and_culprits(dir.path());
    // One run: the host outlives every crash and finishes the flow.
    run(dir.path(), &["--test-mode"]).output().expect_code(0);
    let store = open(dir.path(), Some(&pg));
    assert_only_culprits_lost(dir.path(), store.as_ref());
    assert!(
        store.recorded_calls(COMMANDS, None).unwrap().is_empty(),
        "every call record cleared by its settlement"
    );
}

#[test]
fn isolated_three_replicas_on_redis_outlive_every_crash() {
    let (_redis, dir, store) = on_redis_streams(true);
    let mut replicas: Vec<Server> = (0..3).map(|_| serve(dir.path())).collect();
    send_goods_and_culprits(dir.path());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for replica in &mut replicas {
            assert_eq!(replica.exited(), None, "no replica dies");
        }
        let waiting: Vec<String> = (0..10)
            .map(|n| format!("good-{n}"))
            .filter(|id| handled(store.as_ref(), id) == 0)
            .collect();
        let dead = dead_letters(dir.path()).len();
        if waiting.is_empty() && dead == CULPRITS.len() {
            break;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = replicas.into_iter().map(|r| r.stop().1).collect();
            panic!(
                "still waiting for {waiting:?}, {dead} dead letters:\n{}",
                logs.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_only_culprits_lost(dir.path(), store.as_ref());
    for replica in replicas {
        replica.stop_cleanly();
    }
}

/// How many times the probe was called for command `id`, from the logs of every replica.
fn calls_logged(logs: &[String], id: &str) -> usize {
    let needle = format!("probe {id} attempt ");
    logs.iter().map(|log| log.matches(&needle).count()).sum()
}

#[test]
fn a_long_call_or_a_long_retry_keeps_its_entry_on_its_replica() {
    // Entries idle for a second are taken over (`claim_idle_ms = 1000`); the call takes three, and
    // so does the wait for the retry: a live replica's entries must stay its own meanwhile.
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    configure(
        dir.path(),
        &redis.config(),
        "",
        "subscription_type = \"stream\"\nretry_delay_ms = 3000\nmax_retry_delay_ms = 3000",
    );
    let replicas: Vec<Server> = (0..2).map(|_| serve(dir.path())).collect();
    send(dir.path(), &[("slow", "sleep:3000"), ("retried", "fail:1")]);
    let store = open(dir.path(), None);
    wait_until(LIMIT, "both commands handled", || {
        handled(store.as_ref(), "slow") == 1 && handled(store.as_ref(), "retried") == 1
    });
    let logs: Vec<String> = replicas.into_iter().map(Server::stop_cleanly).collect();
    assert_eq!(calls_logged(&logs, "slow"), 1, "{logs:#?}");
    assert_eq!(calls_logged(&logs, "retried"), 2, "{logs:#?}");
    assert!(dead_letters(dir.path()).is_empty());
}

#[test]
fn three_replicas_on_postgres_take_over_a_crashed_readers_lease_and_dead_letter_the_culprit() {
    // The command handler reads the event store: one replica at a time holds its lease. Each holder
    // that dies in a call leaves its busy mark; the next holder counts it and calls one by one.
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    configure(
        dir.path(),
        &pg.config(),
        "lease_ttl_ms = 1500\npoll_interval_ms = 100",
        "",
    );
    run(dir.path(), &["db", "setup"]).output().expect_code(0);
    let store = open(dir.path(), Some(&pg));
    let deaths = three_replicas_survive_an_aborting_command(
        dir.path(),
        PROBE,
        store.as_ref(),
        &["culprit"],
        || {},
        1,
        &|| true,
    );
    assert_eq!(
        deaths.len(),
        MAX_RETRIES + 1,
        "one death per call: {deaths:?}"
    );
    assert!(
        deaths.iter().all(|s| by_signal(libc::SIGABRT)(*s)),
        "{deaths:?}"
    );
    assert!(store.recorded_calls(COMMANDS, None).unwrap().is_empty());
}

/// A replica of `dir` and the address of its health server.
fn serve_watched(dir: &Path) -> (Server, String) {
    let mut server = serve(dir);
    let address = server.health_address();
    (server, address)
}

#[test]
fn three_replicas_on_redis_outlast_a_handler_that_never_returns() {
    // In process a spinning call cannot be stopped: the replica keeps its entry (it is alive) and
    // fails `/livez`; the supervisor kills it, and the entry moves to another replica, which gets
    // stuck in turn, until the culprit is out of retries.
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    configure(
        dir.path(),
        &format!("[server.health]\nport = 0\n{}", redis.config()),
        "",
        "subscription_type = \"stream\"\nhandler_timeout_ms = 300",
    );
    let mut commands: Vec<(String, &str)> = (0..10).map(|n| (format!("good-{n}"), "ok")).collect();
    commands.insert(5, ("culprit".into(), "spin"));
    let refs: Vec<(&str, &str)> = commands.iter().map(|(id, b)| (id.as_str(), *b)).collect();
    send(dir.path(), &refs);
    let store = open(dir.path(), None);
    publish_before_serving(dir.path(), store.as_ref());
    let mut replicas: Vec<(Server, String)> = (0..3).map(|_| serve_watched(dir.path())).collect();
    let mut stuck = 0;
    wait_until(
        Duration::from_secs(120),
        "every good command handled and the culprit dead-lettered",
        || {
            // The supervisor: a replica failing its liveness probe is killed and started again.
            for (replica, address) in &mut replicas {
                assert_eq!(replica.exited(), None, "only the supervisor ends a replica");
                let (status, body) = get(address, "/livez");
                if status == 503 {
                    assert!(body.contains("past its deadline of 300 ms"), "{body}");
                    stuck += 1;
                    replica.signal(libc::SIGKILL);
                    (*replica, *address) = serve_watched(dir.path());
                }
            }
            let good = (0..10).all(|n| handled(store.as_ref(), &format!("good-{n}")) >= 1);
            good && dead_letters(dir.path()).len() == 1
        },
    );
    assert_eq!(stuck, MAX_RETRIES + 1, "one stuck replica per call");
    for n in 0..10 {
        assert_eq!(
            handled(store.as_ref(), &format!("good-{n}")),
            1,
            "good-{n} once"
        );
    }
    assert_culprit_dead_lettered(dir.path(), "culprit");
    for (replica, address) in replicas {
        assert_eq!(get(&address, "/livez").0, 200, "no replica left stuck");
        replica.stop_cleanly();
    }
}
