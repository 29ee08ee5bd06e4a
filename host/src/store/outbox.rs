//! The outbox: messages committed with a unit of work, waiting to be published to the broker.
//!
//! Invariants: a message is published at least once, after its commit, however long the broker is
//! away (no row is ever given up); rows of one target stream are published in the order they were
//! committed, even by several processors (a processor holds a lease on each target it publishes to,
//! and a row waiting for its retry holds back the rows after it).

use std::{collections::BTreeMap, time::Duration};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::Result;
use crate::message::{self, PoisonError};

/// One row to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// The row's sequence number.
    pub seq: u64,
    /// The broker stream it goes to (the message's category).
    pub target: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The message as it is published, or why the stored one cannot be read.
    pub payload: std::result::Result<String, PoisonError>,
}

impl OutboxItem {
    /// Over this many bytes of wire form a message is large: reading its row filled caches that are
    /// worth giving back (`SqliteStore::release_large_rows`).
    const LARGE: usize = 256 * 1024;

    pub(super) fn is_large(&self) -> bool {
        self.payload.as_ref().is_ok_and(|p| p.len() > Self::LARGE)
    }

    /// A row whose message is the stored text `data` and `metadata` at its positions. The wire form is
    /// made from the text as the store holds it (a row's borrowed column): the stored text is never
    /// copied into a message of its own, only to be dropped once the wire form is made. Text
    /// `known_valid` (see [`text_checksum`]) is not parsed again.
    pub(super) fn new(
        seq: u64,
        target: String,
        attempts: u32,
        (data, metadata): (&str, &str),
        (position, global_position): (u64, u64),
        known_valid: bool,
    ) -> Self {
        let wire = if known_valid {
            message::wire_json_of_valid
        } else {
            message::wire_json
        };
        Self {
            seq,
            target,
            attempts,
            payload: wire(data, metadata, position, global_position),
        }
    }
}

/// The checksum an outbox row keeps of its message's text as committed (data, then metadata). A message
/// a handler or a command wrote is JSON (its constructors make or check it), so text that still has its
/// row's checksum is known to be JSON: the outbox makes its wire form without parsing it again. Text
/// changed since (damaged, or edited by hand) is parsed, and is not published when it is no longer JSON;
/// so is text a unit did not make itself (a fired schedule's, read back from the store), whose row has no
/// checksum.
pub(super) fn text_checksum(data: &str, metadata: &str) -> i64 {
    xxh3_64_with_seed(metadata.as_bytes(), xxh3_64(data.as_bytes())) as i64
}

#[cfg(test)]
impl OutboxItem {
    /// The message's stream and position, read back from its wire form.
    pub(crate) fn stream_and_position(&self) -> (String, u64) {
        let payload = self.payload.as_ref().expect("a readable message");
        let wire: serde_json::Value = serde_json::from_str(payload).expect("JSON");
        let metadata = &wire["metadata"];
        let stream = metadata["headers"]["stream"].as_str().expect("a stream");
        let position = metadata["event_store"]["position"]
            .as_u64()
            .expect("a position");
        (stream.to_owned(), position)
    }
}

/// What a claim took, and whose leases it met.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    /// The rows to publish, in claim order.
    pub items: Vec<OutboxItem>,
    /// Targets whose lease another worker let expire without releasing it (it stopped or stalled),
    /// taken over by this claim.
    pub taken_over: Vec<ForeignLease>,
    /// Targets with pending rows that another worker's live lease keeps from this one.
    pub waiting: Vec<ForeignLease>,
    /// When rows that could not be taken now (waiting for a retry or for a lease) become claimable
    /// (unix ms); `None` when there were none.
    pub wake_at: Option<u64>,
}

/// Another worker's lease on a target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ForeignLease {
    pub target: String,
    pub worker: String,
    /// When it ends (unix ms).
    pub until: u64,
}

/// The outbox rows waiting to be published, for status, metrics and readiness: the only rows there are,
/// as a published row is deleted (`outbox_published` in `/metrics` counts what each process publishes).
/// Read through the index of pending rows, so that rows older builds kept do not add to the cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxCounts {
    /// Rows not published yet (failing and held ones included).
    pub pending: u64,
    /// Pending rows that failed at least once.
    pub failing: u64,
    /// Pending rows that failed at least `outbox.max_attempts` times: still retried, and logged.
    pub held: u64,
    /// How long ago the oldest pending row was committed.
    pub oldest_pending_age_ms: Option<u64>,
}

