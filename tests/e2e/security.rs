//! What a hostile reader of the output, or a hostile local user, must not get: secrets in any output,
//! code loaded from a path another user can write.

use std::{path::Path, process::Command, time::Duration};

use crate::support::{
    host, host_binary, sample_domain, Finished, PgServer, RedisServer, TEST_CONFIG,
};

/// A password with every character that trips a naive parser: `@`, `:` and a `%`-encoded `%`.
const PASSWORD_IN_URI: &str = "S3cr@t:pa%25ss";
/// The same password decoded, as the server sees it.
const PASSWORD: &str = "S3cr@t:pa%ss";

/// Fails when any piece of the password shows in the run's stdout or stderr.
#[track_caller]
fn assert_hidden(what: &str, run: &Finished) {
    let output = format!("{}\n{}", run.stdout(), run.stderr());
    for piece in ["S3cr", "pa%25ss", "pa%ss", "t:pa"] {
        assert!(
            !output.contains(piece),
            "{what}: the password ({piece:?}) was printed:\n{output}"
        );
    }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Run every command that reads the configuration with `--debug`, and check none prints the password
/// (and, when `shown`, that some output did name the connection, redacted).
fn every_command(dir: &Path, config: &str, label: &str, shown: bool) {
    let health = "[server.health]\nport = 0\n";
    std::fs::write(
        dir.join("protean.toml"),
        format!("{TEST_CONFIG}{health}{config}"),
    )
    .unwrap();
    server_outputs(dir, label);
    let domain = sample_domain().display().to_string();
    let send = [
        "--debug",
        "send",
        "--domain",
        &domain,
        "Fulfilment.PlaceOrder.v1",
    ];
    let commands: [&[&str]; 6] = [
        &[&send[..], &[r#"{"order_id": "o1"}"#]].concat(),
        &["--debug", "--test-mode", "--domain", &domain],
        &["--debug", "subscriptions", "status", "--domain", &domain],
        &["--debug", "dlq", "list", "--domain", &domain],
        &["--debug", "db", "status"],
        &["--debug", "inspect", "--domain", &domain],
    ];
    let mut redacted = false;
    for args in commands {
        let run = host(dir).args(args).output();
        assert_hidden(&format!("{label}: {args:?}"), &run);
        redacted |= run.stderr().contains("***") || run.stdout().contains("***");
    }
    assert!(
        redacted || !shown,
        "{label}: no output named the redacted connection string"
    );
}

/// The server outside test mode: its log lines until it started, failed, or waits for a dependency,
/// and then its `/readyz` answer; none may show the password.
fn server_outputs(dir: &Path, label: &str) {
    let mut server = host(dir)
        .args(["--debug", "--domain"])
        .args([sample_domain()])
        .spawn();
    let limit = Duration::from_secs(30);
    let line = server.wait_for_any(&["engine started", "waiting for it", "error:"], limit);
    let mut output = server.seen().join("\n");
    if line.contains("waiting for it") {
        let listening = server_lines(&mut server, "health server listening");
        let address = listening[0].split("address=").nth(1).unwrap();
        let address = address.split_whitespace().next().unwrap();
        let url = format!("http://{address}/readyz");
        let probe = host(dir).args(["health", "--url", &url]).output();
        output.push_str(&probe.stdout());
        assert!(
            probe.stdout().contains("***"),
            "{label}: {}",
            probe.stdout()
        );
    }
    for piece in ["S3cr", "pa%25ss", "pa%ss", "t:pa"] {
        assert!(
            !output.contains(piece),
            "{label}: the server printed the password ({piece:?}):\n{output}"
        );
    }
}

#[test]
fn no_output_of_any_command_shows_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let pg = PgServer::start();
    let port = redis
        .uri()
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    // Redis asks for another password: every command fails to authenticate.
    redis.cli(&["CONFIG", "SET", "requirepass", "another"]);
    let pg_down = closed_port();
    let pg_up = pg.uri();
    let cases = [
        (
            "redis refusing the password",
            format!("[brokers.default]\nuri = \"redis://app:{PASSWORD_IN_URI}@127.0.0.1:{port}/0\"\n"),
        ),
        (
            "redis unreachable",
            format!("[brokers.default]\nuri = \"rediss://:{PASSWORD_IN_URI}@127.0.0.1:{}/0\"\n", closed_port()),
        ),
        (
            "postgres unreachable, URI",
            format!("[store]\nprovider = \"postgres\"\nuri = \"postgresql://app:S3cr%40t%3Apa%25ss@127.0.0.1:{pg_down}/shop\"\n"),
        ),
        (
            // PostgreSQL's parser refuses a raw `@` in the password: the error must not quote it.
            "postgres, raw @ in the URI",
            format!("[store]\nprovider = \"postgres\"\nuri = \"postgresql://app:{PASSWORD_IN_URI}@127.0.0.1:{pg_down}/shop\"\n"),
        ),
        (
            "postgres unreachable, password in the query",
            format!("[store]\nprovider = \"postgres\"\nuri = \"postgresql://127.0.0.1:{pg_down}/shop?user=app&password=S3cr%40t%3Apa%25ss\"\n"),
        ),
        (
            "postgres unreachable, key = value",
            format!("[store]\nprovider = \"postgres\"\nuri = \"host=127.0.0.1 port={pg_down} user=app password = '{}'\"\n", PASSWORD.replace('\'', "\\\\'")),
        ),
        (
            "postgres up, password in the query",
            format!("[store]\nprovider = \"postgres\"\nuri = \"{pg_up}?password=S3cr%40t%3Apa%25ss\"\n"),
        ),
    ];
    for (label, config) in cases {
        every_command(dir.path(), &config, label, !label.contains("raw @"));
    }
}

/// The uid and gid of `nobody`: the other user of the hostile-user tests (they run as root).
const NOBODY: &str = "65534:65534";

#[track_caller]
fn sh(script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Names in `dir` that start with `protean-host-`.
fn copy_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("protean-host-"))
        .collect();
    names.sort();
    names
}

/// A pid that no process has now.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn private_copies_never_use_what_another_user_planted() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    sh(&format!("chmod 1777 {}", tmp.display()));
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    // Another user's leftovers, and one of ours from a process that died mid-load.
    let dead = dead_pid();
    let theirs = tmp.join(format!("protean-host-{dead}-theirs"));
    let stale = tmp.join(format!("protean-host-{dead}-stale"));
    std::fs::create_dir(&theirs).unwrap();
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("lib.so"), "old copy").unwrap();
    sh(&format!("chown -R {NOBODY} {}", theirs.display()));
    // The old copy directory's name was predictable (protean-host-<pid>): the other user creates it
    // for the pid the host will have (`exec` keeps the shell's), with symlinks at the copy's names.
    let script = format!(
        r#"set -e
d="$TMPDIR/protean-host-$$"
mkdir "$d"
b=$("$HOST" inspect --domain "$LIB" | sed -n '1s/.*(build \(.*\))$/\1/p')
test -n "$b"
ln -s "$VICTIM" "$d/libsample_domain-0-$b.so.part"
ln -s "$VICTIM" "$d/libsample_domain-0-$b.so"
chown -h -R {NOBODY} "$d"
chmod 0777 "$d"
echo "$d" > "$TMPDIR/../planted"
exec "$HOST" inspect --domain "$LIB""#
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir.path())
        .env("TMPDIR", &tmp)
        .env_remove("XDG_RUNTIME_DIR")
        .env("LIB", sample_domain())
        .env("VICTIM", &victim)
        .env("HOST", host_binary())
        .output()
        .unwrap();
    let run = Finished(out).expect_code(0);
    assert!(run.stdout().contains("instance domain"), "{}", run.stdout());
    assert!(
        std::fs::read(&victim).unwrap() == b"precious",
        "the host wrote through a symlink another user planted"
    );
    let planted = std::fs::read_to_string(dir.path().join("planted")).unwrap();
    let planted = Path::new(planted.trim())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut expected = vec![planted, format!("protean-host-{dead}-theirs")];
    expected.sort();
    assert_eq!(
        copy_dirs(&tmp),
        expected,
        "the host's own copy is gone, so is its stale one; the other user's are untouched"
    );
}

