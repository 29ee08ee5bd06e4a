//! The WAL checkpointer of a SQLite store: a thread of its own copies the WAL into the database file.
//!
//! SQLite checkpoints on the connection whose commit fills the WAL past its limit, before that commit
//! returns: the commit then waits while the database file is written and fsynced (about 200 ms for a
//! WAL of 16 MiB on this machine), and every writer queued behind it waits too. Measured on the
//! scheduler: one schedule in fifty fired about 180 ms late, in bursts, once per checkpoint. Here the
//! writer never checkpoints (`wal_autocheckpoint = 0`); this thread checkpoints `PASSIVE`ly a few times
//! a second, which waits for no reader and no writer, so commits go on while it runs.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use rusqlite::Connection;

/// How often the WAL is checkpointed. A checkpoint with nothing to copy reads only the WAL index.
const EVERY: Duration = Duration::from_millis(200);

/// The running checkpointer; stopped when dropped (without a last checkpoint: a short-lived command
/// that opened the store must not pay for copying what a busy server wrote).
#[derive(Debug)]
pub(super) struct Checkpointer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Checkpoint the store file at `path` from now on, on a connection of its own.
    pub(super) fn start(path: &Path) -> rusqlite::Result<Self> {
        let connection = Connection::open(path)?;
        connection.busy_timeout(Duration::from_secs(5))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || run(&connection, &stopped))
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

fn run(connection: &Connection, stop: &AtomicBool) {
    loop {
        std::thread::park_timeout(EVERY);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        checkpoint(connection);
    }
}

fn checkpoint(connection: &Connection) {
    // Busy (another process checkpoints) or failing: the next round tries again; a WAL that is not
    // copied yet costs only its size, never a commit.
    let checkpointed = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
    if let Err(error) = checkpointed {
        tracing::debug!(%error, "WAL checkpoint did not run; trying again");
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        message::Kind,
        store::{SqliteStore, Store},
        unit_of_work::{NewMessage, UnitOfWork},
    };

    /// The database file grows only by checkpoints (commits go to the WAL, and the writer never
    /// checkpoints): a file that grows under commits is this thread's work.
    #[test]
    fn commits_reach_the_database_file_through_the_checkpointer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        let size = || std::fs::metadata(&path).unwrap().len();
        let before = size();
        let data = serde_json::json!({ "padding": "x".repeat(4000) });
        for n in 0..200 {
            let stream = format!("t::x-{n}");
            let message = NewMessage::new(Kind::Event, &stream, "T.A.v1", &data, None, None, None);
            let unit = UnitOfWork {
                messages: vec![message],
                ..UnitOfWork::default()
            };
            store.commit(&unit).unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while size() < before + 500_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was not copied into the file: {} bytes, {before} before",
                size()
            );
            std::thread::park_timeout(super::EVERY);
        }
        assert_eq!(store.read_stream("t::x-199", 0).unwrap().len(), 1);
    }
}
