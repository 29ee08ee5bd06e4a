//! The WAL checkpointer of a SQLite store: a thread of its own copies the WAL into the database file.
//!
//! SQLite checkpoints on the connection whose commit fills the WAL past its limit, before that commit
//! returns: the commit then waits while the database file is written and fsynced (about 200 ms for a
//! WAL of 16 MiB on this machine), and every writer queued behind it waits too. Measured on the
//! scheduler: one schedule in fifty fired about 180 ms late, in bursts, once per checkpoint. Here the
//! writer never checkpoints (`wal_autocheckpoint = 0`); this thread checkpoints `PASSIVE`ly a few times
//! a second, which waits for no reader and no writer, so commits go on while it runs.
//!
//! The writer goes back to the WAL's start only when a checkpoint has copied every frame. With any lull
//! of a checkpoint period that happens by itself, and the commit that starts the WAL over cuts the file
//! back to [`KEEP`] (`journal_size_limit`). Under steady full load it never does: new frames always
//! arrive while a passive checkpoint copies (400,000 messages handled in one run grew the WAL to
//! 410 MB, and with no size limit the file stayed that large). So once the WAL holds more than
//! [`RESTART_AFTER`], this thread flushes the database file and copies once more (holding no lock),
//! then runs a `RESTART` checkpoint: it holds writers off while it copies the last frames and waits (at
//! most [`RESTART_WAIT`]) for readers of older snapshots, after which the next commit starts the WAL
//! over. Such a restart held writers off for 5–56 ms, and for 130 ms when readers kept it waiting (the
//! sample flow, seven restarts at a 64 MiB threshold, ran 4% slower), hence a threshold that a busy
//! server meets once per half a gigabyte written.

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
/// (Unit tests, here and below, use smaller figures: they reach them in a fraction of a second.)
const EVERY: Duration = Duration::from_millis(if cfg!(test) { 20 } else { 200 });

/// The WAL size past which it is made to start over.
const RESTART_AFTER: u64 = if cfg!(test) { 1 << 20 } else { 512 << 20 };

/// The size the WAL file is cut back to when it starts over (`journal_size_limit`).
pub(super) const KEEP: u64 = if cfg!(test) { 1 << 20 } else { 64 << 20 };

/// How long a restart waits for the writer in flight and for readers of older snapshots, holding other
/// writers off meanwhile; past it, the restart is tried again at the next checkpoint.
const RESTART_WAIT: Duration = Duration::from_millis(20);

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
        // Only a restart waits (a passive checkpoint never does), and it holds writers off meanwhile.
        connection.busy_timeout(RESTART_WAIT)?;
        let io = |e| rusqlite::Error::ToSqlConversionFailure(Box::new(e));
        let file = std::fs::File::open(path).map_err(io)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || run(&connection, &file, &stopped))
            .map_err(io)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

/// Checkpoint every [`EVERY`] until `stop`; restart the WAL when it has grown past [`RESTART_AFTER`].
/// `file` is the database file, to flush before a restart.
fn run(connection: &Connection, file: &std::fs::File, stop: &AtomicBool) {
    let page_size: u64 = connection
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap_or(4096);
    loop {
        std::thread::park_timeout(EVERY);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let frames = checkpoint(connection, "PASSIVE");
        if frames.is_some_and(|f| f * page_size > RESTART_AFTER) {
            // What the checkpoints copied reaches the disk, and what came meanwhile is copied, while
            // writers go on: the restart then has only its own last frames to copy and sync while it
            // holds them off.
            if let Err(error) = file.sync_data() {
                tracing::debug!(%error, "cannot flush the database file before a WAL restart");
            }
            checkpoint(connection, "PASSIVE");
            checkpoint(connection, "RESTART");
        }
    }
}

/// One checkpoint in `mode`; the frames the WAL holds, if it ran. Busy (another process checkpoints, or
/// a restart's wait ran out) or failing: the next round tries again; a WAL that is not copied yet
/// costs only its size, never a commit.
fn checkpoint(connection: &Connection, mode: &str) -> Option<u64> {
    let pragma = format!("PRAGMA wal_checkpoint({mode})");
    let result = connection.query_row(&pragma, [], |r| {
        Ok((r.get::<_, i64>(0)? != 0, r.get::<_, i64>(1)?))
    });
    match result {
        Ok((false, frames)) => Some(frames.max(0) as u64),
        Ok((true, _)) => {
            tracing::debug!(mode, "WAL checkpoint was busy; trying again");
            None
        }
        Err(error) => {
            tracing::debug!(mode, %error, "WAL checkpoint did not run; trying again");
            None
        }
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

    /// Steady commits never give a passive checkpoint the moment to let the WAL start over: before
    /// restarts, the WAL grew by everything written (here 25 times the restart size). Now it stays
    /// within the restart size and what one checkpoint period adds.
    #[test]
    fn a_wal_under_steady_commits_starts_over_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        let wal = dir.path().join("store.db-wal");
        let data = serde_json::json!({ "padding": "x".repeat(4000) });
        let (mut written, mut largest) = (0, 0);
        for n in 0.. {
            let messages = (0..10)
                .map(|i| {
                    let stream = format!("t::x-{n}-{i}");
                    NewMessage::new(Kind::Event, &stream, "T.A.v1", &data, None, None, None)
                })
                .collect();
            crate::store::tests::append(&store, messages).unwrap();
            written += 10 * 4000;
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            if written > 25 * super::RESTART_AFTER {
                break;
            }
        }
        assert!(
            largest < 8 * super::RESTART_AFTER,
            "the WAL grew to {largest} bytes for {written} written"
        );
        assert_eq!(store.read_stream("t::x-0-0", 0).unwrap().len(), 1);
    }
}