#[test]
fn a_temp_dir_others_can_rename_in_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    sh(&format!("chmod 0777 {}", tmp.display()));
    let run = host(dir.path())
        .env("TMPDIR", &tmp)
        .env("XDG_RUNTIME_DIR", dir.path().join("none"))
        .args(["inspect", "--domain"])
        .args([sample_domain()])
        .output()
        .expect_code(1);
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.stderr());
    assert!(
        errors[0].contains("without the sticky bit") && errors[0].contains("set TMPDIR"),
        "{errors:?}"
    );
}

/// Start `--reload` on `library`; the first error line, or None when it started watching.
fn reload_start(dir: &Path, library: &Path, extra: &[&str]) -> Option<String> {
    std::fs::write(
        dir.join("protean.toml"),
        "[server.health]\nenabled = false\n",
    )
    .unwrap();
    let mut server = host(dir)
        .args(["--reload", "--domain"])
        .args([library])
        .args(extra)
        .spawn();
    let limit = Duration::from_secs(30);
    let line = server.wait_for_any(&["error:", "watching the domain library"], limit);
    if line.contains("watching") {
        return None;
    }
    let (code, _) = server.wait();
    assert_eq!(code, Some(1), "{line}");
    Some(line)
}

#[test]
fn reload_refuses_code_other_users_can_write() {
    let dir = tempfile::tempdir().unwrap();
    let lib_dir = dir.path().join("lib");
    std::fs::create_dir(&lib_dir).unwrap();
    let library = lib_dir.join("libsample_domain.so");
    std::fs::copy(sample_domain(), &library).unwrap();
    let shown = lib_dir.display().to_string();

    sh(&format!("chmod 0777 {shown}"));
    let error =
        reload_start(dir.path(), &library, &[]).expect("a world-writable directory is refused");
    assert!(
        error.contains("writable by other users") && error.contains(&shown),
        "{error}"
    );

    sh(&format!("chmod 0755 {shown} && chown {NOBODY} {shown}"));
    let error =
        reload_start(dir.path(), &library, &[]).expect("another user's directory is refused");
    assert!(
        error.contains("belongs to uid 65534") && error.contains("--reload-owner 65534"),
        "{error}"
    );
    assert_eq!(
        reload_start(dir.path(), &library, &["--reload-owner", "nobody"]),
        None,
        "a pinned owner is allowed"
    );

    sh(&format!(
        "chown 0:0 {shown} && chmod 0666 {}",
        library.display()
    ));
    let error =
        reload_start(dir.path(), &library, &[]).expect("a world-writable library is refused");
    assert!(error.contains("writable by other users"), "{error}");
}

