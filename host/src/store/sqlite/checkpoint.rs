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
//! of a checkpoint period that happens by itself. Under steady full load it never does: new frames
//! always arrive while a passive checkpoint copies (400,000 messages handled in one run grew the WAL to
//! 410 MB). So once the WAL holds more than [`RESTART_AFTER`], this thread flushes the database file and
//! copies once more (holding no lock), then runs a `RESTART` checkpoint: it holds writers off while it
//! copies the last frames and waits (at most [`RESTART_WAIT`]) for readers of older snapshots, after
//! which the next commit starts the WAL over. Such a restart held writers off for 5–56 ms. The
//! threshold was 512 MiB while the commit after a restart also cut the file (below): at 64 MiB the
//! sample flow then ran about 4% slower. Without the cut, 64 MiB measured the same as 512 MiB or
//! better (the sample flows, Redis consume, schedule lateness and latency, alternating), and a busy
//! server's WAL file stays within it, one checkpoint period's frames and what commits add while the
//! database file is flushed before the restart, instead of half a gigabyte. The flush is the disk's:
//! with another process writing and flushing large files, the unit tests' WAL grew to 11-21 times
//! their restart size between restarts, against 2-4 times on a quiet disk.
//!
//! A WAL that starts over keeps its file, and its size: frames are written over the old ones. No commit
//! cuts the file back (`journal_size_limit`): the commit that started the WAL over would do it, and it
//! waited, with every writer behind it, while the file system freed what was cut (a schedule due every
//! millisecond fired 150 ms late, once a run, at a p99 of 47–68 ms against 2 ms without the cut). This
//! thread cuts the file instead, once the store has been idle for [`IDLE_ROUNDS`] checkpoints and the
//! file is larger than [`KEEP`]: a `TRUNCATE` checkpoint, which holds writers off while it runs, at a
//! moment there are none.

use std::{
    path::{Path, PathBuf},
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
const RESTART_AFTER: u64 = if cfg!(test) { 1 << 20 } else { 64 << 20 };

/// The WAL file size past which an idle store's WAL is cut to nothing; below it the file is kept for
/// the next commits to write over.
const KEEP: u64 = if cfg!(test) { 1 << 20 } else { 64 << 20 };

/// Checkpoints in a row that found every frame copied and none added before the WAL file is cut: five
/// seconds, so that a server between bursts of work does not cut a file it is about to grow again.
const IDLE_ROUNDS: u32 = if cfg!(test) { 5 } else { 25 };

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
        let wal = wal_path(path);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || run(&connection, &file, &wal, &stopped))
            .map_err(io)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

/// The WAL file of the store file at `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

/// The size of the file at `path`; 0 when there is none.
fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Checkpoint every [`EVERY`] until `stop`; restart the WAL when it has grown past [`RESTART_AFTER`],
/// and cut its file `wal` when the store is idle ([`Idle`]). `file` is the database file, to flush
/// before a restart.
fn run(connection: &Connection, file: &std::fs::File, wal: &Path, stop: &AtomicBool) {
    let page_size: u64 = connection
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap_or(4096);
    let mut idle = Idle::default();
    loop {
        std::thread::park_timeout(EVERY);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Some(wal_now) = checkpoint(connection, "PASSIVE") else {
            continue;
        };
        if wal_now.frames * page_size > RESTART_AFTER {
            // What the checkpoints copied reaches the disk, and what came meanwhile is copied, while
            // writers go on: the restart then has only its own last frames to copy and sync while it
            // holds them off.
            if let Err(error) = file.sync_data() {
                tracing::debug!(%error, "cannot flush the database file before a WAL restart");
            }
            checkpoint(connection, "PASSIVE");
            checkpoint(connection, "RESTART");
        }
        // The file's size is only looked at once the store is idle: a `stat` a round is for nothing
        // while it is busy.
        if idle.after(wal_now, data_version(connection)) && file_size(wal) > KEEP {
            checkpoint(connection, "TRUNCATE");
        }
    }
}

/// What one checkpoint found in the WAL: its frames, and how many of them are in the database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wal {
    frames: u64,
    copied: u64,
}

/// Whether the store is idle: [`IDLE_ROUNDS`] checkpoints in a row found every frame copied and no
/// commit since the last. The frames alone cannot tell: a commit that finds every frame copied starts
/// the WAL over, so commits of one size, one a round, leave the same count each round.
#[derive(Debug, Default)]
struct Idle {
    last: Option<(Wal, Option<i64>)>,
    rounds: u32,
}

