//! What every subscription is doing, for test mode's "done" and for the run report.
//!
//! Invariant: the engine is quiescent when every subscription has read past the store's head (as the
//! engine last committed it) and found nothing, and none is in a batch or waiting to retry.

use std::{collections::BTreeMap, sync::Mutex, time::Instant};

use tokio::sync::{watch, Notify};

use super::arrivals::{Arrivals, Seen};
use crate::sync::lock;

/// One subscription's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    Starting,
    Busy,
    /// Caught up: its last read found nothing, and the head was then `head`.
    Idle {
        head: u64,
    },
    /// Waiting for a time, not for messages (the scheduler): no head makes it busy, so it is done at
    /// any head. A schedule a commit sets rings the scheduler, and test mode looks for one due.
    Waiting,
    /// Another replica holds the subscription's lease; `lag` messages of its categories came after the
    /// position that replica stored when the head was `head`. Done only at 0, and only while the head is
    /// still there: a dead owner's lease, or an owner still at work, leaves work that nobody has
    /// finished, and a lag measured before this engine appended more says nothing about the new ones.
    StandingBy {
        lag: u64,
        head: u64,
    },
    /// A message failed and is waiting for its retry.
    Retrying,
    Stopped,
}

/// Counts over the whole run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Messages handled successfully, by type.
    pub handled: BTreeMap<String, u64>,
    /// Messages written by handlers, by type.
    pub written: BTreeMap<String, u64>,
    pub dead_lettered: u64,
    pub retries: u64,
    pub skipped: u64,
    /// Messages the outbox published to the broker.
    pub published: u64,
}

/// Shared by the engine and its subscriptions.
#[derive(Debug)]
pub(crate) struct Progress {
    head: watch::Sender<u64>,
    /// Which categories the head's moves appended to.
    arrivals: Mutex<Arrivals>,
    /// Every message committed up to this global position has been published to the broker.
    published: watch::Sender<u64>,
    /// Each loop's state and when it last reported one: every loop reports at least once per
    /// iteration, so an old report means a loop that is stuck (the heartbeat readiness checks).
    states: Mutex<BTreeMap<String, (State, Instant)>>,
    /// The workers' states of subscriptions run by several workers; their combination is the
    /// subscription's state in `states`.
    workers: Mutex<BTreeMap<String, Vec<State>>>,
    totals: Mutex<Totals>,
    changed: Notify,
}

impl Progress {
    pub(crate) fn new(head: u64, subscriptions: impl IntoIterator<Item = String>) -> Self {
        Self {
            head: watch::Sender::new(head),
            arrivals: Mutex::default(),
            published: watch::Sender::new(0),
            states: Mutex::new(
                subscriptions
                    .into_iter()
                    .map(|s| (s, (State::Starting, Instant::now())))
                    .collect(),
            ),
            workers: Mutex::default(),
            totals: Mutex::default(),
            changed: Notify::new(),
        }
    }

    /// Watch the head: subscriptions wake when a commit appends messages.
    pub(crate) fn head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Run `commit`, which appends to `categories`: they are news for their readers from now until
    /// it has ended and its position is recorded, so that no move of the head past it is taken as
    /// read before then (commits land in position order, but are reported in any order).
    pub(crate) fn committing<E>(
        &self,
        categories: &[String],
        commit: impl FnOnce() -> Result<Option<u64>, E>,
    ) -> Result<Option<u64>, E> {
        lock(&self.arrivals).begin(categories);
        let committed = commit();
        let position = committed.as_ref().ok().copied().flatten();
        lock(&self.arrivals).end(categories, position);
        committed
    }

    /// A commit of this engine, recorded by [`Progress::committing`], appended messages up to
    /// `global_position`.
    pub(crate) fn appended(&self, global_position: u64) {
        self.move_head(global_position);
    }

    /// Messages of categories nobody said were appended up to `global_position` (another writer's
    /// commit, told by the store; a scheduler's round).
    pub(crate) fn advanced(&self, global_position: u64) {
        if !lock(&self.arrivals).unknown(global_position) {
            return self.move_head(global_position);
        }
        // Every reader looks, even when the head stays: a commit reported after a later one.
        self.head
            .send_modify(|head| *head = (*head).max(global_position));
        self.changed.notify_one();
    }

