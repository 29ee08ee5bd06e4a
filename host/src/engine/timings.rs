//! Where each subscription's time goes: owning its lease, reading, the handler calls, the store reads
//! those calls make, looking up processed markers, committing, settling with the broker, the engine's
//! own work, and waiting idle.
//!
//! A subscription's loop is one task, so its phases follow one another: their sum is the loop's wall
//! time, and a phase's share of it says what to make faster. The batch itself runs on a blocking
//! thread, where the phases nest (a handler's store read happens inside its call): a thread-local
//! tally charges each moment to the innermost phase only. Reported per subscription in the metrics
//! (`protean_subscription_seconds_total{phase}`) and, with `--timings`, after the test-mode summary.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::sync::lock;

/// One kind of work of a subscription's loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Taking, renewing or checking the subscription's lease.
    Lease,
    /// Reading messages from the store or the broker (a broker's blocking read waits here too).
    Read,
    /// Inside handler calls, less the store reads they made.
    Handle,
    /// Store reads made by handlers (streams, documents).
    HandlerReads,
    /// Looking up which messages of a batch were processed before (a broker's batches always: a
    /// broker redelivers and an outbox publishes at least once).
    Markers,
    /// Committing units of work.
    Commit,
    /// Acknowledging entries and moving cursors after a commit.
    Settle,
    /// The engine's own work on a batch: decoding metadata, markers, building the unit, hand-offs.
    Engine,
    /// Waiting for new messages.
    Idle,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Lease,
        Phase::Read,
        Phase::Handle,
        Phase::HandlerReads,
        Phase::Markers,
        Phase::Commit,
        Phase::Settle,
        Phase::Engine,
        Phase::Idle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Lease => "lease",
            Phase::Read => "read",
            Phase::Handle => "handle",
            Phase::HandlerReads => "handler_reads",
            Phase::Markers => "markers",
            Phase::Commit => "commit",
            Phase::Settle => "settle",
            Phase::Engine => "engine",
            Phase::Idle => "idle",
        }
    }
}

/// Time spent per phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent([Duration; Phase::ALL.len()]);

impl Spent {
    pub fn get(&self, phase: Phase) -> Duration {
        self.0[phase as usize]
    }

    pub(crate) fn add(&mut self, phase: Phase, time: Duration) {
        self.0[phase as usize] += time;
    }

    pub fn total(&self) -> Duration {
        self.0.iter().sum()
    }

    /// Add `other`'s time, phase by phase.
    pub(crate) fn absorb(&mut self, other: &Spent) {
        for phase in Phase::ALL {
            self.add(phase, other.get(phase));
        }
    }
}

/// The phases of every subscription over the run.
#[derive(Debug, Default)]
pub(crate) struct Timings(Mutex<BTreeMap<String, Spent>>);

impl Timings {
    pub(crate) fn add(&self, subscription: &str, spent: &Spent) {
        let mut all = lock(&self.0);
        match all.get_mut(subscription) {
            Some(total) => total.absorb(spent),
            None => {
                all.insert(subscription.to_owned(), *spent);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<String, Spent> {
        lock(&self.0).clone()
    }
}

/// The tally of the blocking thread running a batch: the phase it is in, since when, and the time of
/// the phases it left.
struct Tally {
    spent: Spent,
    phase: Phase,
    since: Instant,
}

impl Tally {
    /// Charge the time since the last switch to the current phase, and switch to `phase`.
    fn switch(&mut self, phase: Phase) -> Phase {
        let now = Instant::now();
        self.spent.add(self.phase, now - self.since);
        self.since = now;
        std::mem::replace(&mut self.phase, phase)
    }
}

thread_local! {
    static TALLY: RefCell<Option<Tally>> = const { RefCell::new(None) };
}

/// Run `f` on this thread with its time charged to `phase`, except what nested [`within`] calls
/// charge elsewhere; returns what it returned and the time per phase.
pub(crate) fn measure<T>(phase: Phase, f: impl FnOnce() -> T) -> (T, Spent) {
    let outer = TALLY.with(|t| {
        t.borrow_mut().replace(Tally {
            spent: Spent::default(),
            phase,
            since: Instant::now(),
        })
    });
    let value = f();
    let mut tally = TALLY
        .with(|t| std::mem::replace(&mut *t.borrow_mut(), outer))
        .expect("the tally set above");
    tally.switch(phase);
    (value, tally.spent)
}

/// Charge the time of `f` to `phase` when this thread is being measured (see [`measure`]).
pub(crate) fn within<T>(phase: Phase, f: impl FnOnce() -> T) -> T {
    let before = TALLY.with(|t| t.borrow_mut().as_mut().map(|tally| tally.switch(phase)));
    let value = f();
    if let Some(before) = before {
        TALLY.with(|t| {
            if let Some(tally) = t.borrow_mut().as_mut() {
                tally.switch(before);
            }
        });
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {}
    }

    #[test]
    fn nested_phases_charge_each_moment_to_the_innermost_one() {
        let started = Instant::now();
        let ((), spent) = measure(Phase::Engine, || {
            busy(Duration::from_millis(5));
            within(Phase::Handle, || {
                busy(Duration::from_millis(1));
                within(Phase::HandlerReads, || busy(Duration::from_millis(30)));
            });
            within(Phase::Commit, || busy(Duration::from_millis(15)));
        });
        let wall = started.elapsed();
        let at_least =
            |phase, ms| assert!(spent.get(phase) >= Duration::from_millis(ms), "{spent:?}");
        at_least(Phase::Engine, 5);
        at_least(Phase::Handle, 1);
        at_least(Phase::HandlerReads, 30);
        at_least(Phase::Commit, 15);
        // The reads inside the call are not charged to the call as well.
        assert!(
            spent.get(Phase::Handle) < spent.get(Phase::HandlerReads),
            "{spent:?}"
        );
        assert!(
            spent.total() <= wall,
            "{spent:?} in {wall:?}: nothing is counted twice"
        );
        assert_eq!(spent.get(Phase::Idle), Duration::ZERO);
    }

    #[test]
    fn outside_a_measure_within_only_runs_its_function() {
        assert_eq!(within(Phase::Commit, || 7), 7);
        TALLY.with(|t| assert!(t.borrow().is_none()));
    }

    #[test]
    fn timings_add_up_per_subscription() {
        let timings = Timings::default();
        let mut spent = Spent::default();
        spent.add(Phase::Read, Duration::from_millis(3));
        timings.add("a", &spent);
        timings.add("a", &spent);
        timings.add("b", &spent);
        let all = timings.snapshot();
        assert_eq!(all["a"].get(Phase::Read), Duration::from_millis(6));
        assert_eq!(all["b"].total(), Duration::from_millis(3));
    }
}
