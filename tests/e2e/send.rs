//! `protean-host send` answers what became of a command: committed (0), not committed (1, with why),
//! or unknown (3, with the command that retries it safely); a retry with the same idempotency key
//! stores nothing twice.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use protean_host::store::{PostgresStore, Store, StoredMessage};
use serde_json::Value;

use crate::support::{host, orders, place, sample_domain, sqlite, wait_until, Finished, PgServer};

const COMMANDS: &str = "fulfilment::order:command";

fn send(dir: &Path, extra: &[&str], order: usize) -> Finished {
    let lib = sample_domain().display().to_string();
    host(dir)
        .args(["send", "--domain", &lib, "Fulfilment.PlaceOrder.v1"])
        .args([place(order).to_string()])
        .args(extra)
        .output()
}

/// A set-up PostgreSQL store, and its `[store]` section pointing at `port` (the server's, or a proxy's).
fn store(pg: &PgServer) -> PostgresStore {
    let store = PostgresStore::connect(&pg.store_config()).unwrap();
    store.setup().unwrap();
    store
}

fn config_via(dir: &Path, port: u16) {
    let text = format!(
        "[store]\nprovider = \"postgres\"\nuri = \"postgresql://postgres@127.0.0.1:{port}/postgres\"\n"
    );
    std::fs::write(dir.join("protean.toml"), text).unwrap();
}

fn commands(store: &dyn Store) -> Vec<StoredMessage> {
    store
        .read_categories(&[COMMANDS.into()], 0, usize::MAX)
        .unwrap()
}

fn key_of(message: &StoredMessage) -> String {
    let metadata: Value = serde_json::from_str(&message.metadata).unwrap();
    metadata["headers"]["idempotency_key"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_send_retried_with_its_idempotency_key_stores_one_command() {
    let pg = PgServer::start();
    let store = store(&pg);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("protean.toml"), pg.config()).unwrap();
    let first = send(dir.path(), &["--idempotency-key", "order-7"], 7).expect_code(0);
    let again = send(dir.path(), &["--idempotency-key", "order-7"], 7).expect_code(0);
    assert_eq!(again.stdout(), first.stdout(), "the first command's id");
    assert!(
        again.stderr().contains("already committed"),
        "{}",
        again.stderr()
    );
    let stored = commands(&store);
    assert_eq!(stored.len(), 1, "one command stored");
    assert_eq!(key_of(&stored[0]), "order-7");
    assert_eq!(first.stdout().trim(), stored[0].id);
    // Without a key each send has its own (generated) one.
    send(dir.path(), &[], 8).expect_code(0);
    send(dir.path(), &[], 8).expect_code(0);
    assert_eq!(commands(&store).len(), 3);
}

#[test]
fn bad_idempotency_keys_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let long = "k".repeat(201);
    for (key, says) in [("", "is empty"), (long.as_str(), "201 bytes long")] {
        let run = send(dir.path(), &["--idempotency-key", key], 1).expect_code(1);
        let errors = run.error_lines();
        assert_eq!(errors.len(), 1, "{}", run.stderr());
        assert!(errors[0].contains(says), "{}", errors[0]);
    }
    assert!(
        !dir.path().join(".protean").exists(),
        "refused before the store was opened"
    );
}

/// What the proxy does with the connection that sends `COMMIT`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Forward the commit, drop its answer and the connection, and accept nothing until resumed (the
    /// database went away right after committing).
    AndRefuse,
    /// Forward the commit, drop its answer and the connection, and go on accepting (only that
    /// connection was lost).
    Once,
}

/// A TCP proxy to PostgreSQL that loses the answer to the first `COMMIT` it forwards.
struct Proxy {
    port: u16,
    refusing: Arc<AtomicBool>,
}

/// What the proxy's connections share.
#[derive(Default)]
struct Shared {
    /// Whether the next `COMMIT` is to be cut.
    armed: AtomicBool,
    /// Whether the database "went away": connections are refused until resumed.
    refusing: Arc<AtomicBool>,
    /// The client side of every connection, to close them all when the database goes away.
    clients: Mutex<Vec<TcpStream>>,
}

