//! The one clock the engine and its handlers read: schedules, retries' waits, command deadlines and
//! `ctx.now()` all take their time from it.
//!
//! In production it is the system clock. In test mode it can be virtual: it stands still while anything
//! runs, and when the engine has nothing left to do but wait, test mode moves it at once to the next
//! thing due (a schedule, a retry), so a flow that waits three days completes in milliseconds with the
//! messages a real run would produce.
//!
//! Invariant (virtual): the clock never moves while a waiter it woke has not yet said what it does next.
//! A wait hands its waker a [`Woken`] guard; the clock counts the guards alive ([`Clock::settled`]), and
//! test mode moves the clock only when none is.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::{oneshot, Notify};

use crate::sync::lock;

/// The system clock, for what has no engine to ask (a one-off command, a unit test).
pub static SYSTEM: Clock = Clock::system();

/// The engine's clock. Cheap to clone; clones share one time.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// None: the system clock.
    simulated: Option<Arc<Virtual>>,
}

#[derive(Debug)]
struct Virtual {
    state: Mutex<State>,
    /// Rung when the clock moves and when a woken waiter settles. One listener (test mode), which
    /// must not miss a ring that comes between its look and its wait: a stored permit.
    changed: Notify,
}

#[derive(Debug)]
struct State {
    start_ms: i64,
    now_ms: i64,
    /// Waiters by (due, arrival): the arrival keeps waiters of the same instant in order.
    waiters: BTreeMap<(i64, u64), oneshot::Sender<Woken>>,
    arrivals: u64,
    /// Woken waiters that have not yet dropped their guard.
    waking: usize,
}

/// A registered wait.
enum Wait {
    Ready,
    System(Duration),
    Virtual(oneshot::Receiver<Woken>),
}

/// Held by a waiter the virtual clock woke, until it has said what it does next (reported its state):
/// the clock does not move again before. Nothing for the system clock.
#[derive(Debug)]
#[must_use = "the clock may move again as soon as the guard is dropped"]
pub struct Woken(Option<Arc<Virtual>>);

impl Drop for Woken {
    fn drop(&mut self) {
        if let Some(clock) = self.0.take() {
            lock(&clock.state).waking -= 1;
            clock.changed.notify_one();
        }
    }
}

impl Clock {
    /// The system clock.
    pub const fn system() -> Self {
        Self { simulated: None }
    }

    /// A virtual clock reading `start` until test mode moves it.
    pub fn simulated(start: DateTime<Utc>) -> Self {
        let start_ms = start.timestamp_millis();
        Self {
            simulated: Some(Arc::new(Virtual {
                state: Mutex::new(State {
                    start_ms,
                    now_ms: start_ms,
                    waiters: BTreeMap::new(),
                    arrivals: 0,
                    waking: 0,
                }),
                changed: Notify::new(),
            })),
        }
    }

    /// Whether it is virtual.
    pub fn is_virtual(&self) -> bool {
        self.simulated.is_some()
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.simulated {
            Some(clock) => lock(&clock.state).now_ms,
            None => Utc::now().timestamp_millis(),
        }
    }

    /// The time now.
    pub fn now(&self) -> DateTime<Utc> {
        match &self.simulated {
            Some(_) => Utc
                .timestamp_millis_opt(self.now_ms())
                .single()
                .unwrap_or_default(),
            None => Utc::now(),
        }
    }

    /// How far a virtual clock has moved since it started (zero for the system clock).
    pub fn elapsed(&self) -> Duration {
        self.simulated.as_ref().map_or(Duration::ZERO, |clock| {
            let state = lock(&clock.state);
            Duration::from_millis((state.now_ms - state.start_ms).max(0) as u64)
        })
    }