/// A pending row as operators see it (`protean-host outbox list`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PendingRow {
    pub seq: u64,
    /// The broker stream it goes to.
    pub target: String,
    /// The message's own stream and type.
    pub stream: String,
    pub message_type: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When it is tried next (unix ms; 0: at once).
    pub next_attempt_at: u64,
    /// How long ago it was committed.
    pub age_ms: u64,
}

/// A row whose publishing failed, and when it is tried again (unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFailure {
    pub seq: u64,
    pub error: String,
    pub retry_at: u64,
}

/// Rows a worker is publishing while it claims its next round: a processor reads its next claim while
/// the broker takes the round before. A claim passes over them as if they were published: it neither
/// returns them nor lets them hold back the rows of their streams behind them. (The processor
/// publishes such a claim only once every row in flight was published.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Runs of consecutive sequence numbers (first, last), ascending.
    runs: Vec<(u64, u64)>,
}

impl InFlight {
    pub fn new(seqs: impl IntoIterator<Item = u64>) -> Self {
        Self { runs: runs(seqs) }
    }

    /// Nothing in flight: a claim like any other.
    pub fn none() -> Self {
        Self::default()
    }

    pub(super) fn contains(&self, seq: u64) -> bool {
        let after = self.runs.partition_point(|(first, _)| *first <= seq);
        after > 0 && self.runs[after - 1].1 >= seq
    }

    /// The longest run, or an empty range (1, 0): what a store's query can pass over cheaply by range
    /// (a round is mostly one run). The chooser passes over the rest.
    pub(super) fn longest(&self) -> (u64, u64) {
        self.runs
            .iter()
            .copied()
            .max_by_key(|(first, last)| last - first)
            .unwrap_or((1, 0))
    }
}

/// `seqs` as runs of consecutive numbers (first, last), in ascending order: a round's rows are mostly
/// one run, marked by one statement instead of one per row.
pub(super) fn runs(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut sorted: Vec<u64> = seqs.into_iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for seq in sorted {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => runs.push((seq, seq)),
        }
    }
    runs
}

/// The outbox capability of a store.
pub trait Outbox: Send + Sync {
    /// Claim up to `limit` rows for `worker`, in commit order per target stream, leasing their targets
    /// for `lease`, passing over the rows `in_flight`. A target `worker` already holds for more than
    /// three quarters of `lease` is not leased again (see [`to_lease`]).
    fn claim(
        &self,
        worker: &str,
        limit: usize,
        lease: Duration,
        in_flight: &InFlight,
    ) -> Result<Claim>;

    /// These rows were published: they are deleted (the outbox holds what is still to publish).
    fn published(&self, worker: &str, seqs: &[u64]) -> Result<()>;

    /// Publishing `seq` failed: try again at `retry_at` (unix ms).
    fn failed(&self, worker: &str, seq: u64, error: &str, retry_at: u64) -> Result<()>;

    /// Give back the leases of `worker` (rows it claimed but did not publish are claimable again): when
    /// its processor has been idle for a while, or stops.
    fn release(&self, worker: &str) -> Result<()>;

    /// The end of a round: rows `published`, rows that `failed`. The worker keeps its leases for its
    /// next round. A store does it in one write, since it lies on the way from a commit to its message
    /// on the broker.
    fn settle(&self, worker: &str, published: &[u64], failed: &[RowFailure]) -> Result<()> {
        self.published(worker, published)?;
        for f in failed {
            self.failed(worker, f.seq, &f.error, f.retry_at)?;
        }
        Ok(())
    }

    /// How many rows are in each state; a row counts as held from `held_after` failed attempts.
    fn counts(&self, held_after: u32) -> Result<OutboxCounts>;

    /// The oldest pending rows (of the target stream `target`, or of all), in commit order.
    fn pending(&self, target: Option<&str>, limit: usize) -> Result<Vec<PendingRow>>;

    /// Clear the backoff of the pending rows of `target` (or of all), so that the next round publishes
    /// them; returns how many were waiting for a retry.
    fn republish(&self, target: Option<&str>) -> Result<u64>;
}

/// A pending row as the claim sees it.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    pub(super) seq: u64,
    pub(super) target: String,
    pub(super) next_attempt_at: u64,
}

/// A target's lease.
#[derive(Debug, Clone)]
pub(super) struct Lease {
    pub(super) worker: String,
    pub(super) until: u64,
}

/// The stored leases by target. Ordered, not hashed: a claim looks up every row's target twice, there
/// are few targets, and comparing a short name costs less than hashing it (SipHash was about 2.5% of an
/// outbox round's instructions).
pub(super) type Leases = BTreeMap<String, Lease>;

