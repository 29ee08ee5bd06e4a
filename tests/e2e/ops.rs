//! Operations against the real binary: the health server over real HTTP (healthy, broker stopped,
//! shutting down, a stuck handler, bad requests, bad clients), a Prometheus scrape of a known workload,
//! `subscriptions status` and `health`.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::support::{
    fixture_domain, host,
    http::{get, raw, request},
    status_json, subscription, wait_until, Finished, RedisServer, Server, TEST_CONFIG,
};

const LIMIT: Duration = Duration::from_secs(60);

/// The health server on a free port, fast retries, and `extra` configuration.
fn configure(dir: &Path, extra: &str) {
    let config = format!("{TEST_CONFIG}{extra}\n[server.health]\nport = 0\nstall_after_ms = 400\n");
    std::fs::write(dir.join("protean.toml"), config).unwrap();
}

/// The probe's command handler on Redis streams (commands read the store unless told otherwise).
const COMMANDS_ON_STREAMS: &str = "[server.handlers.runner]\nsubscription_type = \"stream\"\n";

fn probe_lib() -> String {
    format!("{}:probe", fixture_domain().display())
}

fn send(dir: &Path, id: &str, behaviour: &str) {
    let data = json!({ "id": id, "behaviour": behaviour }).to_string();
    host(dir)
        .args(["send", "--domain", &probe_lib(), "Probe.Run.v1", &data])
        .output()
        .expect_code(0);
}

/// A server of the probe domain; returns it with the address its health server bound.
fn start(dir: &Path) -> (Server, String) {
    let mut server = host(dir).args(["--domain", &probe_lib()]).spawn();
    let address = server.health_address();
    (server, address)
}

fn readyz(address: &str) -> (u16, Value) {
    let (status, body) = get(address, "/readyz");
    (status, serde_json::from_str(&body).unwrap())
}

fn health_command(dir: &Path, address: &str) -> Finished {
    host(dir)
        .args(["health", "--url", &format!("http://{address}/readyz")])
        .output()
}

#[test]
fn a_healthy_server_answers_and_bad_requests_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), "");
    send(dir.path(), "a", "ok");
    let (server, address) = start(dir.path());
    for path in ["/healthz", "/livez"] {
        let (status, body) = get(&address, path);
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains("\"status\":\"ok\""), "{path}: {body}");
    }
    // Idle once a read after the commit found nothing more: lag 0 alone can be seen just before.
    wait_until(LIMIT, "the probe to be handled and its reader idle", || {
        let (_, body) = readyz(&address);
        let commands = subscription(&body, "commands:probe::probe");
        commands["lag"] == 0 && commands["state"] == "idle"
    });
    let (status, body) = readyz(&address);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["store"], "ok");
    let commands = subscription(&body, "commands:probe::probe");
    assert_eq!(commands["type"], "event_store");
    assert_eq!(commands["dead_letters"], 0);
    assert_eq!(commands["stalled"], false);
    assert_eq!(commands["state"], "idle");

    let (status, body) = get(&address, "/nope");
    assert_eq!(status, 404);
    assert_eq!(
        body,
        r#"{"error":"no endpoint /nope; use /healthz, /livez, /readyz or /metrics"}"#
    );
    let (status, body) = request(&address, "POST", "/readyz");
    assert_eq!(status, 405);
    assert_eq!(body, r#"{"error":"/readyz answers GET only, not POST"}"#);

    let probe = health_command(dir.path(), &address).expect_code(0);
    assert_eq!(probe.stdout(), "ready\n");
    drop(server);
}

#[test]
fn a_stuck_handler_with_messages_waiting_fails_readiness_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), "");
    let release = dir.path().join("release");
    send(dir.path(), "stuck", &format!("block:{}", release.display()));
    send(dir.path(), "waiting", "ok");
    let (mut server, address) = start(dir.path());
    server.wait_for_since_start(&["probe stuck attempt 1"], LIMIT);
    wait_until(LIMIT, "readiness to fail", || readyz(&address).0 == 503);
    let (_, body) = readyz(&address);
    let reasons = body["reasons"].to_string();
    assert!(
        reasons.contains("commands:probe::probe is stalled: handling a batch with work pending"),
        "{body}"
    );
    assert_eq!(
        subscription(&body, "commands:probe::probe")["stalled"],
        true
    );
    assert_eq!(subscription(&body, "chain")["stalled"], false, "{body}");
    let probe = health_command(dir.path(), &address).expect_code(1);
    assert!(
        probe
            .stdout()
            .starts_with("not ready: commands:probe::probe is stalled"),
        "{}",
        probe.stdout()
    );
    assert_eq!(probe.stdout().lines().count(), 1);

    std::fs::write(&release, "").unwrap();
    wait_until(LIMIT, "readiness to come back", || {
        readyz(&address).0 == 200
    });
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait().0, Some(0));
}

