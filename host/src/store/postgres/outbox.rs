//! The outbox of the PostgreSQL store. Claims that write a lease are serialised across every processor
//! by a transaction lock, so the per-target leases decide alone who publishes what, as in the SQLite
//! store (a claim that writes none needs no lock: see [`PostgresStore::claim`]); their times come from
//! the database's clock, the one clock every replica shares.

use std::{collections::HashSet, time::Duration};

use postgres::Row;

use super::{pool::Conn, sql, PostgresStore};
use crate::store::{
    now_ms,
    outbox::{choose, to_lease, Candidate, Choice, Lease, Leases},
    Claim, InFlight, Outbox, OutboxCounts, OutboxItem, PendingRow, Result, RowFailure,
};

impl Outbox for PostgresStore {
    /// Most claims write nothing: every target they take is one this worker already leases for long
    /// enough (see `outbox::to_lease`). Such a claim is judged on one snapshot outside a transaction,
    /// without the outbox lock: another processor never writes a lease that is live and not its own,
    /// so the leases it judged stay as they were until its round ends. Two round trips, where the
    /// locked claim takes four. A claim that must lease a target is judged again under the lock.
    fn claim(
        &self,
        worker: &str,
        limit: usize,
        lease: Duration,
        in_flight: &InFlight,
    ) -> Result<Claim> {
        let mut c = self.conn()?;
        let judged = Judged::read(&mut c, worker, limit, lease, in_flight)?;
        if judged.renew.is_empty() {
            return judged.claim(&mut c);
        }
        c.transaction_after(sql::LOCK_OUTBOX, |c| {
            let judged = Judged::read(c, worker, limit, lease, in_flight)?;
            if !judged.renew.is_empty() {
                let until = (judged.now + lease.as_millis() as u64) as i64;
                c.execute(sql::OUTBOX_LEASE, &[&judged.renew, &worker, &until])?;
            }
            judged.claim(c)
        })
    }

    fn published(&self, _worker: &str, seqs: &[u64]) -> Result<()> {
        let seqs: Vec<i64> = seqs.iter().map(|s| *s as i64).collect();
        self.conn()?.execute(sql::OUTBOX_PUBLISHED, &[&seqs])?;
        Ok(())
    }

    fn failed(&self, _worker: &str, seq: u64, error: &str, retry_at: u64) -> Result<()> {
        self.conn()?.execute(
            sql::OUTBOX_RETRY,
            &[&(seq as i64), &error, &(retry_at as i64)],
        )?;
        Ok(())
    }

    fn release(&self, worker: &str) -> Result<()> {
        self.conn()?.execute(sql::OUTBOX_RELEASE, &[&worker])?;
        Ok(())
    }

    fn settle(&self, worker: &str, published: &[u64], failed: &[RowFailure]) -> Result<()> {
        if failed.is_empty() {
            // One statement is a transaction of its own: one round trip.
            return self.published(worker, published);
        }
        let seqs: Vec<i64> = published.iter().map(|s| *s as i64).collect();
        self.conn()?.transaction(|c| {
            if !seqs.is_empty() {
                c.execute(sql::OUTBOX_PUBLISHED, &[&seqs])?;
            }
            for f in failed {
                let (seq, retry_at) = (f.seq as i64, f.retry_at as i64);
                c.execute(sql::OUTBOX_RETRY, &[&seq, &f.error, &retry_at])?;
            }
            Ok(())
        })
    }

    fn counts(&self, held_after: u32) -> Result<OutboxCounts> {
        let held_after = i64::from(held_after);
        let rows = self.conn()?.query(sql::OUTBOX_COUNTS, &[&held_after])?;
        // An aggregate without GROUP BY: one row.
        let figure = |i| rows[0].get::<_, i64>(i) as u64;
        Ok(OutboxCounts {
            pending: figure(0),
            failing: figure(1),
            held: figure(2),
            oldest_pending_age_ms: self.pending(None, 1)?.first().map(|r| r.age_ms),
        })
    }

    fn pending(&self, target: Option<&str>, limit: usize) -> Result<Vec<PendingRow>> {
        let now = now_ms();
        let rows = self
            .conn()?
            .query(sql::OUTBOX_PENDING, &[&target, &(limit as i64)])?;
        Ok(rows
            .iter()
            .map(|r| PendingRow {
                seq: r.get::<_, i64>(0) as u64,
                target: r.get(1),
                stream: r.get(2),
                message_type: r.get(3),
                attempts: r.get::<_, i64>(4) as u32,
                last_error: r.get(5),
                next_attempt_at: r.get::<_, i64>(6) as u64,
                age_ms: now.saturating_sub(r.get::<_, i64>(7).max(0) as u64),
            })
            .collect())
    }

    fn republish(&self, target: Option<&str>) -> Result<u64> {
        self.conn()?.execute(sql::OUTBOX_REPUBLISH, &[&target])
    }
}

/// A claim as judged on one snapshot: the rows chosen, and the targets to lease before taking them.
struct Judged {
    choice: Choice,
    renew: Vec<String>,
    /// The database's clock when it was read (unix ms).
    now: u64,
}

impl Judged {
    fn read(
        c: &mut Conn,
        worker: &str,
        limit: usize,
        lease: Duration,
        in_flight: &InFlight,
    ) -> Result<Self> {
        let claimable = Claimable::read(c, limit as i64 * 4, in_flight.longest())?;
        let choice = choose(
            &claimable.candidates,
            &claimable.leases,
            worker,
            claimable.now,
            limit,
            in_flight,
        );
        let chosen: HashSet<u64> = choice.seqs.iter().copied().collect();
        let targets = claimable
            .candidates
            .iter()
            .filter(|c| chosen.contains(&c.seq))
            .map(|c| c.target.as_str());
        let renew = to_lease(targets, &claimable.leases, worker, claimable.now, lease)
            .into_iter()
            .map(str::to_owned)
            .collect();
        Ok(Self {
            choice,
            renew,
            now: claimable.now,
        })
    }