    /// Wait `delay` on this clock. The wait is registered when this is called, not when it is first
    /// polled (test mode must see it at once); dropped early, it leaves nothing behind.
    pub fn sleep(&self, delay: Duration) -> impl Future<Output = Woken> + Send + 'static {
        let due = self.now_ms().saturating_add(delay.as_millis() as i64);
        self.sleep_until(due)
    }

    /// Wait until the clock reads `due_ms` (at once if it already does); registered as [`Clock::sleep`].
    pub fn sleep_until(&self, due_ms: i64) -> impl Future<Output = Woken> + Send + 'static {
        let wait = self.register(due_ms);
        async move {
            match wait {
                Wait::Ready => Woken(None),
                Wait::System(delay) => {
                    tokio::time::sleep(delay).await;
                    Woken(None)
                }
                // The clock lives as long as the engine; a clock gone means nothing will ever be due.
                Wait::Virtual(woken) => match woken.await {
                    Ok(guard) => guard,
                    Err(_) => std::future::pending().await,
                },
            }
        }
    }

    fn register(&self, due_ms: i64) -> Wait {
        let Some(clock) = &self.simulated else {
            let wait = due_ms.saturating_sub(self.now_ms()).max(0) as u64;
            return Wait::System(Duration::from_millis(wait));
        };
        let mut state = lock(&clock.state);
        if due_ms <= state.now_ms {
            return Wait::Ready;
        }
        let (tx, rx) = oneshot::channel();
        state.arrivals += 1;
        let arrival = state.arrivals;
        state.waiters.insert((due_ms, arrival), tx);
        Wait::Virtual(rx)
    }

    /// When the earliest wait on a virtual clock ends, if anyone waits.
    pub(crate) fn next_wake(&self) -> Option<i64> {
        let clock = self.simulated.as_ref()?;
        let mut state = lock(&clock.state);
        state.waiters.retain(|_, tx| !tx.is_closed());
        state.waiters.keys().next().map(|(due, _)| *due)
    }

    /// Move a virtual clock forward to `to_ms` (never back) and wake every waiter due by then, in
    /// order. Nothing for the system clock.
    pub(crate) fn advance_to(&self, to_ms: i64) {
        let Some(clock) = &self.simulated else { return };
        let mut state = lock(&clock.state);
        state.now_ms = state.now_ms.max(to_ms);
        let now = state.now_ms;
        while let Some(entry) = state.waiters.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let tx = entry.remove();
            // Counted before it is sent: a waiter that is gone drops the guard at once, which uncounts it.
            state.waking += 1;
            let guard = Woken(Some(clock.clone()));
            drop(state);
            let _ = tx.send(guard);
            state = lock(&clock.state);
        }
        drop(state);
        clock.changed.notify_one();
    }

    /// Whether every waiter a virtual clock woke has said what it does next (always for the system
    /// clock): only then may it move again.
    pub(crate) fn settled(&self) -> bool {
        self.simulated
            .as_ref()
            .is_none_or(|clock| lock(&clock.state).waking == 0)
    }

    /// Wait until a virtual clock moves or a woken waiter settles (never for the system clock).
    pub(crate) async fn changed(&self) {
        match &self.simulated {
            Some(clock) => clock.changed.notified().await,
            None => std::future::pending().await,
        }
    }
}

/// Wait for `wait`, or forever without one.
pub(crate) async fn until(wait: Option<impl Future<Output = Woken>>) -> Woken {
    match wait {
        Some(wait) => wait.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Clock {
        Clock::simulated(Utc.timestamp_millis_opt(ms).unwrap())
    }

    #[tokio::test]
    async fn a_virtual_clock_stands_still_until_moved_and_wakes_waiters_in_due_order() {
        let clock = at(1_000);
        let later = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep(Duration::from_secs(3 * 86_400)).await }
        });
        let sooner = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep(Duration::from_millis(500)).await }
        });
        while clock.next_wake() != Some(1_500)
            || lock(&clock.simulated.as_ref().unwrap().state).waiters.len() < 2
        {
            tokio::task::yield_now().await;
        }
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance_to(1_500);
        let woken = sooner.await.unwrap();
        assert!(!clock.settled(), "a woken waiter holds the clock");
        drop(woken);
        assert!(clock.settled());
        assert!(!later.is_finished());
        assert_eq!(clock.next_wake(), Some(1_000 + 3 * 86_400_000));
        clock.advance_to(1_000 + 3 * 86_400_000);
        drop(later.await.unwrap());
        assert_eq!(clock.elapsed(), Duration::from_millis(3 * 86_400_000));
    }

    #[tokio::test]
    async fn a_wait_dropped_early_neither_holds_nor_counts() {
        let clock = at(0);
        {
            let wait = clock.sleep(Duration::from_secs(1));
            tokio::pin!(wait);
            assert!(futures_poll_once(wait.as_mut()).await.is_none());
        }
        assert_eq!(clock.next_wake(), None, "the dropped wait is forgotten");
        let registered = clock.sleep(Duration::from_secs(2));
        assert_eq!(
            clock.next_wake(),
            Some(2_000),
            "registered before it is polled"
        );
        drop(registered);
        assert_eq!(clock.next_wake(), None);
        clock.advance_to(5_000);
        assert!(clock.settled());
        assert_eq!(clock.now_ms(), 5_000);
    }

    #[tokio::test]
    async fn a_due_time_already_passed_returns_at_once_and_the_clock_never_goes_back() {
        let clock = at(10_000);
        drop(clock.sleep_until(9_000).await);
        clock.advance_to(2_000);
        assert_eq!(clock.now_ms(), 10_000);
    }

    /// Poll a future once: Some(output) if it was ready.
    async fn futures_poll_once<F: std::future::Future>(
        mut fut: std::pin::Pin<&mut F>,
    ) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match fut.as_mut().poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