#[test]
fn readiness_fails_while_shutting_down_and_liveness_holds() {
    let dir = tempfile::tempdir().unwrap();
    // TEST_CONFIG ends in [server]: the grace period lands there.
    configure(dir.path(), "shutdown_grace_seconds = 60");
    let release = dir.path().join("release");
    send(dir.path(), "slow", &format!("block:{}", release.display()));
    let (mut server, address) = start(dir.path());
    server.wait_for_since_start(&["probe slow attempt 1"], LIMIT);
    server.signal(libc::SIGTERM);
    server.wait_for(&["engine stopping"], LIMIT);
    let (status, body) = readyz(&address);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["shutting_down"], true);
    assert!(
        body["reasons"].to_string().contains("shutting down"),
        "{body}"
    );
    assert_eq!(get(&address, "/livez").0, 200, "the runtime still answers");
    let (_, metrics) = get(&address, "/metrics");
    assert!(metrics.contains("protean_engine_up 0"), "{metrics}");
    std::fs::write(&release, "").unwrap();
    let (code, logs) = server.wait();
    assert_eq!(code, Some(0), "{logs}");
}

#[test]
fn readiness_fails_with_the_broker_stopped() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    configure(
        dir.path(),
        &format!("{}{COMMANDS_ON_STREAMS}", redis.config()),
    );
    send(dir.path(), "a", "ok");
    let (server, address) = start(dir.path());
    wait_until(LIMIT, "readiness with the broker up", || {
        readyz(&address).0 == 200
    });
    let (_, body) = readyz(&address);
    assert_eq!(body["checks"]["broker"], "ok");
    let commands = subscription(&body, "commands:probe::probe");
    assert_eq!(commands["type"], "stream");
    assert_eq!(commands["group"], "commands:probe::probe");
    redis.stop();
    wait_until(LIMIT, "readiness to fail", || readyz(&address).0 == 503);
    let (_, body) = readyz(&address);
    assert_eq!(body["status"], "not ready");
    assert!(
        body["checks"]["broker"]
            .as_str()
            .unwrap()
            .starts_with("unavailable"),
        "{body}"
    );
    assert_eq!(body["checks"]["store"], "ok");
    let probe = health_command(dir.path(), &address).expect_code(1);
    assert!(
        probe.stdout().starts_with("not ready: broker: unavailable"),
        "{}",
        probe.stdout()
    );
    drop(server);
}

/// Issue 14, item 4: an outbox that cannot publish is visible. Rows committed while Redis is away are
/// held (counted in `/metrics`), readiness names the outbox once the oldest waits longer than
/// `outbox_max_age_ms`, and both clear when Redis is back and the rows are published.
#[test]
fn readiness_and_metrics_show_an_outbox_that_waits() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{TEST_CONFIG}{}[outbox]\nmax_attempts = 2\nretry_delay_ms = 20\nmax_retry_delay_ms = 100\n\
         [server.health]\nport = 0\noutbox_max_age_ms = 300\n",
        redis.config()
    );
    std::fs::write(dir.path().join("protean.toml"), config).unwrap();
    let (server, address) = start(dir.path());
    wait_until(LIMIT, "readiness with the broker up", || {
        readyz(&address).0 == 200
    });
    redis.stop();
    send(dir.path(), "a", "ok");
    let outbox_reason = |body: &Value| {
        body["reasons"].as_array().unwrap().iter().any(|r| {
            r.as_str()
                .unwrap()
                .starts_with("outbox: its oldest pending row waits for")
        })
    };
    wait_until(LIMIT, "readiness to name the outbox, its row held", || {
        let body = readyz(&address).1;
        outbox_reason(&body) && body["outbox"]["held"].as_u64().unwrap_or(0) >= 1
    });
    wait_until(LIMIT, "the scrape to show the held row", || {
        sample(&scrape(&address), "protean_outbox_held", &[]) >= 1.0
    });
    let metrics = scrape(&address);
    // The probe command is handled from the store meanwhile, so its event may wait too.
    assert!(sample(&metrics, "protean_outbox_pending", &[]) >= 1.0);
    assert!(sample(&metrics, "protean_outbox_failing", &[]) >= 1.0);
    assert!(sample(&metrics, "protean_outbox_oldest_pending_age_seconds", &[]) > 0.3);
    redis.restart();
    wait_until(LIMIT, "readiness once the row is published", || {
        readyz(&address).0 == 200
    });
    let metrics = scrape(&address);
    assert_eq!(sample(&metrics, "protean_outbox_pending", &[]), 0.0);
    assert_eq!(
        sample(&metrics, "protean_outbox_oldest_pending_age_seconds", &[]),
        0.0
    );
    drop(server);
}