    /// The claim, with the chosen rows' messages.
    fn claim(self, c: &mut Conn) -> Result<Claim> {
        if self.choice.seqs.is_empty() {
            return Ok(self.choice.claim(Vec::new()));
        }
        let seqs: Vec<i64> = self.choice.seqs.iter().map(|s| *s as i64).collect();
        let items = c.query(sql::OUTBOX_ITEMS, &[&seqs])?;
        Ok(self.choice.claim(items.iter().map(outbox_item).collect()))
    }
}

/// What a claim judges, read in one statement (one snapshot): the database's clock, the oldest pending
/// rows, and every target's lease.
struct Claimable {
    now: u64,
    candidates: Vec<Candidate>,
    leases: Leases,
}

impl Claimable {
    /// `pass_over`: a run of rows in flight, left out by the query.
    fn read(c: &mut Conn, window: i64, pass_over: (u64, u64)) -> Result<Self> {
        let (first, last) = (pass_over.0 as i64, pass_over.1 as i64);
        let mut claimable = Self {
            now: 0,
            candidates: Vec::new(),
            leases: Leases::new(),
        };
        for r in c.query(sql::OUTBOX_CLAIMABLE, &[&window, &first, &last])? {
            let at = r.get::<_, i64>(4) as u64;
            match r.get::<_, &str>(0) {
                "clock" => claimable.now = at,
                "row" => claimable.candidates.push(Candidate {
                    seq: r.get::<_, i64>(1) as u64,
                    target: r.get(2),
                    next_attempt_at: at,
                }),
                _ => {
                    let lease = Lease {
                        worker: r.get(3),
                        until: at,
                    };
                    claimable.leases.insert(r.get(2), lease);
                }
            }
        }
        Ok(claimable)
    }
}

/// A row of `outbox_items.sql`, with its message's wire form. Its text is the database's rendering of
/// `jsonb` columns: JSON, whoever wrote the message.
fn outbox_item(r: &Row) -> OutboxItem {
    OutboxItem::new(
        r.get::<_, i64>(0) as u64,
        r.get(1),
        r.get::<_, i64>(2) as u32,
        (r.get(5), r.get(6)),
        (r.get::<_, i64>(4) as u64, r.get::<_, i64>(3) as u64),
        true,
    )
}

#[cfg(test)]
mod tests {
    use std::{sync::mpsc, time::Duration};

    use super::{sql, Outbox};
    use crate::{
        message::Kind,
        store::{tests::postgres, InFlight, Store},
        unit_of_work::{NewMessage, UnitOfWork},
    };

    const LEASE: Duration = Duration::from_secs(60);

    fn publish(store: &dyn Store, stream: &str) {
        let message = NewMessage::from_json(Kind::Event, stream, "T.A.v1", "{}", None, None);
        let unit = UnitOfWork {
            messages: vec![message.unwrap()],
            publish: true,
            ..UnitOfWork::default()
        };
        store.commit(&unit).unwrap();
    }

    /// Not granted advisory locks: sessions waiting for the outbox lock.
    fn waiting_for_the_lock(db: &mut postgres::Client) -> i64 {
        let waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
        db.query_one(waiting, &[]).unwrap().get(0)
    }

    /// While another session holds the outbox lock, a processor that holds its stream's lease still
    /// claims its next row (its claim writes nothing, so it takes no lock), and one that must lease a
    /// stream waits for the lock and claims once it is free.
    #[test]
    fn only_a_claim_that_writes_a_lease_takes_the_outbox_lock() {
        let (store, server) = postgres();
        publish(&store, "shop::order-1");
        publish(&store, "shop::order-1");
        let first = store.claim("a", 1, LEASE, &InFlight::none()).unwrap();
        store.settle("a", &[first.items[0].seq], &[]).unwrap();
        publish(&store, "shop::stock-1");
        let mut db = postgres::Client::connect(&server.uri(), postgres::NoTls).unwrap();
        let mut holder = postgres::Client::connect(&server.uri(), postgres::NoTls).unwrap();
        let store = &store;
        std::thread::scope(|scope| {
            let mut lock = Some(holder.transaction().unwrap());
            lock.as_mut()
                .unwrap()
                .batch_execute(sql::LOCK_OUTBOX)
                .unwrap();
            let (a_done, a_claimed) = mpsc::channel();
            scope.spawn(move || a_done.send(store.claim("a", 1, LEASE, &InFlight::none())));
            let a = a_claimed.recv_timeout(Duration::from_secs(10));
            if a.is_err() {
                drop(lock.take());
            }
            let a = a.expect("a claim of a stream leased already waited for the outbox lock");
            let streams = |claim: &crate::store::Claim| {
                let items = claim.items.iter();
                items.map(|i| i.target.clone()).collect::<Vec<_>>()
            };
            assert_eq!(streams(&a.unwrap()), ["shop::order"]);
            let (b_done, b_claimed) = mpsc::channel();
            scope.spawn(move || b_done.send(store.claim("b", 10, LEASE, &InFlight::none())));
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while waiting_for_the_lock(&mut db) == 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let waited = waiting_for_the_lock(&mut db);
            drop(lock.take());
            assert_eq!(waited, 1, "a claim that leases a stream waits for the lock");
            let b = b_claimed.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(streams(&b.unwrap()), ["shop::stock"], "then claims");
        });
    }
}
