//! The PostgreSQL commit ceiling: how many transactions shaped like the host's units of work a durable
//! cluster on this machine commits per second, through a minimal client (the `postgres` crate, no host
//! code), on the host's own tables (set up by `PostgresStore::setup`).
//!
//! One transaction is a sample-flow batch of 100 messages, as `host/src/store/postgres/commit.rs`
//! writes it: the store-wide append lock and the category lock, the streams' versions, 100 messages in
//! one `unnest` insert, 100 processed markers in one insert, the subscription's position, 100 documents
//! in one upsert; then COMMIT. With one connection, and with four at once (each its own subscription,
//! category and documents, as the sample flow's subscriptions are), where only the append lock is
//! shared. Twice: the append lock held to COMMIT (what the host does: global positions become visible
//! in order), and held around the message insert only (a session lock released right after it), to
//! show what holding it costs.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Barrier,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use postgres::{Client, NoTls, Statement};
use protean_host::store::PostgresStore;

use crate::{postgres::cluster::PgServer, Row};

/// Messages (and markers, and documents) per transaction: a batch of the sample flow.
const BATCH: usize = 100;
/// How long each configuration runs, in each of `ROUNDS` rounds.
const RUN: Duration = Duration::from_secs(3);
const ROUNDS: usize = 3;
/// The store-wide append lock of protean.append_unit (host/src/store/sql/postgres/migrations).
const APPEND_LOCK: i64 = 7_362_836_200_114_529_281;

pub(crate) fn rows() -> anyhow::Result<Vec<Row>> {
    let pg = PgServer::durable();
    PostgresStore::connect(&pg.store_config())?.setup()?;
    let uri = pg.uri();
    let mut rows = Vec::new();
    let cases = [
        (1, AppendLock::ToCommit, Variant::Shaped),
        (4, AppendLock::ToCommit, Variant::Shaped),
        (1, AppendLock::AroundInsert, Variant::Shaped),
        (4, AppendLock::AroundInsert, Variant::Shaped),
        (1, AppendLock::ToCommit, Variant::FlushOff),
        (1, AppendLock::ToCommit, Variant::DocumentsEach),
    ];
    // Best of `ROUNDS`, the cases alternating: on a shared machine a rate only gets worse than what
    // the database allows. Each on empty tables, so the cases are alike.
    let mut best: Vec<Option<Rate>> = cases.iter().map(|_| None).collect();
    let mut db = Client::connect(&uri, NoTls)?;
    for _ in 0..ROUNDS {
        for (case, &(connections, lock, variant)) in cases.iter().enumerate() {
            db.batch_execute(
                "TRUNCATE message_store.messages, protean.processed, protean.positions, protean.documents",
            )?;
            let rate = measure(&uri, connections, lock, variant)?;
            if best[case]
                .as_ref()
                .is_none_or(|b| b.commits_per_s < rate.commits_per_s)
            {
                best[case] = Some(rate);
            }
        }
    }
    for (&(connections, lock, variant), rate) in cases.iter().zip(best) {
        let rate = rate.context("no round")?;
        rows.push(Row {
            scenario: format!(
                "PostgreSQL commit ceiling, {connections} connection{}, {}{}",
                if connections == 1 { "" } else { "s" },
                lock.label(),
                variant.label()
            ),
            setup: format!(
                "minimal client, durable cluster, host tables; each transaction: append lock, category lock, stream versions, {BATCH} messages (unnest), {BATCH} processed markers, position upsert, {BATCH} document upserts, COMMIT; best of {ROUNDS} rounds of {} s; commit p50 {:.1} ms, p99 {:.1} ms",
                RUN.as_secs(),
                rate.p50_ms,
                rate.p99_ms
            ),
            result: format!(
                "{:.0} commits/s, {:.0} messages/s",
                rate.commits_per_s,
                rate.commits_per_s * BATCH as f64
            ),
            target: "-".into(),
            ok: true,
        });
    }
    Ok(rows)
}

/// How long the store-wide append lock is held.
#[derive(Clone, Copy)]
enum AppendLock {
    /// A transaction lock, as the host takes it.
    ToCommit,
    /// A session lock released right after the message insert.
    AroundInsert,
}

impl AppendLock {
    fn label(self) -> &'static str {
        match self {
            Self::ToCommit => "append lock to COMMIT (as the host)",
            Self::AroundInsert => "append lock around the insert only",
        }
    }
}

