//! The event-store reader's cursor: where it reads from after each batch, and when it goes back to
//! its position for a retry that is due.

use std::time::Duration;

use super::Cursor;
use crate::engine::batch::{Attempts, Report};

fn committed_to(position: u64) -> Report {
    Report {
        position: Some(position),
        complete: true,
        ..Report::default()
    }
}

/// A batch that failed as a whole (retry, no key waiting), having settled up to `position` if any.
fn failed_whole(position: Option<u64>) -> Report {
    Report {
        position,
        retry: Some(Duration::from_millis(5)),
        ..Report::default()
    }
}

/// An ordered batch whose key `key` waits for a retry, having settled up to `position` if any.
fn key_waits(key: &str, position: Option<u64>) -> Report {
    Report {
        position,
        retry: Some(Duration::from_secs(60)),
        waiting: vec![(key.to_owned(), Duration::from_secs(60))],
        ..Report::default()
    }
}

#[test]
fn a_single_reader_reads_from_its_position_after_every_batch() {
    let mut cursor = Cursor::new(10);
    assert_eq!(
        (cursor.position, cursor.at, cursor.ahead()),
        (10, 10, false)
    );
    assert!(!cursor.after(&committed_to(15), 20, false));
    assert_eq!((cursor.position, cursor.at), (15, 15));
    // A batch whose first message failed moves nothing: it is read again from the same place.
    assert!(cursor.after(&failed_whole(None), 30, false));
    assert_eq!((cursor.position, cursor.at), (15, 15));
    // A key that waits does not take a single reader past its position either.
    assert!(!cursor.after(&key_waits("a", None), 30, false));
    assert_eq!((cursor.at, cursor.ahead()), (15, false));
}

#[test]
fn a_worker_reads_on_past_a_waiting_key_but_rereads_a_batch_that_failed_whole() {
    let mut cursor = Cursor::new(10);
    // Key `a` waits at 11: the position stays before it, the worker reads on after the batch.
    assert!(!cursor.after(&key_waits("a", None), 20, true));
    assert_eq!((cursor.position, cursor.at, cursor.ahead()), (10, 20, true));
    // Its next batch settles nothing before `a`'s message: the position does not move.
    assert!(!cursor.after(&committed_to(10), 30, true));
    assert_eq!((cursor.position, cursor.at), (10, 30));
    // A batch that failed as a whole is read again from where it was read.
    assert!(cursor.after(&failed_whole(None), 40, true));
    assert_eq!((cursor.position, cursor.at), (10, 30));
}

#[test]
fn a_reader_ahead_goes_back_to_its_position_only_once_a_retry_is_due() {
    let mut cursor = Cursor::new(10);
    cursor.after(&key_waits("a", None), 20, true);
    let mut attempts = Attempts::default();
    let now = 1_000;
    attempts.wait("a", Duration::from_secs(60), now);
    cursor.rewind_when_due(&mut attempts, now);
    assert_eq!(cursor.at, 20, "not due yet: it reads on");
    assert!(attempts.waits("a", now));
    let later = now + 61_000;
    cursor.rewind_when_due(&mut attempts, later);
    assert_eq!(
        (cursor.at, cursor.mark),
        (10, 20),
        "due: back to the position"
    );
    assert!(!attempts.waits("a", later), "and the key is released");
}

#[test]
fn retries_due_sooner_than_a_reread_takes_do_not_keep_the_reader_from_reading_further() {
    let mut cursor = Cursor::new(10);
    cursor.after(&key_waits("a", None), 20, true);
    let mut attempts = Attempts::default();
    let now = 1_000;
    cursor.rewind_when_due(&mut attempts, now);
    assert_eq!((cursor.at, cursor.mark), (10, 20));
    // Read again, not yet past where it was at the last re-read: a due retry does not rewind it.
    cursor.after(&key_waits("a", None), 15, true);
    attempts.wait("a", Duration::ZERO, now);
    let due = now + 1_000;
    cursor.rewind_when_due(&mut attempts, due);
    assert_eq!(cursor.at, 15, "reads on to its mark first");
    // Past the mark, the due retry takes it back.
    cursor.after(&key_waits("a", None), 25, true);
    cursor.rewind_when_due(&mut attempts, due);
    assert_eq!((cursor.at, cursor.mark), (10, 25));
    // At the head it goes back too, even short of the mark.
    cursor.after(&key_waits("a", None), 12, true);
    cursor.at_head = true;
    attempts.wait("a", Duration::ZERO, now);
    cursor.rewind_when_due(&mut attempts, due);
    assert_eq!(cursor.at, 10);
}