#[test]
fn garbage_and_stalled_clients_do_not_block_other_requests() {
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), "");
    let config = std::fs::read_to_string(dir.path().join("protean.toml")).unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        config + "request_timeout_ms = 500\n",
    )
    .unwrap();
    let (server, address) = start(dir.path());
    // Half a request, never finished.
    let mut stalled = TcpStream::connect(&address).unwrap();
    stalled
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Bytes that are not HTTP at all.
    let (status, _) = raw(&address, b"\x16\x03\x01\x00 not http\r\n\r\n");
    assert_eq!(status, 400, "garbage gets 400");
    let started = Instant::now();
    assert_eq!(get(&address, "/livez").0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered while a client stalls: {:?}",
        started.elapsed()
    );
    // The stalled client is cut off after the header timeout (the server closes the connection).
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let closed = Instant::now();
    let _ = stalled.read_to_end(&mut rest);
    assert!(
        closed.elapsed() < Duration::from_secs(5),
        "the stalled connection was closed by the server"
    );
    drop(server);
}

/// The value of the sample `name` with exactly `labels`.
pub(crate) fn sample(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let found = scrape.samples.iter().find(|s| {
        s.metric == name
            && labels.len() == s.labels.iter().count()
            && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    });
    match found.map(|s| &s.value) {
        Some(prometheus_parse::Value::Counter(v))
        | Some(prometheus_parse::Value::Gauge(v))
        | Some(prometheus_parse::Value::Untyped(v)) => *v,
        Some(prometheus_parse::Value::Histogram(buckets)) => {
            buckets.last().map_or(0.0, |b| b.count)
        }
        other => panic!("no sample {name} {labels:?}: {other:?}"),
    }
}

pub(crate) fn scrape(address: &str) -> prometheus_parse::Scrape {
    let (status, body) = get(address, "/metrics");
    assert_eq!(status, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("a Prometheus text scrape")
}

#[test]
fn a_scrape_shows_what_a_known_workload_did() {
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), "");
    for n in 0..5 {
        send(dir.path(), &format!("ok{n}"), "ok");
    }
    send(dir.path(), "bad", "reject");
    send(dir.path(), "flaky", "fail:1");
    let (server, address) = start(dir.path());
    let commands = [("subscription", "commands:probe::probe")];
    let runner = [
        ("subscription", "commands:probe::probe"),
        ("handler", "runner"),
    ];
    wait_until(LIMIT, "every probe handled", || {
        let s = scrape(&address);
        sample(&s, "protean_messages_handled_total", &runner) == 6.0
            && sample(&s, "protean_subscription_lag", &commands) == 0.0
    });
    let s = scrape(&address);
    assert_eq!(
        sample(&s, "protean_messages_dead_lettered_total", &commands),
        1.0
    );
    assert_eq!(sample(&s, "protean_handler_retries_total", &commands), 1.0);
    assert_eq!(sample(&s, "protean_handler_errors_total", &commands), 2.0);
    assert_eq!(
        sample(&s, "protean_subscription_dead_letters", &commands),
        1.0
    );
    assert_eq!(sample(&s, "protean_queue_depth", &commands), 0.0);
    assert_eq!(sample(&s, "protean_subscription_stalled", &commands), 0.0);
    assert_eq!(
        sample(&s, "protean_handler_duration_seconds_count", &runner),
        6.0
    );
    let spent = |phase| {
        sample(
            &s,
            "protean_subscription_seconds_total",
            &[("subscription", "commands:probe::probe"), ("phase", phase)],
        )
    };
    assert!(spent("handle") > 0.0 && spent("commit") > 0.0);
    assert_eq!(sample(&s, "protean_engine_up", &[]), 1.0);
    assert!(sample(&s, "protean_engine_uptime_seconds", &[]) > 0.0);
    assert_eq!(sample(&s, "protean_plugin_generation", &[]), 1.0);
    assert_eq!(sample(&s, "protean_plugin_reloads_total", &[]), 0.0);
    drop(server);
}

fn run_to_completion(dir: &Path) {
    host(dir)
        .args(["--domain", &probe_lib(), "--test-mode"])
        .output()
        .expect_code(0);
}

