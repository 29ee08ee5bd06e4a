//! Partitioned groups on Redis: leases with fencing tokens (`SET PX` with an `INCR`ed token, checked by
//! Lua before every write), positions in a hash, parked keys in a hash, held entries in lists, live
//! replicas in a sorted set scored by the server's clock. Keys live under `protean:ordered:{group}:`.

use std::{collections::HashMap, sync::LazyLock, time::Duration};

use async_trait::async_trait;
use redis::{aio::ConnectionManager, Script, Value};

use super::{command, dead_letter_xadd, read_reply};
use crate::broker::{
    dead_letter_stream,
    partitions::{Claim, DeadLetterInfo, Parked, PartitionStatus, Partitions},
    Entry, Result,
};

macro_rules! script {
    ($name:ident, $file:literal) => {
        static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(include_str!(concat!("../lua/", $file))));
    };
}
script!(HEARTBEAT, "heartbeat.lua");
script!(ACQUIRE, "acquire_partition.lua");
script!(RENEW, "renew_lease.lua");
script!(RELEASE, "release_lease.lua");
script!(COMMIT_POSITIONS, "commit_positions.lua");
script!(PARK, "park_key.lua");
script!(HOLD, "hold_entries.lua");
script!(SETTLE_HELD, "settle_held.lua");
script!(RELEASE_PARKED, "release_parked.lua");
script!(COUNT_AFTER, "count_after.lua");
script!(PARTITION_COUNT, "partition_count.lua");
script!(GROUP_START, "group_start.lua");

/// Where a group's partition state lives.
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(group: &str) -> Self {
        Self {
            prefix: format!("protean:ordered:{group}"),
        }
    }
    fn members(&self) -> String {
        format!("{}:members", self.prefix)
    }
    fn lease(&self, partition: u32) -> String {
        format!("{}:lease:{partition}", self.prefix)
    }
    fn token(&self, partition: u32) -> String {
        format!("{}:token:{partition}", self.prefix)
    }
    fn positions(&self) -> String {
        format!("{}:positions", self.prefix)
    }
    fn count(&self) -> String {
        format!("{}:partitions", self.prefix)
    }
    fn start(&self, stream: &str) -> String {
        format!("{}:start:{stream}", self.prefix)
    }
    pub(super) fn parked(&self) -> String {
        format!("{}:parked", self.prefix)
    }
    pub(super) fn held(&self, key: &str) -> String {
        format!("{}:held:{key}", self.prefix)
    }
}

/// One replica's handle, on connections of its own: one for its blocking reads, one for the rest, so a
/// read given up at shutdown does not hold back the release of its partitions until its time is up.
pub(super) struct RedisPartitions {
    pub(super) reads: ConnectionManager,
    pub(super) conn: ConnectionManager,
    pub(super) keys: Keys,
    pub(super) group: String,
    pub(super) owner: String,
    pub(super) partitions: u32,
    pub(super) ttl: Duration,
    /// The streams it reads.
    pub(super) streams: Vec<String>,
    /// `group_start = "new"`: a partition with no position starts where the subscription first
    /// found its streams' ends, not at their beginning.
    pub(super) start_new: bool,
}

impl RedisPartitions {
    fn value(&self, claim: &Claim) -> String {
        format!("{} {}", self.owner, claim.token)
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// Run a pipeline of `script` invocations. Unlike a single invocation, a pipeline does not load a
    /// script the server does not know (first use, or after a restart): load it and run it again.
    async fn scripted<T: redis::FromRedisValue>(
        &mut self,
        script: &Script,
        pipe: &redis::Pipeline,
    ) -> redis::RedisResult<T> {
        match pipe.query_async(&mut self.conn).await {
            Err(error) if error.to_string().contains("NoScript") => {
                script.prepare_invoke().load_async(&mut self.conn).await?;
                pipe.query_async(&mut self.conn).await
            }
            other => other,
        }
    }
}

/// A held entry as stored in a list: `[stream, id, data]`.
pub(super) fn held_text(entry: &Entry) -> String {
    serde_json::to_string(&(
        &entry.stream,
        &entry.id,
        entry.data.as_deref().unwrap_or(""),
    ))
    .expect("strings serialize")
}

fn held_entry(text: &str) -> Option<Entry> {
    let (stream, id, data): (String, String, String) = serde_json::from_str(text).ok()?;
    Some(Entry {
        stream,
        id,
        data: Some(data),
        deliveries: 1,
    })
}

#[async_trait]
impl Partitions for RedisPartitions {
    async fn heartbeat(&mut self) -> Result<usize> {
        HEARTBEAT
            .key(self.keys.members())
            .arg(&self.owner)
            .arg(self.ttl_ms())
            .invoke_async(&mut self.conn)
            .await
            .map_err(command("EVALSHA heartbeat"))
    }