/// What `choose` decided.
#[derive(Debug, Default)]
pub(super) struct Choice {
    pub(super) seqs: Vec<u64>,
    pub(super) taken_over: Vec<ForeignLease>,
    pub(super) waiting: Vec<ForeignLease>,
    pub(super) wake_at: Option<u64>,
}

impl Choice {
    /// The claim of these items.
    pub(super) fn claim(self, items: Vec<OutboxItem>) -> Claim {
        Claim {
            items,
            taken_over: self.taken_over,
            waiting: self.waiting,
            wake_at: self.wake_at,
        }
    }

    /// Rows of a target wait until `at`.
    fn defer(&mut self, at: u64) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
}

/// Which candidates `worker` may take at `now` (unix ms): in order, skipping targets leased to another
/// live worker, and stopping a target at its first row that is waiting for a retry.
pub(super) fn choose(
    candidates: &[Candidate],
    leases: &Leases,
    worker: &str,
    now: u64,
    limit: usize,
    in_flight: &InFlight,
) -> Choice {
    let mut chooser = Chooser::new(leases, worker, now, limit, in_flight);
    for c in candidates {
        if chooser.offer(c) == Offer::Full {
            break;
        }
    }
    chooser.choice
}

/// What [`Chooser::offer`] made of a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Offer {
    Taken,
    Skipped,
    /// The claim has `limit` rows: this candidate and any after it are left.
    Full,
}

/// [`choose`] one candidate at a time, so that a store can stop reading candidates once the claim is
/// full and read a taken row's message from the row it already has.
pub(super) struct Chooser<'a> {
    leases: &'a Leases,
    worker: &'a str,
    now: u64,
    limit: usize,
    in_flight: &'a InFlight,
    blocked: Vec<String>,
    pub(super) choice: Choice,
}

impl<'a> Chooser<'a> {
    pub(super) fn new(
        leases: &'a Leases,
        worker: &'a str,
        now: u64,
        limit: usize,
        in_flight: &'a InFlight,
    ) -> Self {
        Self {
            leases,
            worker,
            now,
            limit,
            in_flight,
            blocked: Vec::new(),
            choice: Choice::default(),
        }
    }

    pub(super) fn offer(&mut self, c: &Candidate) -> Offer {
        let choice = &mut self.choice;
        if choice.seqs.len() == self.limit {
            return Offer::Full;
        }
        if self.in_flight.contains(c.seq) {
            return Offer::Skipped;
        }
        if self.blocked.contains(&c.target) {
            return Offer::Skipped;
        }
        let foreign = self
            .leases
            .get(&c.target)
            .filter(|l| l.worker != self.worker);
        let lease = |l: &Lease| ForeignLease {
            target: c.target.clone(),
            worker: l.worker.clone(),
            until: l.until,
        };
        if let Some(l) = foreign.filter(|l| l.until > self.now) {
            choice.waiting.push(lease(l));
            choice.defer(l.until);
            self.blocked.push(c.target.clone());
            return Offer::Skipped;
        }
        if c.next_attempt_at > self.now {
            choice.defer(c.next_attempt_at);
            self.blocked.push(c.target.clone());
            return Offer::Skipped;
        }
        // A foreign lease still stored but expired: its worker never released it.
        if let Some(l) = foreign.filter(|_| !choice.taken_over.iter().any(|t| t.target == c.target))
        {
            choice.taken_over.push(lease(l));
        }
        choice.seqs.push(c.seq);
        Offer::Taken
    }
}

