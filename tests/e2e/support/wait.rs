//! Waiting for a condition that no event announces (another process's state).

use std::time::{Duration, Instant};

/// Wait until `done` holds, checking every 50 ms; fail after `limit`.
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
