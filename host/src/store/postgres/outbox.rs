//! The outbox of the PostgreSQL store. Claims are serialised across every processor by a transaction
//! lock, so the per-target leases decide alone who publishes what, as in the SQLite store; their times
//! come from the database's clock, the one clock every replica shares.

use std::{collections::HashMap, time::Duration};

use postgres::Row;

use super::{message_at, pool::Conn, sql, PostgresStore};
use crate::store::{
    now_ms,
    outbox::{choose, to_lease, Candidate, Lease},
    Claim, InFlight, Outbox, OutboxCounts, OutboxItem, PendingRow, Result, RowFailure,
};

impl Outbox for PostgresStore {
    fn claim(
        &self,
        worker: &str,
        limit: usize,
        lease: Duration,
        in_flight: &InFlight,
    ) -> Result<Claim> {
        self.conn()?.transaction_after(sql::LOCK_OUTBOX, |c| {
            let window = limit as i64 * 4;
            let claimable = Claimable::read(c, window, in_flight.longest())?;
            let choice = choose(
                &claimable.candidates,
                &claimable.leases,
                worker,
                claimable.now,
                limit,
                in_flight,
            );
            let seqs: Vec<i64> = choice.seqs.iter().map(|s| *s as i64).collect();
            let items: Vec<OutboxItem> = if seqs.is_empty() {
                Vec::new()
            } else {
                c.query(sql::OUTBOX_ITEMS, &[&seqs])?
                    .iter()
                    .map(outbox_item)
                    .collect()
            };
            let targets = items.iter().map(|i| i.target.as_str());
            let renew = to_lease(targets, &claimable.leases, worker, claimable.now, lease);
            if !renew.is_empty() {
                let until = (claimable.now + lease.as_millis() as u64) as i64;
                c.execute(sql::OUTBOX_LEASE, &[&renew, &worker, &until])?;
            }
            Ok(choice.claim(items))
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
        let mut counts = OutboxCounts::default();
        let held_after = i64::from(held_after);
        for row in self.conn()?.query(sql::OUTBOX_COUNTS, &[&held_after])? {
            let figure = |i| row.get::<_, i64>(i) as u64;
            if row.get::<_, &str>(0) == "published" {
                counts.published = figure(1);
            } else {
                counts.pending += figure(1);
                counts.failing += figure(2);
                counts.held += figure(3);
            }
        }
        counts.oldest_pending_age_ms = self.pending(None, 1)?.first().map(|r| r.age_ms);
        Ok(counts)
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

/// What a claim judges, read in one statement (one snapshot): the database's clock, the oldest pending
/// rows, and every target's lease.
struct Claimable {
    now: u64,
    candidates: Vec<Candidate>,
    leases: HashMap<String, Lease>,
}

impl Claimable {
    /// `pass_over`: a run of rows in flight, left out by the query.
    fn read(c: &mut Conn, window: i64, pass_over: (u64, u64)) -> Result<Self> {
        let (first, last) = (pass_over.0 as i64, pass_over.1 as i64);
        let mut claimable = Self {
            now: 0,
            candidates: Vec::new(),
            leases: HashMap::new(),
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

fn outbox_item(r: &Row) -> OutboxItem {
    OutboxItem {
        seq: r.get::<_, i64>(0) as u64,
        target: r.get(1),
        attempts: r.get::<_, i64>(2) as u32,
        message: message_at(r, 3),
    }
}