    async fn renew(&mut self, claims: &[Claim]) -> Result<Vec<u32>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for claim in claims {
            pipe.invoke_script(
                RENEW
                    .key(self.keys.lease(claim.partition))
                    .arg(self.value(claim))
                    .arg(self.ttl_ms()),
            );
        }
        let renewed: Vec<i64> = self
            .scripted(&RENEW, &pipe)
            .await
            .map_err(command("EVALSHA renew_lease"))?;
        Ok(claims
            .iter()
            .zip(renewed)
            .filter(|(_, ok)| *ok != 1)
            .map(|(c, _)| c.partition)
            .collect())
    }

    async fn free(&mut self) -> Result<Vec<u32>> {
        let leases: Vec<String> = (0..self.partitions).map(|p| self.keys.lease(p)).collect();
        let holders: Vec<Option<String>> = redis::cmd("MGET")
            .arg(leases)
            .query_async(&mut self.conn)
            .await
            .map_err(command("MGET leases"))?;
        Ok((0..self.partitions)
            .zip(holders)
            .filter(|(_, h)| h.is_none())
            .map(|(p, _)| p)
            .collect())
    }

    async fn acquire(&mut self, partition: u32) -> Result<Option<Claim>> {
        let token: Option<u64> = ACQUIRE
            .key(self.keys.lease(partition))
            .key(self.keys.token(partition))
            .arg(&self.owner)
            .arg(self.ttl_ms())
            .invoke_async(&mut self.conn)
            .await
            .map_err(command("EVALSHA acquire_partition"))?;
        Ok(token.map(|token| Claim { partition, token }))
    }

    async fn release(&mut self, claims: &[Claim]) -> Result<()> {
        let mut pipe = redis::pipe();
        for claim in claims {
            pipe.invoke_script(
                RELEASE
                    .key(self.keys.lease(claim.partition))
                    .arg(self.value(claim)),
            )
            .ignore();
        }
        self.scripted::<()>(&RELEASE, &pipe)
            .await
            .map_err(command("EVALSHA release_lease"))
    }

    async fn leave(&mut self) -> Result<()> {
        redis::cmd("ZREM")
            .arg(self.keys.members())
            .arg(&self.owner)
            .query_async::<i64>(&mut self.conn)
            .await
            .map(drop)
            .map_err(command("ZREM"))
    }