#[test]
fn the_sqlite_store_is_private_to_its_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("protean.toml"),
        "[server.health]\nenabled = false\n",
    )
    .unwrap();
    let mut server = host(dir.path())
        .args(["--domain"])
        .args([sample_domain()])
        .spawn();
    server.wait_for(&["engine started"], Duration::from_secs(60));
    let mode = |name: &str| {
        let meta = std::fs::metadata(dir.path().join(name)).unwrap();
        meta.permissions().mode() & 0o777
    };
    assert_eq!(mode(".protean"), 0o700);
    for file in ["store.db", "store.db-wal", "store.db-shm"] {
        assert_eq!(mode(&format!(".protean/{file}")), 0o600, "{file}");
    }
}

/// The first error line of `args` run with `config`, and how long the run took.
fn first_error(dir: &Path, config: &str, args: &[&str]) -> (String, Duration) {
    std::fs::write(dir.join("protean.toml"), config).unwrap();
    let started = std::time::Instant::now();
    let run = host(dir).args(args).output().expect_code(1);
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.stderr());
    (errors[0].clone(), started.elapsed())
}

#[test]
fn errors_carry_the_dependencys_own_reason_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PgServer::start();
    let redis = RedisServer::start();
    redis.cli(&["CONFIG", "SET", "requirepass", "right"]);
    pg.require_password("right");
    let at = pg.uri().replace("postgresql://postgres@", "");
    let store = |uri: &str| format!("[store]\nprovider = \"postgres\"\nuri = \"{uri}\"\n");
    let cases = [
        (
            store(&format!("postgresql://postgres:wrong@{at}")),
            "password authentication failed for user \"postgres\"",
        ),
        (
            store(&format!(
                "postgresql://postgres:right@{}",
                at.replace("/postgres", "/nope")
            )),
            "database \"nope\" does not exist",
        ),
    ];
    for (config, reason) in cases {
        let (error, took) = first_error(dir.path(), &config, &["db", "status"]);
        assert!(error.contains(reason), "{error}");
        assert!(took < Duration::from_secs(3), "took {took:?}: {error}");
    }
    let domain = sample_domain().display().to_string();
    let port = redis.uri().split(':').nth(2).unwrap().to_owned();
    for (uri, reason) in [
        (
            format!("redis://:wrong@127.0.0.1:{port}"),
            "refused the credentials",
        ),
        (format!("redis://127.0.0.1:{port}"), "NOAUTH"),
    ] {
        let config = format!("{TEST_CONFIG}[brokers.default]\nuri = \"{uri}\"\n");
        for args in [
            &["dlq", "list", "--domain", &domain][..],
            &["--test-mode", "--domain", &domain],
        ] {
            let (error, _) = first_error(dir.path(), &config, args);
            assert!(
                error.contains(reason) && error.contains("brokers.default.uri"),
                "{args:?}: {error}"
            );
        }
    }
}