#[test]
fn subscriptions_status_shows_the_lag_and_dead_letters_a_workload_left() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("protean.toml"), TEST_CONFIG).unwrap();
    send(dir.path(), "bad", "reject");
    send(dir.path(), "good", "ok");
    run_to_completion(dir.path());
    for n in 0..4 {
        send(dir.path(), &format!("later{n}"), "ok");
    }
    let status = status_json(dir.path(), &probe_lib());
    let commands = subscription(&status, "commands:probe::probe");
    assert_eq!(commands["lag"], 4, "{commands}");
    assert_eq!(commands["dead_letters"], 1);
    assert_eq!(commands["state"], "behind");
    assert_eq!(commands["handlers"], json!(["runner"]));
    assert!(commands["position"].as_u64().unwrap() >= 2);
    let chain = subscription(&status, "chain");
    assert_eq!(
        (chain["lag"].clone(), chain["state"].clone()),
        (json!(0), json!("caught up"))
    );

    let text = host(dir.path())
        .args(["subscriptions", "status", "--domain", &probe_lib()])
        .output()
        .expect_code(0)
        .stdout();
    let row = text
        .lines()
        .find(|l| l.starts_with("commands:probe::probe"))
        .unwrap_or_else(|| panic!("{text}"));
    let figures: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        figures[1..7],
        [
            "event_store",
            "position",
            &commands["position"].to_string(),
            "4",
            "0",
            "1"
        ],
        "{text}"
    );
}

#[test]
fn subscriptions_status_reads_groups_and_dead_letter_streams_on_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("{TEST_CONFIG}{}{COMMANDS_ON_STREAMS}", redis.config()),
    )
    .unwrap();
    send(dir.path(), "bad", "reject");
    send(dir.path(), "good", "ok");
    run_to_completion(dir.path());
    for n in 0..3 {
        redis.cli(&[
            "XADD",
            "probe::probe:command",
            "*",
            "data",
            &format!("late {n}"),
        ]);
    }
    let status = status_json(dir.path(), &probe_lib());
    let commands = subscription(&status, "commands:probe::probe");
    assert_eq!(commands["type"], "stream");
    assert_eq!(commands["group"], "commands:probe::probe");
    assert_eq!(commands["lag"], 3, "{commands}");
    assert_eq!(commands["pending"], 0);
    assert_eq!(commands["dead_letters"], 1);
    assert!(commands["consumers"].as_u64().unwrap() >= 1, "{commands}");
}

#[test]
fn bad_health_settings_and_probes_fail_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (line, key) in [
        ("port = 70000", "server.health.port"),
        ("host = \"example\"", "server.health.host"),
        ("stall_after_ms = 0", "server.health.stall_after_ms"),
    ] {
        std::fs::write(
            dir.path().join("protean.toml"),
            format!("[server.health]\n{line}\n"),
        )
        .unwrap();
        let run = host(dir.path())
            .args(["--domain", &probe_lib()])
            .output()
            .expect_code(1);
        let errors = run.error_lines();
        assert_eq!(errors.len(), 1, "{}", run.stderr());
        assert!(errors[0].contains(key), "{line}: {}", errors[0]);
    }
    std::fs::write(dir.path().join("protean.toml"), "").unwrap();
    let bad_url = host(dir.path())
        .args(["health", "--url", "ftp://x/readyz"])
        .output()
        .expect_code(1);
    assert_eq!(
        bad_url.error_lines(),
        ["error: --url \"ftp://x/readyz\" is not an http:// URL; write http://HOST:PORT/readyz"]
    );
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = free.local_addr().unwrap();
    drop(free);
    let nobody = health_command(dir.path(), &closed.to_string()).expect_code(1);
    let errors = nobody.error_lines();
    assert_eq!(errors.len(), 1, "{}", nobody.stderr());
    assert!(errors[0].contains("cannot reach"), "{}", errors[0]);

    // Without --url the address comes from [server.health].
    std::fs::write(
        dir.path().join("protean.toml"),
        format!("[server.health]\nport = {}\n", closed.port()),
    )
    .unwrap();
    let from_config = host(dir.path()).args(["health"]).output().expect_code(1);
    let expected = format!(
        "error: cannot reach http://127.0.0.1:{}/readyz",
        closed.port()
    );
    assert!(
        from_config.error_lines()[0].starts_with(&expected),
        "{}",
        from_config.stderr()
    );
    std::fs::write(
        dir.path().join("protean.toml"),
        "[server.health]\nport = 0\n",
    )
    .unwrap();
    let free_port = host(dir.path()).args(["health"]).output().expect_code(1);
    assert_eq!(
        free_port.error_lines(),
        ["error: [server.health] port = 0 picks a free port at start; pass the logged address with --url"]
    );
}
