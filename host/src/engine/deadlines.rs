//! Handler deadlines: every plugin call is registered with the time it may take.
//!
//! A call running in this process cannot be stopped (a thread cannot be killed safely), so a call past
//! its deadline makes the process unhealthy: `/livez` fails and names the call, so that a supervisor
//! (Kubernetes' liveness probe, systemd's watchdog) restarts the process. The call was recorded before
//! it started ([`crate::unit_of_work::CallRecord`]), so after the restart it counts as a failed attempt,
//! and a message that hangs every time is dead-lettered after `max_retries`. In an isolated worker the
//! host kills the worker instead.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

/// The calls in progress.
#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    calls: Mutex<HashMap<u64, Call>>,
    next: AtomicU64,
}

#[derive(Debug)]
struct Call {
    subscription: String,
    handler: String,
    started: Instant,
    limit: Duration,
    /// Logged as overdue already (once is enough).
    logged: bool,
}

/// A call past its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Overdue {
    pub(crate) subscription: String,
    pub(crate) handler: String,
    pub(crate) running: Duration,
    pub(crate) limit: Duration,
}

impl std::fmt::Display for Overdue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "handler {} of {} has been running for {} ms, past its deadline of {} ms (handler_timeout_ms); a call in process cannot be stopped: restart the process, and the call counts as a failed attempt",
            self.handler,
            self.subscription,
            self.running.as_millis(),
            self.limit.as_millis()
        )
    }
}

/// A registered call; dropping it ends the call.
#[must_use = "the call ends when the guard is dropped"]
pub(crate) struct Guard<'a> {
    deadlines: &'a Deadlines,
    id: u64,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.deadlines.lock().remove(&self.id);
    }
}

impl Deadlines {
    /// Register a call of `handler` that may take `limit`.
    pub(crate) fn start(&self, subscription: &str, handler: &str, limit: Duration) -> Guard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let call = Call {
            subscription: subscription.to_owned(),
            handler: handler.to_owned(),
            started: Instant::now(),
            limit,
            logged: false,
        };
        self.lock().insert(id, call);
        Guard {
            deadlines: self,
            id,
        }
    }

    /// The calls past their deadline at `now`.
    pub(crate) fn overdue(&self, now: Instant) -> Vec<Overdue> {
        self.lock()
            .values()
            .filter_map(|call| overdue(call, now))
            .collect()
    }

    /// The calls that went past their deadline since the last look (each is reported once).
    pub(crate) fn newly_overdue(&self, now: Instant) -> Vec<Overdue> {
        let mut calls = self.lock();
        calls
            .values_mut()
            .filter(|call| !call.logged)
            .filter_map(|call| {
                let late = overdue(call, now)?;
                call.logged = true;
                Some(late)
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Call>> {
        // A panic while holding this lock leaves the map consistent (single inserts and removes).
        crate::sync::lock(&self.calls)
    }
}

fn overdue(call: &Call, now: Instant) -> Option<Overdue> {
    let running = now.saturating_duration_since(call.started);
    (running > call.limit).then(|| Overdue {
        subscription: call.subscription.clone(),
        handler: call.handler.clone(),
        running,
        limit: call.limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_overdue_past_its_limit_until_it_ends_and_reported_once() {
        let deadlines = Deadlines::default();
        let guard = deadlines.start("orders", "place", Duration::from_millis(100));
        let start = Instant::now();
        assert!(deadlines.overdue(start).is_empty());
        let later = start + Duration::from_millis(500);
        let late = deadlines.overdue(later);
        assert_eq!(late.len(), 1);
        assert_eq!(
            (late[0].handler.as_str(), late[0].limit),
            ("place", Duration::from_millis(100))
        );
        assert!(late[0].to_string().contains("past its deadline of 100 ms"));
        assert_eq!(deadlines.newly_overdue(later).len(), 1);
        assert!(deadlines.newly_overdue(later).is_empty());
        drop(guard);
        assert!(deadlines.overdue(later).is_empty());
    }
}