impl Shared {
    /// The commit's answer is lost: close this connection, or every one when the database goes away.
    fn cut(&self, client: &TcpStream, server: &TcpStream, cut: Cut) {
        if cut == Cut::AndRefuse {
            // Under the lock the accepting thread registers under: a connection accepted meanwhile is
            // either closed here or refused there, never left open (the pool opens one in the
            // background, which once found the command through it and answered "committed").
            let clients = self.clients.lock().unwrap();
            self.refusing.store(true, Ordering::SeqCst);
            for other in clients.iter() {
                let _ = other.shutdown(Shutdown::Both);
            }
        }
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    }
}

/// The simple-query message `COMMIT` (`Q`, length 11, the text with its NUL), as `postgres` sends it.
const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

impl Proxy {
    fn start(upstream: u16, cut: Cut) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        shared.armed.store(true, Ordering::SeqCst);
        let refusing = shared.refusing.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                {
                    let mut clients = shared.clients.lock().unwrap();
                    if shared.refusing.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection closed at once
                    }
                    clients.push(client.try_clone().unwrap());
                }
                let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                let shared = shared.clone();
                std::thread::spawn(move || relay(client, server, &shared, cut));
            }
        });
        Self { port, refusing }
    }

    fn resume(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }
}

/// Copy both ways; after forwarding the armed `COMMIT`, swallow the server's answer and close both.
fn relay(client: TcpStream, server: TcpStream, shared: &Arc<Shared>, cut: Cut) {
    let swallow = Arc::new(AtomicBool::new(false));
    let (mut from_server, mut to_client) =
        (server.try_clone().unwrap(), client.try_clone().unwrap());
    let (back, back_shared) = (swallow.clone(), shared.clone());
    let (client_end, server_end) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        while let Ok(n) = from_server.read(&mut buf) {
            if n == 0 {
                break;
            }
            if back.load(Ordering::SeqCst) {
                // The commit is done on the server; its answer never reaches the client.
                back_shared.cut(&client_end, &server_end, cut);
                return;
            }
            if to_client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = client_end.shutdown(Shutdown::Both);
    });
    let (mut from_client, mut to_server) = (client, server);
    let mut buf = [0u8; 16384];
    while let Ok(n) = from_client.read(&mut buf) {
        if n == 0 {
            break;
        }
        let commit = buf[..n].windows(COMMIT.len()).any(|w| w == COMMIT);
        if commit && shared.armed.swap(false, Ordering::SeqCst) {
            swallow.store(true, Ordering::SeqCst);
        }
        if to_server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to_server.shutdown(Shutdown::Both);
}

/// The database commits the command, then the connection and the database go away before the answer
/// arrives: `send` cannot know, says so (exit 3) with the key and the command that retries safely, and
/// that retry answers "already committed": one command stored. Before, `send` said "not sent" (exit 1)
/// and a retry stored the order twice.
#[test]
fn a_commit_whose_answer_is_lost_is_unknown_and_its_retry_stores_nothing_new() {
    let pg = PgServer::start();
    let store = store(&pg);
    let proxy = Proxy::start(pg_port(&pg), Cut::AndRefuse);
    let dir = tempfile::tempdir().unwrap();
    config_via(dir.path(), proxy.port);
    let run = send(dir.path(), &["--idempotency-key", "order-1"], 1).expect_code(3);
    let stderr = run.stderr();
    assert!(stderr.contains("outcome unknown"), "{stderr}");
    assert!(
        run.stdout().is_empty(),
        "no id: nothing is known to be stored"
    );
    assert_eq!(commands(&store).len(), 1, "the commit did land");
    let retry = stderr
        .lines()
        .find_map(|l| l.strip_prefix("retry safely (it stores the command at most once): "))
        .unwrap_or_else(|| panic!("no retry command in {stderr}"));
    assert!(retry.contains("--idempotency-key order-1"), "{retry}");
    proxy.resume();
    let retried = std::process::Command::new("sh")
        .args(["-c", retry])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let retried = Finished(retried).expect_code(0);
    assert!(
        retried.stderr().contains("already committed"),
        "{}",
        retried.stderr()
    );
    let stored = commands(&store);
    assert_eq!(stored.len(), 1, "the retry stored nothing new");
    assert_eq!(retried.stdout().trim(), stored[0].id);
}

