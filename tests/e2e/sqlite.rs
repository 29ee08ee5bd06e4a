//! The SQLite store under the real binary: what it writes besides its own files.

use std::path::PathBuf;

use protean_host::unit_of_work::{NewMessage, UnitOfWork};

use crate::support::{fixture_domain, host, sqlite, ticked, Created, TEST_CONFIG};

/// A unit of a full batch inserts its processed markers in one statement. SQLite journals such a
/// statement on its own unless it cannot fail halfway, and past 64 KiB of changed pages that journal
/// spilled to a temporary file: created, written and unlinked (in `/var/tmp`, which a read-only
/// container may not even offer) on every commit. Handling 450 messages, four full batches and a
/// rest, makes no file in the directory SQLite is told to make them in, and marks each message once.
/// Long stream names make each marker row about 350 bytes, so that a batch's statement changes
/// enough pages to spill (the default `INSERT` made a file for each batch after the first).
#[test]
fn full_batches_of_markers_make_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("protean.toml"), TEST_CONFIG).unwrap();
    let store = sqlite(dir.path());
    let ticks: Vec<NewMessage> = (0..450).map(|n| ticked(&stream(n % 7), n)).collect();
    store
        .commit(&UnitOfWork {
            messages: ticks,
            ..UnitOfWork::default()
        })
        .unwrap();
    drop(store);
    let temp = tempfile::tempdir().unwrap();
    let created = Created::watch(temp.path());
    let run = host(dir.path())
        .args(["--test-mode", "--domain"])
        .args([format!("{}:noop", fixture_domain().display())])
        .env("SQLITE_TMPDIR", temp.path())
        .output();
    assert_eq!(run.code(), Some(0), "{}", run.stderr());
    let store = sqlite(dir.path());
    let streams: Vec<String> = (0..7).map(stream).collect();
    let streams: Vec<&str> = streams.iter().map(String::as_str).collect();
    let identities: Vec<String> = store
        .read_streams(&streams)
        .unwrap()
        .iter()
        .map(|m| m.identity())
        .collect();
    let identities: Vec<&str> = identities.iter().map(String::as_str).collect();
    assert_eq!(identities.len(), 450);
    let marked = store.processed("noop", &identities).unwrap();
    assert_eq!(marked.len(), 450, "every message is marked");
    assert_eq!(
        created.since(),
        Vec::<PathBuf>::new(),
        "files made in SQLite's temporary directory"
    );
}

fn stream(n: u64) -> String {
    format!("probe::probe-{}-{n}", "x".repeat(300))
}