impl Idle {
    /// Count the checkpoint that found `wal`, with the store's data version after it; whether the store
    /// is idle after it. An unknown version is never the same as the last.
    fn after(&mut self, wal: Wal, version: Option<i64>) -> bool {
        let unchanged =
            version.is_some() && self.last == Some((wal, version)) && wal.copied == wal.frames;
        self.rounds = if unchanged { self.rounds + 1 } else { 0 };
        self.last = Some((wal, version));
        self.rounds >= IDLE_ROUNDS
    }
}

/// The store's data version as `connection` sees it: it changes with every commit of another
/// connection (`PRAGMA data_version`). None when it cannot be read.
fn data_version(connection: &Connection) -> Option<i64> {
    connection
        .query_row("PRAGMA data_version", [], |r| r.get(0))
        .ok()
}

/// One checkpoint in `mode`; what it found in the WAL, if it ran. Busy (another process checkpoints, or
/// a restart's wait ran out) or failing: the next round tries again; a WAL that is not copied yet
/// costs only its size, never a commit.
fn checkpoint(connection: &Connection, mode: &str) -> Option<Wal> {
    let pragma = format!("PRAGMA wal_checkpoint({mode})");
    let result = connection.query_row(&pragma, [], |r| {
        Ok((
            r.get::<_, i64>(0)? != 0,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    });
    match result {
        Ok((false, frames, copied)) => Some(Wal {
            frames: frames.max(0) as u64,
            copied: copied.max(0) as u64,
        }),
        Ok((true, _, _)) => {
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
        let (_dir, path, store) = opened();
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
    /// restarts, the WAL grew by everything written (here 25 times the restart size). Now it starts
    /// over again and again: 35-47 times here, and never without the restart (the file then grew to
    /// 118 MB, 16 KiB frames for these 40 KB commits). How large the file grows between restarts is
    /// the disk's to say, not this thread's alone: commits go on while the checkpointer flushes the
    /// database file before a restart, so a slow flush lets the WAL grow meanwhile (to about 4 MB on
    /// a quiet disk here, to 33 MB with another process writing and flushing 512 MiB files in a loop,
    /// where a bound on the size made this test fail), so the restarts are what is counted.
    #[test]
    fn a_wal_under_steady_commits_starts_over_instead_of_growing() {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let (_dir, path, store) = opened();
        let (written, largest, next) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        // Writers that queue for the store's writer connection: one always commits as soon as the
        // last has, so no checkpoint finds the WAL copied whole between two commits.
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    while written.load(Relaxed) <= 25 * super::RESTART_AFTER {
                        commit_ten(&store, next.fetch_add(1, Relaxed) as usize);
                        written.fetch_add(10 * 4000, Relaxed);
                        largest.fetch_max(wal_size(&path), Relaxed);
                    }
                });
            }
        });
        let (written, largest) = (written.into_inner(), largest.into_inner());
        let restarts = wal_restarts(&path);
        assert!(
            restarts >= 5,
            "the WAL started over {restarts} times while {written} bytes were written (its file grew to {largest})"
        );
        assert_eq!(store.read_stream("t::x-0-0", 0).unwrap().len(), 1);
    }

    /// How many times the WAL has started over: its header's checkpoint sequence number, which SQLite
    /// counts up at each restart (the WAL file format, bytes 12 to 15, big-endian).
    fn wal_restarts(path: &std::path::Path) -> u32 {
        use std::io::Read;
        let mut header = [0; 16];
        let mut wal = std::fs::File::open(super::wal_path(path)).unwrap();
        wal.read_exact(&mut header).unwrap();
        u32::from_be_bytes(header[12..].try_into().unwrap())
    }

    /// A new store in a directory of its own (kept while the first value lives), and its file's path.
    fn opened() -> (tempfile::TempDir, std::path::PathBuf, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        (dir, path, store)
    }

    /// Ten messages of 4,000 bytes in one commit: `n` names their streams.
    fn commit_ten(store: &SqliteStore, n: usize) {
        let data = serde_json::json!({ "padding": "x".repeat(4000) });
        let messages = (0..10)
            .map(|i| {
                let stream = format!("t::x-{n}-{i}");
                NewMessage::new(Kind::Event, &stream, "T.A.v1", &data, None, None, None)
            })
            .collect();
        crate::store::tests::append(store, messages).unwrap();
    }

    fn wal_size(path: &std::path::Path) -> u64 {
        super::file_size(&super::wal_path(path))
    }

    /// The commit that starts the WAL over writes over the old frames and leaves the file as it is:
    /// cutting it there made that commit, and every writer behind it, wait while the file system freed
    /// what was cut. Under steady commits the file only ever shrinks after the writer was idle.
    #[test]
    fn the_commit_that_starts_the_wal_over_keeps_its_file() {
        let (_dir, path, store) = opened();
        let (mut written, mut largest) = (0, 0);
        let mut last = (std::time::Instant::now(), 0);
        for n in 0.. {
            commit_ten(&store, n);
            written += 10 * 4000;
            let now = (std::time::Instant::now(), wal_size(&path));
            if now.1 < last.1 {
                let idle = now.0 - last.0;
                assert!(
                    idle >= super::EVERY,
                    "the WAL file shrank from {} to {} bytes within a commit, {idle:?} after the last one",
                    last.1,
                    now.1
                );
            }
            largest = largest.max(now.1);
            last = now;
            if written > 25 * super::RESTART_AFTER {
                break;
            }
        }
        // Frames were written over: the WAL started over (its size is the disk's to say, see above).
        let restarts = wal_restarts(&path);
        assert!(
            restarts >= 5,
            "the WAL started over {restarts} times while {written} bytes were written (its file grew to {largest})"
        );
    }

    /// A WAL file larger than [`super::KEEP`] is cut once the store is idle, and commits go on after.
    #[test]
    fn an_idle_stores_wal_file_is_cut() {
        let (_dir, path, store) = opened();
        // A reader of the first snapshot keeps the WAL from starting over until it is done, so that
        // the file grows past KEEP however fast this machine commits.
        let reader = rusqlite::Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        let mut n = 0;
        while wal_size(&path) <= super::KEEP {
            commit_ten(&store, n);
            n += 1;
        }
        reader.execute_batch("COMMIT").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while wal_size(&path) > super::KEEP {
            assert!(
                std::time::Instant::now() < deadline,
                "an idle WAL file stayed at {} bytes",
                wal_size(&path)
            );
            std::thread::park_timeout(super::EVERY);
        }
        commit_ten(&store, n);
        assert_eq!(
            store.read_stream(&format!("t::x-{n}-9"), 0).unwrap().len(),
            1
        );
        assert_eq!(store.read_stream("t::x-0-0", 0).unwrap().len(), 1);
        // Nothing committed before or after the cut is lost across a close and an open.
        drop(store);
        let store = SqliteStore::open(&path).unwrap();
        for k in 0..=n {
            for i in 0..10 {
                let stream = format!("t::x-{k}-{i}");
                assert_eq!(store.read_stream(&stream, 0).unwrap().len(), 1, "{stream}");
            }
        }
    }

    #[test]
    fn a_store_is_idle_after_rounds_that_found_every_frame_copied_and_no_commit() {
        let wal = |frames, copied| super::Wal { frames, copied };
        let mut idle = super::Idle::default();
        // Frames added each round, or some left to copy: never idle.
        for round in 0..10 {
            assert!(!idle.after(wal(round, round), Some(1)));
        }
        for _ in 0..10 {
            assert!(!idle.after(wal(20, 19), Some(1)));
        }
        // A commit each round that started the WAL over, always the same size: never idle.
        for version in 2..20 {
            assert!(!idle.after(wal(20, 20), Some(version)));
        }
        // A version that cannot be read: never idle.
        for _ in 0..10 {
            assert!(!idle.after(wal(20, 20), None));
        }
        let found: Vec<bool> = (0..=super::IDLE_ROUNDS)
            .map(|_| idle.after(wal(20, 20), Some(20)))
            .collect();
        assert_eq!(found.last(), Some(&true));
        assert_eq!(found.iter().filter(|idle| **idle).count(), 1);
        // A commit ends it.
        assert!(!idle.after(wal(24, 20), Some(21)));
    }

    /// A writer that commits a little less often than the checkpointer runs, one size every time: each
    /// commit finds every frame copied and starts the WAL over, so each checkpoint finds the same count
    /// of frames. That is no idle store, and its WAL file is not cut (it was, judged by the frames).
    #[test]
    fn a_wal_file_is_not_cut_under_commits_one_a_checkpoint() {
        let (_dir, path, store) = opened();
        let mut n = 0;
        while wal_size(&path) <= super::KEEP {
            commit_ten(&store, n);
            n += 1;
        }
        let mut last = (std::time::Instant::now(), wal_size(&path));
        for _ in 0..(4 * super::IDLE_ROUNDS) {
            // The pace is the load, not a wait for anything.
            std::thread::sleep(super::EVERY + super::EVERY / 4);
            commit_ten(&store, n);
            n += 1;
            let now = (std::time::Instant::now(), wal_size(&path));
            let gap = now.0 - last.0;
            assert!(
                now.1 >= last.1 || gap >= super::EVERY * super::IDLE_ROUNDS,
                "the WAL file was cut from {} to {} bytes between commits {gap:?} apart",
                last.1,
                now.1
            );
            last = now;
        }
    }
}
