//! What a hostile reader of the output, or a hostile local user, must not get: secrets in any output,
//! code loaded from a path another user can write.

use std::path::Path;

use crate::support::{host, sample_domain, Finished, PgServer, RedisServer, TEST_CONFIG};

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
    std::fs::write(dir.join("protean.toml"), format!("{TEST_CONFIG}{config}")).unwrap();
    let domain = sample_domain().display().to_string();
    let commands: [&[&str]; 5] = [
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