#[test]
fn a_server_waits_for_postgres_and_redis_that_start_later() {
    let dir = tempfile::tempdir().unwrap();
    let (pg_port, redis_port) = (closed_port(), closed_port());
    std::fs::write(
        dir.path().join("protean.toml"),
        format!(
            "{TEST_CONFIG}[store]\nprovider = \"postgres\"\nuri = \"postgresql://postgres@127.0.0.1:{pg_port}/postgres\"\n\
             [brokers.default]\nuri = \"redis://127.0.0.1:{redis_port}/0\"\nblock_ms = 200\n\
             [server.health]\nport = 0\n"
        ),
    )
    .unwrap();
    let mut server = host(dir.path())
        .args(["--domain"])
        .args([sample_domain()])
        .spawn();
    let listening = server.wait_for(&["health server listening"], Duration::from_secs(30));
    let address = listening
        .split("address=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let first = server.wait_for(&["WARN", "not ready", "attempt=1"], Duration::from_secs(10));
    assert!(
        first.contains("store: cannot reach the PostgreSQL store"),
        "{first}"
    );
    let probe = host(dir.path())
        .args(["health", "--url", &format!("http://{address}/readyz")])
        .output()
        .expect_code(1);
    assert!(
        probe.stdout().contains("not ready: store: cannot reach"),
        "{}",
        probe.stdout()
    );

    let pg = PgServer::start_on(pg_port);
    host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(0);
    let _redis = RedisServer::start_on(redis_port);
    server.wait_for(&["engine started"], Duration::from_secs(60));
    crate::support::send_orders(dir.path(), 0, 3);
    let store = protean_host::store::PostgresStore::open(&pg.store_config()).unwrap();
    crate::support::wait_until(Duration::from_secs(60), "3 orders shipped", || {
        crate::support::count_of(&store, "fulfilment::order", "Fulfilment.OrderShipped.v1") == 3
    });
    let attempts: Vec<String> = server_lines(&mut server, "a dependency is not ready");
    assert!(
        attempts.len() < 12,
        "attempts grow sparse, one WARN line each: {attempts:#?}"
    );
}

/// Lines seen so far containing `needle`.
fn server_lines(server: &mut crate::support::Server, needle: &str) -> Vec<String> {
    server.seen_or_wait(&[needle], Duration::ZERO);
    server
        .seen()
        .iter()
        .filter(|l| l.contains(needle))
        .cloned()
        .collect()
}

#[test]
fn the_flow_runs_on_tls_only_postgres_and_redis() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    crate::support::make_certificates(&certs);
    let pg = PgServer::start_tls(&certs);
    let redis = RedisServer::start_tls(&certs);
    let file = |name: &str| certs.join(name).display().to_string();
    let ca = file("ca.pem");
    let store = |host: &str, tls: &str| {
        format!(
            "[store]\nprovider = \"postgres\"\nuri = \"postgresql://postgres@{host}:{}/postgres{tls}\"\n",
            pg.port()
        )
    };
    let broker = format!(
        "[brokers.default]\nuri = \"rediss://localhost:{}/0\"\ntls_ca_file = \"{ca}\"\n\
         tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nblock_ms = 200\n",
        redis.port(),
        file("client.pem"),
        file("client.key")
    );
    let full = store(
        "localhost",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    );
    let write = |config: &str| {
        std::fs::write(
            dir.path().join("protean.toml"),
            format!("{TEST_CONFIG}{config}"),
        )
        .unwrap()
    };
    write(&format!("{full}{broker}"));
    host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(0);
    crate::support::send_orders(dir.path(), 0, 3);
    let run = host(dir.path())
        .args(["--test-mode", "--domain"])
        .args([sample_domain()])
        .output()
        .expect_code(0);
    assert!(run.stdout().contains("completed"), "{}", run.stdout());
    let shipped = pg.psql(
        "SELECT count(*) FROM message_store.messages WHERE type = 'Fulfilment.OrderShipped.v1'",
    );
    assert_eq!(shipped, "3");

    // verify-ca takes any name; verify-full does not; without TLS the server says no.
    let verify_ca = store("127.0.0.1", &format!("?sslmode=verify-ca&sslrootcert={ca}"));
    let wrong_name = store(
        "127.0.0.1",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    );
    write(&verify_ca);
    host(dir.path())
        .args(["db", "status"])
        .output()
        .expect_code(0);
    for (config, reason) in [
        (wrong_name, "certificate not valid for name"),
        (store("localhost", ""), "no encryption"),
    ] {
        let (error, _) = first_error(
            dir.path(),
            &format!("{TEST_CONFIG}{config}"),
            &["db", "status"],
        );
        assert!(error.contains(reason), "{error}");
    }
    // Redis asks for a client certificate.
    let no_client_cert = format!(
        "[brokers.default]\nuri = \"rediss://localhost:{}/0\"\ntls_ca_file = \"{ca}\"\n",
        redis.port()
    );
    let domain = sample_domain().display().to_string();
    let (error, _) = first_error(
        dir.path(),
        &format!("{TEST_CONFIG}{no_client_cert}"),
        &["dlq", "list", "--domain", &domain],
    );
    assert!(error.contains("is unreachable"), "{error}");
}