/// Only the committing connection is lost and the database still answers: `send` looks its key up and
/// answers "committed" (exit 0) with the command's id, instead of "not sent".
#[test]
fn a_commit_whose_answer_is_lost_is_found_by_its_key() {
    let pg = PgServer::start();
    let store = store(&pg);
    let proxy = Proxy::start(pg_port(&pg), Cut::Once);
    let dir = tempfile::tempdir().unwrap();
    config_via(dir.path(), proxy.port);
    let run = send(dir.path(), &[], 1).expect_code(0);
    assert!(
        run.stderr()
            .contains("the connection failed while committing"),
        "{}",
        run.stderr()
    );
    let stored = commands(&store);
    assert_eq!(stored.len(), 1);
    assert_eq!(run.stdout().trim(), stored[0].id);
}

fn pg_port(pg: &PgServer) -> u16 {
    let uri = pg.uri();
    let port = uri.rsplit(':').next().unwrap().split('/').next().unwrap();
    port.parse().unwrap()
}

/// PostgreSQL restarts while `send` waits inside its transaction (another session holds the append
/// lock): the commit was never asked for, so `send` answers "not committed" (exit 1, with the server's
/// reason) and the retry with the same key stores the command once.
#[test]
fn a_restart_before_the_commit_is_not_committed_and_the_retry_stores_once() {
    let mut pg = PgServer::start();
    let store = store(&pg);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("protean.toml"), pg.config()).unwrap();
    // The store's append lock (protean.append_unit, migration 16), held by another session.
    let mut holder = std::process::Command::new("psql")
        .args(["-X", "-q", "-d", &pg.uri(), "-c"])
        .arg("SELECT pg_advisory_lock(7362836200114529281); SELECT pg_sleep(600)")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the other session holding the lock",
        || pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted") == "1",
    );
    let lib = sample_domain().display().to_string();
    let sending = host(dir.path())
        .args(["send", "--domain", &lib, "--idempotency-key", "order-2"])
        .args(["Fulfilment.PlaceOrder.v1", &place(2).to_string()])
        .spawn();
    wait_until(
        Duration::from_secs(30),
        "send waiting for the append lock",
        || {
            pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%protean.append_unit%'") == "1"
        },
    );
    pg.restart();
    let _ = holder.kill();
    let _ = holder.wait();
    let (code, stderr) = sending.wait();
    assert_eq!(code, Some(1), "{stderr}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        error.contains("not committed (idempotency key order-2)"),
        "{stderr}"
    );
    // The restart ended this test's own pooled connections too: a new store, new connections.
    drop(store);
    let store = PostgresStore::open(&pg.store_config()).unwrap();
    assert!(commands(&store).is_empty(), "nothing stored");
    send(dir.path(), &["--idempotency-key", "order-2"], 2).expect_code(0);
    assert_eq!(commands(&store).len(), 1);
}

/// With `-`, line N of a keyed send uses `KEY:N`: sending the same file again stores nothing new.
#[test]
fn stdin_lines_get_their_own_keys_and_a_second_run_stores_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    let lib = sample_domain().display().to_string();
    let run = || {
        host(dir.path())
            .args(["send", "--domain", &lib, "--idempotency-key", "batch"])
            .args(["Fulfilment.PlaceOrder.v1", "-"])
            .output_with_stdin(&orders(0, 3))
            .expect_code(0)
    };
    let first = run();
    let second = run();
    assert_eq!(second.stdout(), first.stdout(), "the same three ids");
    assert_eq!(second.stderr().matches("already committed").count(), 3);
    let stored = commands(sqlite(dir.path()).as_ref());
    let keys: Vec<String> = stored.iter().map(key_of).collect();
    assert_eq!(keys, ["batch:1", "batch:2", "batch:3"]);
}
