//! The outbox of the PostgreSQL store. Claims are serialised across every processor by a transaction
//! lock, so the per-target leases decide alone who publishes what, as in the SQLite store.

use std::{collections::HashMap, time::Duration};

use postgres::Row;

use super::{message_at, sql, PostgresStore};
use crate::store::{
    now_ms,
    outbox::{choose, Candidate, Lease},
    Outbox, OutboxCounts, OutboxItem, Result,
};

impl Outbox for PostgresStore {
    fn claim(&self, worker: &str, limit: usize, lease: Duration) -> Result<Vec<OutboxItem>> {
        let now = now_ms();
        self.conn()?.transaction(|c| {
            c.execute(sql::LOCK_OUTBOX, &[])?;
            let window = limit as i64 * 4;
            let candidates: Vec<Candidate> = c
                .query(sql::OUTBOX_CANDIDATES, &[&window])?
                .iter()
                .map(|r| Candidate {
                    seq: r.get::<_, i64>(0) as u64,
                    target: r.get(1),
                    next_attempt_at: r.get::<_, i64>(2) as u64,
                })
                .collect();
            let leases: HashMap<String, Lease> = c
                .query(sql::OUTBOX_LEASES, &[])?
                .iter()
                .map(|r| {
                    let lease = Lease {
                        worker: r.get(1),
                        until: r.get::<_, i64>(2) as u64,
                    };
                    (r.get(0), lease)
                })
                .collect();
            let seqs: Vec<i64> = choose(&candidates, &leases, worker, now, limit)
                .into_iter()
                .map(|s| s as i64)
                .collect();
            let items: Vec<OutboxItem> = c
                .query(sql::OUTBOX_ITEMS, &[&seqs])?
                .iter()
                .map(outbox_item)
                .collect();
            let mut targets: Vec<&str> = items.iter().map(|i| i.target.as_str()).collect();
            targets.sort_unstable();
            targets.dedup();
            let until = (now + lease.as_millis() as u64) as i64;
            c.execute(sql::OUTBOX_LEASE, &[&targets, &worker, &until])?;
            Ok(items)
        })
    }

    fn published(&self, _worker: &str, seqs: &[u64]) -> Result<()> {
        let seqs: Vec<i64> = seqs.iter().map(|s| *s as i64).collect();
        self.conn()?.execute(sql::OUTBOX_PUBLISHED, &[&seqs])?;
        Ok(())
    }

    fn failed(&self, _worker: &str, seq: u64, error: &str, retry_at: Option<u64>) -> Result<()> {
        let mut conn = self.conn()?;
        match retry_at {
            Some(at) => conn.execute(sql::OUTBOX_RETRY, &[&(seq as i64), &error, &(at as i64)])?,
            None => conn.execute(sql::OUTBOX_ABANDON, &[&(seq as i64), &error])?,
        };
        Ok(())
    }

    fn release(&self, worker: &str) -> Result<()> {
        self.conn()?.execute(sql::OUTBOX_RELEASE, &[&worker])?;
        Ok(())
    }

    fn counts(&self) -> Result<OutboxCounts> {
        let mut counts = OutboxCounts::default();
        for row in self.conn()?.query(sql::OUTBOX_COUNTS, &[])? {
            let n = row.get::<_, i64>(1) as u64;
            match row.get::<_, &str>(0) {
                "pending" => counts.pending = n,
                "published" => counts.published = n,
                _ => counts.abandoned += n,
            }
        }
        Ok(counts)
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