    async fn positions(&mut self, partition: u32) -> Result<HashMap<String, String>> {
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.positions())
            .query_async(&mut self.conn)
            .await
            .map_err(command("HGETALL positions"))?;
        let prefix = format!("{partition} ");
        let mut positions: HashMap<String, String> = all
            .into_iter()
            .filter_map(|(field, id)| Some((field.strip_prefix(&prefix)?.to_owned(), id)))
            .collect();
        if self.start_new {
            for stream in self.streams.clone() {
                if let std::collections::hash_map::Entry::Vacant(slot) = positions.entry(stream) {
                    let start = group_start(&mut self.conn, &self.keys, slot.key()).await?;
                    slot.insert(start);
                }
            }
        }
        Ok(positions)
    }

    async fn commit_positions(
        &mut self,
        updates: &[(Claim, Vec<(String, String)>)],
    ) -> Result<Vec<u32>> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (claim, positions) in updates {
            let mut invocation = COMMIT_POSITIONS.key(self.keys.lease(claim.partition));
            invocation.key(self.keys.positions()).arg(self.value(claim));
            for (stream, id) in positions {
                invocation
                    .arg(format!("{} {stream}", claim.partition))
                    .arg(id);
            }
            pipe.invoke_script(&invocation);
        }
        let stored: Vec<i64> = self
            .scripted(&COMMIT_POSITIONS, &pipe)
            .await
            .map_err(command("EVALSHA commit_positions"))?;
        Ok(updates
            .iter()
            .zip(stored)
            .filter(|(_, ok)| *ok != 1)
            .map(|((claim, _), _)| claim.partition)
            .collect())
    }

    async fn read(
        &mut self,
        cursors: &[(String, String)],
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(count);
        if !block.is_zero() {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS");
        for (stream, _) in cursors {
            cmd.arg(stream);
        }
        for (_, id) in cursors {
            cmd.arg(id);
        }
        // A pipeline of one, for its replies as they are (see `read_reply`).
        let mut pipe = redis::pipe();
        pipe.add_command(cmd).ignore_errors();
        let replies: Vec<Value> = pipe
            .query_async(&mut self.reads)
            .await
            .map_err(command("XREAD"))?;
        read_reply(replies).map_err(command("XREAD"))
    }

    async fn parked(&mut self) -> Result<HashMap<String, Parked>> {
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.parked())
            .query_async(&mut self.conn)
            .await
            .map_err(command("HGETALL parked"))?;
        Ok(all
            .into_iter()
            .map(|(key, state)| match state.as_str() {
                "released" => (key, Parked::Released),
                _ => (key, Parked::Waiting(state)),
            })
            .collect())
    }

    async fn dead_letter(
        &mut self,
        entry: &Entry,
        key: &str,
        parks: bool,
        failure: &DeadLetterInfo<'_>,
    ) -> Result<String> {
        let parked = if parks { "yes" } else { "no" };
        let extra = [("key", key), ("parked", parked)];
        dead_letter_xadd(&self.group, &self.owner, entry, failure, &extra)
            .query_async(&mut self.conn)
            .await
            .map_err(command("XADD dead letter"))
    }

    async fn park(&mut self, claim: &Claim, key: &str, id: &str) -> Result<()> {
        PARK.key(self.keys.lease(claim.partition))
            .key(self.keys.parked())
            .arg(self.value(claim))
            .arg(key)
            .arg(id)
            .invoke_async::<i64>(&mut self.conn)
            .await
            .map(drop)
            .map_err(command("EVALSHA park_key"))
    }

    async fn hold(&mut self, claim: &Claim, key: &str, entries: &[Entry]) -> Result<bool> {
        if entries.is_empty() {
            return Ok(true);
        }
        let mut invocation = HOLD.prepare_invoke();
        invocation
            .key(self.keys.lease(claim.partition))
            .key(self.keys.held(key))
            .arg(self.value(claim));
        for entry in entries {
            invocation.arg(held_text(entry));
        }
        let held: i64 = invocation
            .invoke_async(&mut self.conn)
            .await
            .map_err(command("EVALSHA hold_entries"))?;
        Ok(held == 1)
    }

    async fn held(&mut self, key: &str, count: usize) -> Result<Vec<Entry>> {
        let texts: Vec<String> = redis::cmd("LRANGE")
            .arg(self.keys.held(key))
            .arg(0)
            .arg(count.saturating_sub(1))
            .query_async(&mut self.conn)
            .await
            .map_err(command("LRANGE held"))?;
        // An unreadable item is handed on as an entry without data: it is dead-lettered, not lost.
        Ok(texts
            .iter()
            .map(|t| {
                held_entry(t).unwrap_or(Entry {
                    stream: "held".into(),
                    id: "0-0".into(),
                    data: None,
                    deliveries: 1,
                })
            })
            .collect())
    }

    async fn settle_held(&mut self, claim: &Claim, key: &str, count: usize) -> Result<bool> {
        let outcome: i64 = SETTLE_HELD
            .key(self.keys.lease(claim.partition))
            .key(self.keys.held(key))
            .key(self.keys.parked())
            .arg(self.value(claim))
            .arg(count)
            .arg(key)
            .invoke_async(&mut self.conn)
            .await
            .map_err(command("EVALSHA settle_held"))?;
        Ok(outcome == 1)
    }
}