/// The transaction as described, or one thing changed to see what it costs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// As described, durable.
    Shaped,
    /// `synchronous_commit = off`, not durable: what the statements cost without the WAL flush.
    FlushOff,
    /// The documents one upsert statement each, as the host sent them before it wrote a unit's
    /// documents in a handful of set-based statements (`Shaped` writes them as it does now).
    DocumentsEach,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Self::Shaped => "",
            Self::FlushOff => ", synchronous_commit off (not durable: the work without the flush)",
            Self::DocumentsEach => {
                ", documents one statement each (as the host sent them before it wrote them set-based)"
            }
        }
    }
}

struct Rate {
    commits_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Run `connections` writers at once for `RUN`; commits per second over all, and commit durations.
fn measure(
    uri: &str,
    connections: usize,
    lock: AppendLock,
    variant: Variant,
) -> anyhow::Result<Rate> {
    let start = Arc::new(Barrier::new(connections));
    let writers: Vec<_> = (0..connections)
        .map(|id| {
            let (uri, start) = (uri.to_owned(), start.clone());
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut writer = Writer::connect(&uri, id, lock, variant)?;
                if variant == Variant::FlushOff {
                    writer
                        .client
                        .batch_execute("SET synchronous_commit = off")?;
                }
                start.wait();
                let until = Instant::now() + RUN;
                let mut durations = Vec::new();
                while Instant::now() < until {
                    let started = Instant::now();
                    writer.commit()?;
                    durations.push(started.elapsed());
                }
                Ok(durations)
            })
        })
        .collect();
    let mut durations = Vec::new();
    for writer in writers {
        durations.extend(
            writer
                .join()
                .map_err(|_| anyhow::anyhow!("writer panicked"))??,
        );
    }
    durations.sort_unstable();
    let at = |q: f64| durations[((durations.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    Ok(Rate {
        commits_per_s: durations.len() as f64 / RUN.as_secs_f64(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    })
}

/// One connection writing as one subscription of the sample flow would: its own category, streams,
/// position and documents.
struct Writer {
    client: Client,
    id: usize,
    /// Unique among every writer of the run: names its messages' ids.
    serial: usize,
    lock: AppendLock,
    variant: Variant,
    statements: Statements,
    /// Units committed so far: names fresh message ids and markers.
    units: usize,
    /// This writer's category: it alone writes there, as a subscription of the sample flow writes its
    /// own aggregates.
    category: String,
    data: String,
    metadata: String,
}

struct Statements {
    xact_lock: Statement,
    session_lock: Statement,
    unlock: Statement,
    categories: Statement,
    versions: Statement,
    append: Statement,
    processed: Statement,
    position: Statement,
    documents: Statement,
    document: Statement,
}

impl Writer {
    fn connect(uri: &str, id: usize, lock: AppendLock, variant: Variant) -> anyhow::Result<Self> {
        let mut client = Client::connect(uri, NoTls).context("connect to PostgreSQL")?;
        let statements = Statements {
            xact_lock: client.prepare("SELECT pg_advisory_xact_lock($1)")?,
            session_lock: client.prepare("SELECT pg_advisory_lock($1)")?,
            unlock: client.prepare("SELECT pg_advisory_unlock($1)")?,
            categories: client.prepare(
                "SELECT pg_advisory_xact_lock(message_store.hash_64(c)) FROM unnest($1::text[]) AS c ORDER BY c",
            )?,
            versions: client.prepare(
                "SELECT s, (SELECT max(m.position) FROM message_store.messages m WHERE m.stream_name = s) \
                 FROM unnest($1::text[]) AS s",
            )?,
            append: client.prepare(
                "INSERT INTO message_store.messages (id, stream_name, position, type, data, metadata, time) \
                 SELECT id::uuid, stream_name, position, type, data::jsonb, metadata::jsonb, \
                        time::timestamptz AT TIME ZONE 'utc' \
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[]) \
                     AS t (id, stream_name, position, type, data, metadata, time) \
                 RETURNING global_position",
            )?,
            processed: client.prepare(
                "INSERT INTO protean.processed (subscription, message_id, build_id) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING",
            )?,
            position: client.prepare(
                "INSERT INTO protean.positions (subscription, position) VALUES ($1, $2) \
                 ON CONFLICT (subscription) DO UPDATE SET position = excluded.position, updated_at = now()",
            )?,
            documents: client.prepare(
                "INSERT INTO protean.documents (collection, id, data) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) \
                 ON CONFLICT (collection, id) DO UPDATE SET data = excluded.data, \
                     version = nextval('protean.document_versions')",
            )?,
            document: client.prepare(
                "INSERT INTO protean.documents (collection, id, data) VALUES ($1, $2, $3) \
                 ON CONFLICT (collection, id) DO UPDATE SET data = excluded.data, \
                     version = nextval('protean.document_versions')",
            )?,
        };
        // A message the size of the sample flow's: its data, and the metadata the host gives one.
        let sample = protean_host::unit_of_work::NewMessage::new(
            protean_host::message::Kind::Event,
            "fulfilment::order-o1",
            "Fulfilment.OrderPlaced.v1",
            &serde_json::json!({"order_id": "o1", "customer": "ada", "sku": "book", "quantity": 1, "total": 10.0}),
            None,
            None,
            None,
        );
        static WRITERS: AtomicUsize = AtomicUsize::new(0);
        Ok(Self {
            client,
            id,
            serial: WRITERS.fetch_add(1, Ordering::Relaxed),
            lock,
            variant,
            statements,
            units: 0,
            category: format!("ceiling{id}::order"),
            data: sample.data,
            metadata: sample.metadata,
        })
    }

    /// One unit of work: `BATCH` messages over `BATCH` streams, their markers, the position, `BATCH`
    /// documents (1,000 per writer, so most upserts replace one).
    fn commit(&mut self) -> anyhow::Result<()> {
        let unit = self.units;
        self.units += 1;
        let streams: Vec<String> = (0..BATCH)
            .map(|i| format!("{}-o{}", self.category, (unit * BATCH + i) % 1000))
            .collect();
        let ids: Vec<String> = (0..BATCH)
            .map(|i| {
                format!(
                    "{:08x}-0000-4000-8000-{:012x}",
                    self.serial,
                    unit * BATCH + i
                )
            })
            .collect();
        let time = protean_host::message::format_time(chrono::Utc::now());
        let s = &self.statements;
        let mut tx = self.client.transaction()?;
        match self.lock {
            AppendLock::ToCommit => {
                tx.query(&s.xact_lock, &[&APPEND_LOCK])?;
            }
            AppendLock::AroundInsert => {
                tx.query(&s.session_lock, &[&APPEND_LOCK])?;
            }
        }
        tx.query(&s.categories, &[&vec![self.category.as_str()]])?;
        let versions: HashMap<String, i64> = tx
            .query(&s.versions, &[&streams])?
            .iter()
            .map(|r| (r.get(0), r.get::<_, Option<i64>>(1).unwrap_or(-1)))
            .collect();
        let positions: Vec<i64> = streams.iter().map(|s| versions[s] + 1).collect();
        fn column(value: &str) -> Vec<&str> {
            vec![value; BATCH]
        }
        let rows = tx.query(
            &s.append,
            &[
                &ids,
                &streams,
                &positions,
                &column("Fulfilment.OrderPlaced.v1"),
                &column(&self.data),
                &column(&self.metadata),
                &column(&time),
            ],
        )?;
        if let AppendLock::AroundInsert = self.lock {
            tx.query(&s.unlock, &[&APPEND_LOCK])?;
        }
        let global: i64 = rows.iter().map(|r| r.get::<_, i64>(0)).max().unwrap_or(0);
        let subscription = format!("ceiling-{}", self.id);
        let markers: Vec<String> = streams
            .iter()
            .zip(&positions)
            .map(|(stream, position)| format!("source-{stream}@{position}"))
            .collect();
        tx.execute(
            &s.processed,
            &[&column(&subscription), &markers, &column("bench-build")],
        )?;
        tx.execute(&s.position, &[&subscription, &global])?;
        let documents: Vec<String> = streams
            .iter()
            .map(|stream| stream.rsplit('-').next().unwrap_or_default().to_owned())
            .collect();
        let collection = format!("orders{}", self.id);
        if self.variant == Variant::DocumentsEach {
            for id in &documents {
                tx.execute(&s.document, &[&collection, id, &self.data])?;
            }
        } else {
            tx.execute(
                &s.documents,
                &[&column(&collection), &documents, &column(&self.data)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}