/// Which of a claim's `targets` `worker` must lease now: those it does not hold, or holds for less than
/// three quarters of `lease` more; sorted, once each. A processor keeps its targets from round to round
/// (until it has been idle for an eighth of a lease or stops; another takes them over once they end if
/// it dies), so a busy one writes its leases about four times per lease time instead of in every
/// claim, and most claims write nothing. A round ends within half a lease of its claim, so a live
/// processor's round always ends with a quarter of its lease left, and its release comes before the end.
pub(super) fn to_lease<'t>(
    targets: impl IntoIterator<Item = &'t str>,
    leases: &Leases,
    worker: &str,
    now: u64,
    lease: Duration,
) -> Vec<&'t str> {
    let long_enough = now + lease.as_millis() as u64 * 3 / 4;
    let mut renew: Vec<&str> = targets
        .into_iter()
        .filter(|t| {
            !leases
                .get(*t)
                .is_some_and(|l| l.worker == worker && l.until > long_enough)
        })
        .collect();
    renew.sort_unstable();
    renew.dedup();
    renew
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(seq: u64, target: &str, next: u64) -> Candidate {
        Candidate {
            seq,
            target: target.into(),
            next_attempt_at: next,
        }
    }

    #[test]
    fn a_waiting_row_holds_back_its_stream_only() {
        let rows = [
            c(1, "a", 0),
            c(2, "b", 50),
            c(3, "a", 0),
            c(4, "b", 0),
            c(5, "c", 0),
        ];
        let seqs =
            |now, limit| choose(&rows, &Leases::new(), "w", now, limit, &InFlight::none()).seqs;
        assert_eq!(seqs(10, 10), [1, 3, 5]);
        assert_eq!(seqs(60, 10), [1, 2, 3, 4, 5]);
        assert_eq!(seqs(60, 2), [1, 2]);
        let waits = choose(&rows[1..2], &Leases::new(), "w", 10, 10, &InFlight::none());
        assert_eq!((waits.seqs.len(), waits.wake_at), (0, Some(50)));
    }

    #[test]
    fn rows_in_flight_are_passed_over_without_holding_back_their_streams() {
        let rows = [
            c(1, "a", 0),
            c(2, "a", 0),
            c(3, "b", 50),
            c(4, "a", 0),
            c(5, "c", 0),
            c(6, "a", 0),
        ];
        let in_flight = InFlight::new([2, 1, 5]);
        let choice = choose(&rows, &Leases::new(), "w", 10, 10, &in_flight);
        assert_eq!(choice.seqs, [4, 6], "b still waits for its retry");
        assert_eq!(choice.wake_at, Some(50));
        let two = choose(&rows, &Leases::new(), "w", 10, 2, &in_flight);
        assert_eq!(
            two.seqs,
            [4, 6],
            "rows in flight do not count against the limit"
        );
    }

    #[test]
    fn seqs_make_runs_of_consecutive_numbers() {
        assert_eq!(runs([]), []);
        assert_eq!(runs([7, 3, 4, 5, 9, 8, 4]), [(3, 5), (7, 9)]);
        assert_eq!(runs([1, 3]), [(1, 1), (3, 3)]);
    }

    #[test]
    fn in_flight_rows_are_runs_and_the_longest_is_the_range_a_query_passes_over() {
        let in_flight = InFlight::new([9, 3, 4, 5, 7, 4]);
        let inside: Vec<u64> = (0..12).filter(|s| in_flight.contains(*s)).collect();
        assert_eq!(inside, [3, 4, 5, 7, 9]);
        assert_eq!(in_flight.longest(), (3, 5));
        let none = InFlight::none();
        assert!(!none.contains(0) && !none.contains(1));
        assert_eq!(none.longest(), (1, 0), "an empty range");
    }

    #[test]
    fn a_stream_leased_to_another_live_worker_is_skipped() {
        let rows = [c(1, "a", 0), c(2, "b", 0)];
        let mut leases = Leases::new();
        leases.insert(
            "a".to_owned(),
            Lease {
                worker: "other".into(),
                until: 100,
            },
        );
        let waiting = choose(&rows, &leases, "w", 50, 10, &InFlight::none());
        assert_eq!(waiting.seqs, [2]);
        assert_eq!(waiting.waiting.len(), 1, "{waiting:?}");
        assert!(waiting.taken_over.is_empty());
        let expired = choose(&rows, &leases, "w", 150, 10, &InFlight::none());
        assert_eq!(expired.seqs, [1, 2], "an expired lease is free");
        assert_eq!(
            expired.taken_over,
            [ForeignLease {
                target: "a".into(),
                worker: "other".into(),
                until: 100
            }],
            "and taken over"
        );
        let own = choose(&rows, &leases, "other", 50, 10, &InFlight::none());
        assert_eq!(own.seqs, [1, 2], "its own lease");
        assert!(own.waiting.is_empty() && own.taken_over.is_empty());
    }

    #[test]
    fn a_lease_is_written_only_where_the_worker_lacks_half_a_lease_of_it() {
        let lease = |worker: &str, until| Lease {
            worker: worker.into(),
            until,
        };
        let leases = Leases::from([
            ("mine-long".to_owned(), lease("w", 1_800)),
            ("mine-short".to_owned(), lease("w", 1_700)),
            ("theirs-expired".to_owned(), lease("other", 900)),
        ]);
        let targets = ["new", "mine-long", "mine-short", "theirs-expired", "new"];
        // At 1000 with a lease of 1000 ms, three quarters of a lease more is 1750.
        let second = Duration::from_millis(1_000);
        let renew = to_lease(targets, &leases, "w", 1_000, second);
        assert_eq!(renew, ["mine-short", "new", "theirs-expired"]);
        assert!(
            to_lease(["mine-long"], &leases, "w", 1_000, second).is_empty(),
            "a claim of targets held long enough writes nothing"
        );
    }
}