/// Where the subscription started reading `stream` (fixed by the first call).
async fn group_start(conn: &mut ConnectionManager, keys: &Keys, stream: &str) -> Result<String> {
    GROUP_START
        .key(keys.start(stream))
        .key(stream)
        .invoke_async(conn)
        .await
        .map_err(command("EVALSHA group_start"))
}

/// Check that `group` runs with `partitions` partitions (fixing the count if it is the first replica).
pub(super) async fn check_count(
    conn: &mut ConnectionManager,
    group: &str,
    partitions: u32,
) -> Result<()> {
    let running: u32 = PARTITION_COUNT
        .key(Keys::new(group).count())
        .arg(partitions)
        .invoke_async(conn)
        .await
        .map_err(command("EVALSHA partition_count"))?;
    if running != partitions {
        return Err(crate::broker::Error::PartitionCount {
            group: group.to_owned(),
            running,
            configured: partitions,
        });
    }
    Ok(())
}

/// Release the key parked behind the dead letter `id` of `group`: replayed (its data goes first in
/// line) or discarded (`entry` None). False when no key is parked behind that dead letter.
pub(super) async fn release_parked(
    conn: &mut ConnectionManager,
    group: &str,
    key: &str,
    id: &str,
    entry: Option<&Entry>,
) -> Result<bool> {
    let keys = Keys::new(group);
    let released: i64 = RELEASE_PARKED
        .key(keys.parked())
        .key(keys.held(key))
        .key(dead_letter_stream(group))
        .arg(key)
        .arg(id)
        .arg(entry.map(held_text).unwrap_or_default())
        .invoke_async(conn)
        .await
        .map_err(command("EVALSHA release_parked"))?;
    Ok(released == 1)
}

/// How `group`'s partitions stand: holders (from the lease values), parked keys and held entries.
pub(super) async fn status(
    conn: &mut ConnectionManager,
    group: &str,
    streams: &[String],
    partitions: u32,
) -> Result<PartitionStatus> {
    let keys = Keys::new(group);
    let leases: Vec<String> = (0..partitions).map(|p| keys.lease(p)).collect();
    let holders: Vec<Option<String>> = redis::cmd("MGET")
        .arg(leases)
        .query_async(conn)
        .await
        .map_err(command("MGET leases"))?;
    let mut status = PartitionStatus::default();
    for holder in holders {
        match holder.as_deref().and_then(|h| h.rsplit_once(' ')) {
            Some((owner, _token)) => *status.owners.entry(owner.to_owned()).or_default() += 1,
            None => status.unowned += 1,
        }
    }
    let parked: Vec<String> = redis::cmd("HKEYS")
        .arg(keys.parked())
        .query_async(conn)
        .await
        .map_err(command("HKEYS parked"))?;
    status.parked = parked.len() as u64;
    for key in parked {
        let held: u64 = redis::cmd("LLEN")
            .arg(keys.held(&key))
            .query_async(conn)
            .await
            .map_err(command("LLEN held"))?;
        status.held += held;
    }
    status.lag = lag(conn, &keys, streams, partitions).await?;
    Ok(status)
}

/// Entries of `streams` after the lowest position any partition has stored for them (from the start
/// for a stream some partition has no position for).
async fn lag(
    conn: &mut ConnectionManager,
    keys: &Keys,
    streams: &[String],
    partitions: u32,
) -> Result<u64> {
    let positions: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.positions())
        .query_async(conn)
        .await
        .map_err(command("HGETALL positions"))?;
    let mut invocation = COUNT_AFTER.prepare_invoke();
    for stream in streams {
        // A partition without a position starts where the subscription started (group_start = "new").
        let start: Option<String> = redis::cmd("GET")
            .arg(keys.start(stream))
            .query_async(conn)
            .await
            .map_err(command("GET start"))?;
        let start = start.as_deref().unwrap_or("0-0");
        let lowest = (0..partitions)
            .map(|p| {
                positions
                    .get(&format!("{p} {stream}"))
                    .map_or(start, String::as_str)
            })
            .min_by_key(|id| crate::broker::partitions::id_key(id))
            .unwrap_or("0-0");
        invocation.key(stream).arg(lowest);
    }
    invocation
        .invoke_async(conn)
        .await
        .map_err(command("EVALSHA count_after"))
}