#[test]
fn a_stop_signal_right_after_the_wait_for_the_store_is_not_lost() {
    // The wait listens for signals; a SIGTERM between its end and the engine's start used to be
    // caught and seen by nobody, and the server ran on.
    let dir = tempfile::tempdir().unwrap();
    let pg_port = closed_port();
    std::fs::write(
        dir.path().join("protean.toml"),
        format!(
            "{TEST_CONFIG}[store]\nprovider = \"postgres\"\nuri = \"postgresql://postgres@127.0.0.1:{pg_port}/postgres\"\n"
        ),
    )
    .unwrap();
    let mut server = host(dir.path())
        .args(["--domain"])
        .args([sample_domain()])
        .spawn();
    server.wait_for(&["a dependency is not ready"], Duration::from_secs(30));
    let _pg = PgServer::start_on(pg_port);
    host(dir.path())
        .args(["db", "setup"])
        .output()
        .expect_code(0);
    server.wait_for(
        &["the store and broker answer; starting"],
        Duration::from_secs(60),
    );
    server.signal(libc::SIGTERM);
    crate::support::wait_until(Duration::from_secs(30), "the server to stop", || {
        server.exited().is_some()
    });
    let (code, log) = server.wait();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("signal=\"SIGTERM\"") || log.contains("signal=SIGTERM"),
        "{log}"
    );
}
