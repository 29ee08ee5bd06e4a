//! The one way the host takes a `std` mutex.
//!
//! Invariant: every mutex of the host guards data that each critical section leaves consistent
//! (single assignments, inserts and removes), so a lock poisoned by a panic elsewhere still holds
//! usable data, and taking it never panics in turn.

use std::sync::{Mutex, MutexGuard};

/// Lock `mutex`, poisoned or not.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