    /// What a subscription knows as it reads: `head`'s value, marked seen.
    pub(crate) fn seen(&self, head: &mut watch::Receiver<u64>) -> Seen {
        // Arrivals first: one told between the two is counted and, being committed, read.
        let arrivals = lock(&self.arrivals);
        arrivals.seen(*head.borrow_and_update())
    }

    /// What a read made now knows, for a reader that does not wait on the head itself.
    pub(crate) fn seen_now(&self) -> Seen {
        let arrivals = lock(&self.arrivals);
        arrivals.seen(*self.head.borrow())
    }

    /// Whether a subscription of `categories` that read after `seen` and found nothing may find
    /// something now.
    pub(crate) fn news_for(&self, categories: &[String], seen: Seen) -> bool {
        lock(&self.arrivals).news_for(categories, seen)
    }

    /// For a subscription of `categories` idle since `seen` whose `head` moved: when nothing arrived
    /// for it, mark the new head seen, as if it had read there, and say so.
    pub(crate) fn nothing_for(
        &self,
        categories: &[String],
        seen: &mut Seen,
        head: &mut watch::Receiver<u64>,
    ) -> bool {
        // One lock for both: an append told between them would be taken as read.
        let arrivals = lock(&self.arrivals);
        if arrivals.news_for(categories, *seen) {
            return false;
        }
        *seen = arrivals.seen(*head.borrow_and_update());
        true
    }

    fn move_head(&self, global_position: u64) {
        self.head.send_if_modified(|head| {
            let moved = global_position > *head;
            *head = (*head).max(global_position);
            moved
        });
        self.changed.notify_one();
    }

    /// The outbox found nothing left to publish after the head was at `head`.
    pub(crate) fn published_up_to(&self, head: u64) {
        self.published.send_if_modified(|p| {
            let moved = head > *p;
            *p = (*p).max(head);
            moved
        });
        self.changed.notify_one();
    }

    /// The global position up to which everything committed has been published.
    pub(crate) fn published(&self) -> u64 {
        *self.published.borrow()
    }

    pub(crate) fn set(&self, subscription: &str, state: State) {
        lock(&self.states).insert(subscription.to_owned(), (state, Instant::now()));
        self.changed.notify_one();
    }

    /// Worker `index` of the `of` workers running `subscription` is in `state`.
    pub(crate) fn set_worker(&self, subscription: &str, index: u32, of: u32, state: State) {
        let combined = {
            let mut workers = lock(&self.workers);
            let states = workers
                .entry(subscription.to_owned())
                .or_insert_with(|| vec![State::Starting; of as usize]);
            states.resize(of as usize, State::Starting);
            states[index as usize] = state;
            combined(states)
        };
        self.set(subscription, combined);
    }

    pub(crate) fn count(&self, f: impl FnOnce(&mut Totals)) {
        f(&mut lock(&self.totals));
    }

    /// Count what a committed batch did.
    pub(crate) fn tally(&self, report: super::batch::Report) {
        self.count(|t| {
            for message_type in report.handled {
                *t.handled.entry(message_type).or_default() += 1;
            }
            for message_type in report.written {
                *t.written.entry(message_type).or_default() += 1;
            }
            t.dead_lettered += u64::from(report.dead_lettered);
            t.skipped += u64::from(report.skipped);
            t.retries += u64::from(report.retry.is_some());
        });
    }

    pub(crate) fn totals(&self) -> Totals {
        lock(&self.totals).clone()
    }

    /// Whether nothing is left to do.
    pub(crate) fn quiescent(&self) -> bool {
        let head = *self.head.borrow();
        lock(&self.states).values().all(|(s, _)| done(s, head))
    }

    /// Whether nothing is left to do but wait for retries: every loop is done or waiting to retry.
    pub(crate) fn only_retries(&self) -> bool {
        let head = *self.head.borrow();
        let states = lock(&self.states);
        states
            .values()
            .all(|(s, _)| done(s, head) || *s == State::Retrying)
    }

    /// The subscriptions that are not done, with what they are doing.
    pub(crate) fn busy(&self) -> Vec<String> {
        let head = *self.head.borrow();
        lock(&self.states)
            .iter()
            .filter(|(_, (s, _))| !done(s, head))
            .map(|(name, (s, _))| format!("{name} ({})", describe(s)))
            .collect()
    }

    /// Track these subscriptions from now on, each starting (a reload changed the set); totals and
    /// the head carry on.
    pub(crate) fn track(&self, subscriptions: impl IntoIterator<Item = String>) {
        let now = Instant::now();
        lock(&self.workers).clear();
        *lock(&self.states) = subscriptions
            .into_iter()
            .map(|s| (s, (State::Starting, now)))
            .collect();
        self.changed.notify_one();
    }

    /// Every loop's state and when it last reported, for health checks.
    pub(crate) fn snapshot(&self) -> Vec<(String, State, Instant)> {
        lock(&self.states)
            .iter()
            .map(|(name, (state, at))| (name.clone(), state.clone(), *at))
            .collect()
    }

    /// The global position of the engine's last commit that appended messages.
    pub(crate) fn head_now(&self) -> u64 {
        *self.head.borrow()
    }

    /// Wake whoever waits for a change, to look again.
    pub(crate) fn poke(&self) {
        self.changed.notify_one();
    }

    /// Wait for the next change of any state or of the head.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// Whether a loop in `state` has nothing left while the engine's head is `head`.
fn done(state: &State, head: u64) -> bool {
    match state {
        State::Idle { head: seen } => *seen >= head,
        State::Waiting => true,
        State::StandingBy { lag, head: seen } => *lag == 0 && *seen >= head,
        _ => false,
    }
}

/// A subscription's state from its workers' states: busy, retrying or starting while any worker is;
/// idle only when every worker is, at the lowest head they saw (so test mode waits for the slowest).
fn combined(states: &[State]) -> State {
    let any = |wanted: &State| states.contains(wanted);
    if any(&State::Busy) {
        return State::Busy;
    }
    if any(&State::Retrying) {
        return State::Retrying;
    }
    if any(&State::Starting) {
        return State::Starting;
    }
    let standing_by: Vec<(u64, u64)> = states
        .iter()
        .filter_map(|s| match s {
            State::StandingBy { lag, head } => Some((*lag, *head)),
            _ => None,
        })
        .collect();
    if let (Some(lag), Some(head)) = (
        standing_by.iter().map(|(lag, _)| *lag).max(),
        standing_by.iter().map(|(_, head)| *head).min(),
    ) {
        return State::StandingBy { lag, head };
    }
    let idle = states.iter().filter_map(|s| match s {
        State::Idle { head } => Some(*head),
        _ => None,
    });
    idle.min()
        .map_or(State::Stopped, |head| State::Idle { head })
}

fn describe(state: &State) -> &'static str {
    match state {
        State::Starting => "starting",
        State::Busy => "handling a batch",
        State::Idle { .. } => "behind the head",
        State::Waiting => "waiting for its next due time",
        State::StandingBy { .. } => {
            "standing by while another replica's lease leaves messages unhandled"
        }
        State::Retrying => "waiting to retry a message",
        State::Stopped => "stopped",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiescent_only_when_everyone_is_idle_at_the_head() {
        let p = Progress::new(5, ["a".to_owned(), "b".to_owned()]);
        assert!(!p.quiescent());
        p.set("a", State::Idle { head: 5 });
        p.set("b", State::Idle { head: 5 });
        assert!(p.quiescent());
        p.advanced(7);
        assert!(!p.quiescent(), "a commit moved the head past what they saw");
        assert_eq!(p.busy(), ["a (behind the head)", "b (behind the head)"]);
        p.set("a", State::Idle { head: 7 });
        p.set("b", State::Retrying);
        assert_eq!(p.busy(), ["b (waiting to retry a message)"]);
    }

    #[test]
    fn an_idle_subscription_takes_a_move_with_nothing_for_it_as_read_and_never_one_with_something()
    {
        let p = Progress::new(5, ["a".to_owned()]);
        let mut head = p.head();
        let orders = ["shop::order".to_owned()];
        let payments = ["shop::payment".to_owned()];
        let commit = |categories: &[String], position| {
            p.committing(categories, || Ok::<_, ()>(Some(position)))
                .unwrap();
            p.appended(position);
        };
        let mut seen = p.seen(&mut head);
        commit(&payments, 7);
        assert!(p.nothing_for(&orders, &mut seen, &mut head));
        assert_eq!(seen.head, 7);
        commit(&orders, 9);
        assert!(!p.nothing_for(&orders, &mut seen, &mut head));
        assert_eq!(seen.head, 7, "not marked seen: still to be read");
        let mut seen = p.seen(&mut head);
        p.advanced(11);
        assert!(
            !p.nothing_for(&orders, &mut seen, &mut head),
            "another writer's append may be of any category"
        );
    }

    /// Two subscriptions commit: the first lands (position 8) but is reported after the second (9).
    /// A reader of the first's categories woken by the second must read, and a reader told of an
    /// unknown append below the head must be woken.
    #[test]
    fn a_commit_reported_after_a_later_one_is_never_taken_as_read() {
        let p = Progress::new(5, ["a".to_owned()]);
        let mut head = p.head();
        let (orders, payments) = (["shop::order".to_owned()], ["shop::payment".to_owned()]);
        let mut seen = p.seen(&mut head);
        let first = p.committing(&orders, || {
            p.committing(&payments, || Ok::<_, ()>(Some(9))).unwrap();
            p.appended(9);
            assert!(
                !p.nothing_for(&orders, &mut seen, &mut head),
                "a commit to its category is still unreported"
            );
            Ok::<_, ()>(Some(8))
        });
        assert_eq!(first, Ok(Some(8)));
        p.appended(8);
        assert!(!p.nothing_for(&orders, &mut seen, &mut head));
        let mut seen = p.seen(&mut head);
        p.advanced(3);
        assert!(
            head.has_changed().unwrap(),
            "an unknown append wakes every reader"
        );
        assert!(!p.nothing_for(&orders, &mut seen, &mut head));
    }

    #[test]
    fn a_loop_waiting_for_a_time_is_done_at_any_head() {
        let p = Progress::new(5, ["a".to_owned(), "scheduler".to_owned()]);
        p.set("a", State::Idle { head: 5 });
        p.set("scheduler", State::Waiting);
        assert!(p.quiescent());
        p.advanced(9);
        p.set("a", State::Idle { head: 9 });
        assert!(
            p.quiescent(),
            "a later head does not make the scheduler busy"
        );
    }

    #[test]
    fn standing_by_is_done_only_when_the_lease_holder_left_nothing() {
        let p = Progress::new(5, ["s".to_owned()]);
        p.set("s", State::StandingBy { lag: 3, head: 5 });
        assert!(!p.quiescent(), "a dead owner's lease holds 3 messages back");
        assert_eq!(
            p.busy(),
            ["s (standing by while another replica's lease leaves messages unhandled)"]
        );
        p.set("s", State::StandingBy { lag: 0, head: 5 });
        assert!(p.quiescent());
        p.advanced(7);
        assert!(
            !p.quiescent(),
            "a lag of 0 measured before a commit says nothing of what it appended"
        );
        p.set("s", State::StandingBy { lag: 0, head: 7 });
        assert!(p.quiescent());
        p.set_worker("s", 0, 2, State::StandingBy { lag: 0, head: 7 });
        p.set_worker("s", 1, 2, State::StandingBy { lag: 2, head: 7 });
        assert!(!p.quiescent(), "one worker's position is behind");
    }

    #[test]
    fn a_subscription_with_workers_is_idle_only_when_every_worker_is() {
        let p = Progress::new(5, ["s".to_owned()]);
        p.set_worker("s", 0, 2, State::Idle { head: 5 });
        assert!(!p.quiescent(), "worker 1 has not started");
        p.set_worker("s", 1, 2, State::Retrying);
        assert_eq!(p.busy(), ["s (waiting to retry a message)"]);
        p.set_worker("s", 1, 2, State::Idle { head: 4 });
        assert!(!p.quiescent(), "worker 1 saw an older head");
        p.set_worker("s", 1, 2, State::Idle { head: 5 });
        assert!(p.quiescent());
        p.set_worker("s", 0, 2, State::Stopped);
        p.set_worker("s", 1, 2, State::Stopped);
        assert_eq!(p.busy(), ["s (stopped)"]);
    }
}
