//! The Redis Streams broker: `XADD` to publish, consumer groups to consume, `XAUTOCLAIM` to take over
//! the entries of dead consumers, `SET NX PX` for leases.
//!
//! Each consumer has a connection of its own (a `ConnectionManager`, which reconnects after Redis
//! restarts), so a blocked `XREADGROUP` never holds up publishing or acknowledging.

use std::{collections::HashMap, sync::LazyLock, time::Duration};

use async_trait::async_trait;
use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    streams::StreamPendingCountReply,
    Client, Script, Value,
};
use tokio_util::sync::CancellationToken;

mod keeper;
mod partitions;
mod unblock;

use self::{keeper::Keeper, partitions::RedisPartitions, unblock::Unblocker};
use super::{
    dead_letter_stream,
    partitions::{DeadLetterInfo, PartitionStatus, Partitions},
    replay_stream, Broker, BrokerConfig, Consumer, DeadLetterAdmin, DeadLetterEntry, Entry, Error,
    GroupStart, GroupStatus, Result,
};
use crate::{ownership::Owned, redact::ConnectionString};

// `[brokers.default]`, resolved beside the broker that reads it.
mod config;
pub(crate) use self::config::BrokerSection;

static TAKE_LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/take_lease.lua")));
static RELEASE_LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/release_lease.lua")));
static DROP_GONE_CONSUMERS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/drop_gone_consumers.lua")));
static GROUP_BACKLOG: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/group_backlog.lua")));

/// Unread entries are counted up to this many per stream (a count costs Redis time); past it the
/// figure is the larger of the cap and Redis' own lag.
const UNREAD_CAP: u64 = 10_000;

/// How a group stands on one stream, counted by `group_backlog.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GroupFigures {
    unread: u64,
    pending: u64,
    consumers: u64,
}

impl GroupFigures {
    /// From the script's five numbers: `None` when the group does not exist on the stream.
    fn of(numbers: &[i64]) -> Option<Self> {
        let [exists, unread, pending, consumers, redis_lag] = numbers else {
            return None;
        };
        let unread = *unread as u64;
        // At the cap the count stopped: more are unread, maybe as many as Redis says.
        let unread = if unread >= UNREAD_CAP {
            unread.max(u64::try_from(*redis_lag).unwrap_or(0))
        } else {
            unread
        };
        (*exists == 1).then_some(Self {
            unread,
            pending: *pending as u64,
            consumers: *consumers as u64,
        })
    }
}

/// Commands that do not block get this long to answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A Redis server used as the broker.
pub struct RedisBroker {
    client: Client,
    commands: ConnectionManager,
    config: BrokerConfig,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("uri", &self.config.uri)
            .finish_non_exhaustive()
    }
}

fn command(name: &'static str) -> impl FnOnce(redis::RedisError) -> Error {
    move |source| Error::Command {
        command: name,
        source,
    }
}

async fn manager(
    client: &Client,
    uri: &ConnectionString,
    response_timeout: Duration,
) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2);
    ConnectionManager::new_with_config(client.clone(), config)
        .await
        .map_err(|e| connect_error(uri, &e))
}

/// A failed connection, with the server's reason; a refused password is told apart from an
/// unreachable server, since the fix differs.
fn connect_error(uri: &ConnectionString, error: &redis::RedisError) -> Error {
    let reason = error.to_string();
    let uri = uri.clone();
    let credentials = error.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("NOAUTH" | "WRONGPASS"));
    if credentials {
        Error::Credentials { uri, reason }
    } else {
        Error::Connect { uri, reason }
    }
}

/// A client for `config.uri`, with its certificates when it has any.
async fn client(config: &BrokerConfig) -> Result<Client> {
    let uri = config.uri.expose();
    let tls = &config.tls;
    let client = if *tls == super::TlsFiles::default() {
        Client::open(uri)
    } else {
        let read = |key: &'static str, path: &std::path::PathBuf| {
            std::fs::read(path).map_err(|source| Error::TlsFile {
                key,
                path: path.clone(),
                source,
            })
        };
        let root_cert = tls
            .ca_file
            .as_ref()
            .map(|p| read("tls_ca_file", p))
            .transpose()?;
        let client_tls = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read("tls_cert_file", cert)?,
                client_key: read("tls_key_file", key)?,
            }),
            _ => None,
        };
        let certificates = redis::TlsCertificates {
            client_tls,
            root_cert,
        };
        Client::build_with_tls(uri, certificates)
    };
    client.map_err(|e| Error::Uri {
        uri: config.uri.clone(),
        reason: e.to_string(),
    })
}

impl RedisBroker {
    /// Connect to `config.uri`.
    pub async fn connect(config: &BrokerConfig) -> Result<Self> {
        let client = client(config).await?;
        let commands = manager(&client, &config.uri, RESPONSE_TIMEOUT).await?;
        // Connecting sends no command when the URI has no password: a server that wants one would
        // only say so (NOAUTH) at the first real command, deep inside a loop.
        redis::cmd("PING")
            .query_async::<()>(&mut commands.clone())
            .await
            .map_err(|e| connect_error(&config.uri, &e))?;
        Ok(Self {
            client,
            commands,
            config: config.clone(),
        })
    }

    fn lease_key(name: &str) -> String {
        format!("protean:lease:{name}")
    }

    /// How `group` stands on each of `streams` (`None` where it does not exist), in one round trip.
    async fn group_figures(
        &self,
        streams: &[String],
        group: &str,
    ) -> Result<Vec<Option<GroupFigures>>> {
        if streams.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = GROUP_BACKLOG.prepare_invoke();
        for stream in streams {
            invocation.key(stream);
        }
        let numbers: Vec<i64> = invocation
            .arg(group)
            .arg(UNREAD_CAP)
            .invoke_async(&mut self.commands.clone())
            .await
            .map_err(command("EVALSHA group_backlog"))?;
        Ok(numbers.chunks(5).map(GroupFigures::of).collect())
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, stream: &str, payloads: Vec<String>) -> Result<()> {
        let mut pipe = redis::pipe();
        for payload in payloads {
            // Sized up front: grown argument by argument, a command's buffer was reallocated and
            // copied several times per entry.
            let mut xadd = redis::Cmd::with_capacity(5, 9 + stream.len() + payload.len());
            xadd.arg("XADD")
                .arg(stream)
                .arg("*")
                .arg("data")
                .arg(payload);
            pipe.add_command(xadd).ignore();
        }
        let mut conn = self.commands.clone();
        match pipe.query_async::<()>(&mut conn).await {
            Err(_) => pipe.query_async::<()>(&mut conn).await,
            done => done,
        }
        .map_err(command("XADD"))
    }

    async fn consumer(
        &self,
        streams: Vec<String>,
        group: &str,
        consumer: &str,
    ) -> Result<Box<dyn Consumer>> {
        let mut conn = manager(
            &self.client,
            &self.config.uri,
            self.config.block + RESPONSE_TIMEOUT,
        )
        .await?;
        let start = match self.config.group_start {
            GroupStart::Beginning => "0",
            GroupStart::New => "$",
        };
        for stream in &streams {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(group)
                .arg(start)
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match created {
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                other => other.map_err(command("XGROUP CREATE"))?,
            }
        }
        let keeper = Keeper::start(
            manager(&self.client, &self.config.uri, RESPONSE_TIMEOUT).await?,
            streams.clone(),
            group.to_owned(),
            consumer.to_owned(),
            self.config.claim_idle,
        );
        Ok(Box::new(RedisConsumer {
            conn,
            commands: self.commands.clone(),
            blocked: false,
            client: ClientId::Unasked,
            streams,
            group: group.to_owned(),
            name: consumer.to_owned(),
            maybe_pending: true,
            read_new: false,
            unsettled: 0,
            to_ack: Vec::new(),
            _keeper: keeper,
        }))
    }

    async fn backlog(&self, streams: &[String], group: &str) -> Result<u64> {
        let mut conn = self.commands.clone();
        let mut total = 0;
        for (stream, figures) in streams
            .iter()
            .zip(self.group_figures(streams, group).await?)
        {
            match figures {
                Some(f) => total += f.unread + f.pending,
                // A group not created yet will read the whole stream when it starts from the beginning.
                None if self.config.group_start == GroupStart::Beginning => {
                    total += redis::cmd("XLEN")
                        .arg(stream)
                        .query_async::<u64>(&mut conn)
                        .await
                        .map_err(command("XLEN"))?;
                }
                None => {}
            }
        }
        Ok(total)
    }

    async fn group_status(&self, streams: &[String], group: &str) -> Result<GroupStatus> {
        let mut status = GroupStatus::default();
        for figures in self
            .group_figures(streams, group)
            .await?
            .into_iter()
            .flatten()
        {
            status.exists = true;
            status.lag += figures.unread;
            status.pending += figures.pending;
            status.consumers = status.consumers.max(figures.consumers);
        }
        status.dead_letters = redis::cmd("XLEN")
            .arg(dead_letter_stream(group))
            .query_async(&mut self.commands.clone())
            .await
            .map_err(command("XLEN"))?;
        Ok(status)
    }

    async fn lease_holder(&self, name: &str) -> Result<Option<String>> {
        redis::cmd("GET")
            .arg(Self::lease_key(name))
            .query_async(&mut self.commands.clone())
            .await
            .map_err(command("GET"))
    }

    async fn ping(&self) -> Result<()> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.commands.clone())
            .await
            .map(drop)
            .map_err(command("PING"))
    }

    async fn lease(&self, owned: &Owned, owner: &str, ttl: Duration) -> Result<Option<u64>> {
        let key = Self::lease_key(&owned.key());
        TAKE_LEASE
            .key(&key)
            .key(format!("{key}:token"))
            .arg(owner)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.commands.clone())
            .await
            .map_err(command("EVALSHA take_lease"))
    }

    fn dead_letters(&self) -> Option<&dyn DeadLetterAdmin> {
        Some(self)
    }

    async fn partitions(
        &self,
        group: &str,
        streams: &[String],
        owner: &str,
        partitions: u32,
        ttl: Duration,
    ) -> Result<Box<dyn Partitions>> {
        let reads = manager(
            &self.client,
            &self.config.uri,
            self.config.block + RESPONSE_TIMEOUT,
        )
        .await?;
        let mut conn = manager(&self.client, &self.config.uri, RESPONSE_TIMEOUT).await?;
        partitions::check_count(&mut conn, group, partitions).await?;
        Ok(Box::new(RedisPartitions {
            reads,
            conn,
            keys: partitions::Keys::new(group),
            group: group.to_owned(),
            owner: owner.to_owned(),
            partitions,
            ttl,
            streams: streams.to_vec(),
            start_new: self.config.group_start == GroupStart::New,
        }))
    }

    async fn partition_status(
        &self,
        group: &str,
        streams: &[String],
        partitions: u32,
    ) -> Result<PartitionStatus> {
        partitions::status(&mut self.commands.clone(), group, streams, partitions).await
    }

    async fn release(&self, owned: &Owned, owner: &str) -> Result<()> {
        let mut conn = self.commands.clone();
        RELEASE_LEASE
            .key(Self::lease_key(&owned.key()))
            .arg(owner)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(drop)
            .map_err(command("EVALSHA release_lease"))
    }
}

#[async_trait]
impl DeadLetterAdmin for RedisBroker {
    async fn list(&self, group: &str, limit: usize) -> Result<Vec<DeadLetterEntry>> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(dead_letter_stream(group))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit.min(i64::MAX as usize))
            .query_async(&mut self.commands.clone())
            .await
            .map_err(command("XRANGE"))?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| DeadLetterEntry {
                id: entry.id,
                fields: entry
                    .map
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), text(Some(v))?)))
                    .collect(),
            })
            .collect())
    }

    async fn replay(&self, group: &str, id: &str) -> Result<bool> {
        let mut conn = self.commands.clone();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(dead_letter_stream(group))
            .arg(id)
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(command("XRANGE"))?;
        let Some(entry) = reply.ids.into_iter().next() else {
            return Ok(false);
        };
        let field = |name: &str| entry.map.get(name).and_then(|v| text(Some(v)));
        let data = field("data").unwrap_or_default();
        // A dead letter that parked its key goes back first in that key's line, so the key stays in order.
        if let (Some(key), Some("yes")) = (field("key"), field("parked").as_deref()) {
            let original = Entry {
                stream: field("original_stream").unwrap_or_default(),
                id: field("original_id").unwrap_or_default(),
                data: Some(data.clone()),
                deliveries: 1,
            };
            if partitions::release_parked(&mut conn, group, &key, id, Some(&original)).await? {
                return Ok(true);
            }
        }
        // Add to the group's replay stream first: a crash in between leaves a duplicate, never a loss.
        redis::cmd("XADD")
            .arg(replay_stream(group))
            .arg("*")
            .arg("data")
            .arg(data)
            .query_async::<String>(&mut conn)
            .await
            .map_err(command("XADD replay"))?;
        redis::cmd("XDEL")
            .arg(dead_letter_stream(group))
            .arg(id)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(command("XDEL"))?;
        Ok(true)
    }

    async fn purge(&self, group: &str) -> Result<u64> {
        let mut conn = self.commands.clone();
        // Discarding the dead letters of parked keys releases those keys.
        for letter in self.list(group, usize::MAX).await? {
            let parked = letter.fields.get("parked").map(String::as_str) == Some("yes");
            if let (true, Some(key)) = (parked, letter.fields.get("key")) {
                partitions::release_parked(&mut conn, group, key, &letter.id, None).await?;
            }
        }
        let count: u64 = redis::cmd("XLEN")
            .arg(dead_letter_stream(group))
            .query_async(&mut conn)
            .await
            .map_err(command("XLEN"))?;
        redis::cmd("DEL")
            .arg(dead_letter_stream(group))
            .query_async::<i64>(&mut conn)
            .await
            .map_err(command("DEL"))?;
        Ok(count)
    }
}

/// The `XADD` of a dead letter to `group`'s dead-letter stream: the entry's data, where it came from,
/// who failed it, why, and `extra` fields (an ordered subscription's key).
fn dead_letter_xadd(
    group: &str,
    consumer: &str,
    entry: &Entry,
    failure: &DeadLetterInfo<'_>,
    extra: &[(&str, &str)],
) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(dead_letter_stream(group))
        .arg("*")
        .arg("data")
        .arg(entry.data.as_deref().unwrap_or_default())
        .arg("original_stream")
        .arg(&entry.stream)
        .arg("original_id")
        .arg(&entry.id)
        .arg("group")
        .arg(group)
        .arg("consumer")
        .arg(consumer);
    for (field, value) in extra {
        cmd.arg(*field).arg(*value);
    }
    cmd.arg("error")
        .arg(failure.error)
        .arg("attempts")
        .arg(failure.attempts)
        .arg("build_id")
        .arg(failure.build_id)
        .arg("failed_at")
        .arg(crate::message::format_time(chrono::Utc::now()));
    cmd
}

/// The entries of an `XREADGROUP` reply, stream by stream, in order; `None` when the reply has another
/// shape. Read from the reply itself, each payload's bytes taken rather than copied: the client's
/// `StreamReadReply` clones the whole reply and builds a map per entry.
fn entries(reply: Value) -> Option<Vec<Entry>> {
    let streams = match reply {
        Value::Nil => return Some(Vec::new()),
        // RESP2: [[stream, [[id, [field, value, …]], …]], …]
        Value::Array(streams) => streams
            .into_iter()
            .map(|s| match s {
                Value::Array(pair) => two(pair),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?,
        // RESP3: {stream: [[id, [field, value, …]], …], …}
        Value::Map(streams) => streams,
        _ => return None,
    };
    let mut entries = Vec::new();
    for (stream, list) in streams {
        let stream = into_text(stream)?;
        let Value::Array(list) = list else {
            return None;
        };
        entries.reserve(list.len());
        for item in list {
            let Value::Array(item) = item else {
                return None;
            };
            let (id, fields) = two(item)?;
            entries.push(Entry {
                stream: stream.clone(),
                id: into_text(id)?,
                data: data_field(fields)?,
                deliveries: 1,
            });
        }
    }
    Some(entries)
}

/// The entries of a read's reply, the last of its pipeline's replies; the first error any of them is,
/// an acknowledgement's included.
fn read_reply(mut replies: Vec<Value>) -> redis::RedisResult<Vec<Entry>> {
    if let Some(Value::ServerError(error)) =
        replies.iter().find(|r| matches!(r, Value::ServerError(_)))
    {
        return Err(error.clone().into());
    }
    let reply = replies.pop().ok_or_else(unknown_shape)?;
    entries(reply).ok_or_else(unknown_shape)
}

/// The error of a read reply [`entries`] cannot read.
fn unknown_shape() -> redis::RedisError {
    (
        redis::ErrorKind::UnexpectedReturnType,
        "a stream read reply of an unknown shape",
    )
        .into()
}

/// The two values of a two-element array.
fn two(pair: Vec<Value>) -> Option<(Value, Value)> {
    let [a, b]: [Value; 2] = pair.try_into().ok()?;
    Some((a, b))
}

/// An entry's `data` field (`Some(None)` when it has none, or no fields at all: an entry deleted while
/// pending); `None` when the fields have another shape.
fn data_field(fields: Value) -> Option<Option<String>> {
    let pairs: Vec<(Value, Value)> = match fields {
        Value::Nil => return Some(None),
        Value::Array(flat) => {
            let mut pairs = Vec::with_capacity(flat.len() / 2);
            let mut flat = flat.into_iter();
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        _ => return None,
    };
    // The last one wins, as in a map of the fields.
    let data = pairs
        .into_iter()
        .filter(|(k, _)| {
            matches!(k, Value::BulkString(b) if b == b"data")
                || matches!(k, Value::SimpleString(s) if s == "data")
        })
        .last();
    Some(data.and_then(|(_, v)| into_text(v)))
}

fn text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Like [`text`], taking the bytes instead of copying them (an entry's payload).
fn into_text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// One consumer, on a connection of its own.
struct RedisConsumer {
    conn: ConnectionManager,
    /// The broker's connection for commands that never block: what this consumer sends while `conn`
    /// may be held by a blocking read that was given up.
    commands: ConnectionManager,
    /// A blocking read went out on `conn` and its answer was not awaited: given up after a stop
    /// ([`unblock`]), or its task dropped. Redis answers nothing else on `conn` until that read ends,
    /// which for an empty read is at its block or later, at the server's next timer tick.
    blocked: bool,
    /// `conn` as Redis names it, to end its blocking read at a stop ([`unblock`]).
    client: ClientId,
    streams: Vec<String>,
    group: String,
    name: String,
    /// Whether this consumer may have pending entries (at start, after a failure, after a reclaim).
    maybe_pending: bool,
    /// Whether the last read took new entries (`>`), not pending ones.
    read_new: bool,
    /// Entries read and not yet acknowledged: if some are left at a read, they are pending on this
    /// consumer (a retry, a failed ack, a read-ahead given up) and are read again first.
    unsettled: usize,
    /// Acknowledgements not sent yet: they go in one pipeline with the next read, which saves a round
    /// trip per batch (an entry acknowledged late is at worst redelivered and recognised as processed).
    to_ack: Vec<(String, String)>,
    /// Keeps the entries pending here from being taken over while this consumer lives.
    _keeper: Keeper,
}

/// A consumer's connection as Redis names it (`CLIENT ID`). Asked before its first blocking read, and
/// again after a failed read: the manager may have connected anew.
#[derive(Debug, Clone, Copy)]
enum ClientId {
    Unasked,
    Known(i64),
    /// Redis did not say (a user without the right to `CLIENT ID`): the question is not asked again
    /// before each read.
    Unknown,
}

impl RedisConsumer {
    /// Read from `from` with the acknowledgements not sent yet. A read that may wait is given its
    /// block and the stop that ends it early ([`unblock`]).
    async fn read_group(
        &mut self,
        count: usize,
        block: Option<(Duration, &CancellationToken)>,
        from: &str,
    ) -> Result<Vec<Entry>> {
        // Stopped already: what is there now, without a wait to end.
        let block = block.filter(|(_, stop)| !stop.is_cancelled());
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(count);
        let ender = match block {
            Some((block, stop)) => {
                cmd.arg("BLOCK").arg(block.as_millis() as u64);
                let client = self.client_id().await;
                let commands = self.commands.clone();
                Some((Unblocker { commands, client }, stop))
            }
            None => None,
        };
        cmd.arg("STREAMS").arg(&self.streams);
        for _ in &self.streams {
            cmd.arg(from);
        }
        let mut pipe = self.acks();
        pipe.add_command(cmd);
        // Every reply comes back as it is, errors included (`read_reply` looks for them): the
        // crate's own check rebuilds the whole reply, a few percent of the reader's CPU.
        pipe.ignore_errors();
        self.blocked = block.is_some();
        let query = pipe.query_async::<Vec<Value>>(&mut self.conn);
        let answer = match ender {
            Some((unblocker, stop)) => unblock::answer(query, unblocker, stop).await,
            None => Some(query.await),
        };
        let Some(answer) = answer else {
            // Given up: `conn` stays held by the read (`blocked`), and what it was given is pending.
            self.maybe_pending = true;
            return Err(command("XREADGROUP")(
                (redis::ErrorKind::Io, "no answer after a stop").into(),
            ));
        };
        self.blocked = false;
        let entries = match answer.and_then(read_reply) {
            Ok(entries) => entries,
            Err(error) => {
                // The acknowledgements may not have arrived: look at what is pending before new entries.
                self.maybe_pending = true;
                self.client = ClientId::Unasked;
                return Err(command("XREADGROUP")(error));
            }
        };
        self.to_ack.clear();
        Ok(entries)
    }

    /// `conn`'s id, asked before its first blocking read (and again after a failed read).
    async fn client_id(&mut self) -> Option<i64> {
        if let ClientId::Unasked = self.client {
            let id = redis::cmd("CLIENT")
                .arg("ID")
                .query_async(&mut self.conn)
                .await;
            self.client = id.map_or(ClientId::Unknown, ClientId::Known);
        }
        match self.client {
            ClientId::Known(id) => Some(id),
            ClientId::Unasked | ClientId::Unknown => None,
        }
    }

    /// A pipeline with the acknowledgements not sent yet (XACK per stream).
    fn acks(&self) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for stream in &self.streams {
            let ids: Vec<&str> = self
                .to_ack
                .iter()
                .filter(|(s, _)| s == stream)
                .map(|(_, id)| id.as_str())
                .collect();
            if !ids.is_empty() {
                pipe.cmd("XACK").arg(stream).arg(&self.group).arg(ids);
            }
        }
        pipe
    }

    /// This consumer's pending entries first, when it may have some; else new ones.
    async fn read_entries(
        &mut self,
        count: usize,
        block: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Entry>> {
        self.read_new = false;
        if self.maybe_pending {
            let mut pending = self.read_group(count, None, "0").await?;
            if !pending.is_empty() {
                self.fill_deliveries(&mut pending).await?;
                return Ok(pending);
            }
            self.maybe_pending = false;
        }
        let entries = self.read_group(count, Some((block, stop)), ">").await?;
        self.read_new = true;
        Ok(entries)
    }

    /// Fill in how often each pending entry has been delivered (Redis counts, so it survives restarts).
    async fn fill_deliveries(&mut self, entries: &mut [Entry]) -> Result<()> {
        for stream in &self.streams {
            let ids: Vec<&str> = entries
                .iter()
                .filter(|e| &e.stream == stream)
                .map(|e| e.id.as_str())
                .collect();
            let (Some(first), Some(last)) = (ids.first(), ids.last()) else {
                continue;
            };
            let pending: StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(stream)
                .arg(&self.group)
                .arg(*first)
                .arg(*last)
                .arg(ids.len())
                .arg(&self.name)
                .query_async(&mut self.conn)
                .await
                .map_err(command("XPENDING"))?;
            let counts: HashMap<String, usize> = pending
                .ids
                .into_iter()
                .map(|p| (p.id, p.times_delivered))
                .collect();
            for entry in entries.iter_mut().filter(|e| &e.stream == stream) {
                entry.deliveries = counts.get(&entry.id).copied().unwrap_or(1) as u32;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn read(
        &mut self,
        count: usize,
        block: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Entry>> {
        self.maybe_pending |= self.unsettled > 0;
        let entries = self.read_entries(count, block, stop).await?;
        self.unsettled = entries.len();
        Ok(entries)
    }

    async fn read_ahead(&mut self, count: usize) -> Result<Vec<Entry>> {
        let entries = self.read_group(count, None, ">").await?;
        self.unsettled += entries.len();
        Ok(entries)
    }

    fn read_new(&self) -> bool {
        self.read_new
    }

    async fn ack(&mut self, entries: &[(String, String)]) -> Result<()> {
        self.to_ack.extend_from_slice(entries);
        self.unsettled = self.unsettled.saturating_sub(entries.len());
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.to_ack.is_empty() {
            return Ok(());
        }
        let acks = self.acks();
        // Behind a read given up, the acknowledgements would wait for that read to end.
        let conn = match self.blocked {
            true => &mut self.commands,
            false => &mut self.conn,
        };
        acks.query_async::<()>(conn)
            .await
            .map_err(command("XACK"))?;
        self.to_ack.clear();
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        entry: &Entry,
        error: &str,
        attempts: u32,
        build_id: &str,
    ) -> Result<()> {
        let failure = DeadLetterInfo {
            error,
            attempts,
            build_id,
        };
        dead_letter_xadd(&self.group, &self.name, entry, &failure, &[])
            .query_async::<String>(&mut self.conn)
            .await
            .map_err(command("XADD dead letter"))?;
        self.ack(&[(entry.stream.clone(), entry.id.clone())]).await
    }

    async fn reclaim(&mut self, min_idle: Duration) -> Result<usize> {
        let mut claimed = 0;
        let streams = self.streams.clone();
        for stream in &streams {
            let mut cursor = "0-0".to_owned();
            loop {
                // JUSTID: take the entries over without counting a delivery; the next read counts it.
                let reply: Vec<Value> = redis::cmd("XAUTOCLAIM")
                    .arg(stream)
                    .arg(&self.group)
                    .arg(&self.name)
                    .arg(min_idle.as_millis() as u64)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(100)
                    .arg("JUSTID")
                    .query_async(&mut self.conn)
                    .await
                    .map_err(command("XAUTOCLAIM"))?;
                cursor = text(reply.first()).unwrap_or_else(|| "0-0".into());
                if let Some(Value::Array(ids)) = reply.get(1) {
                    claimed += ids.len();
                }
                if cursor == "0-0" {
                    break;
                }
            }
            // Consumers of processes that are gone, once their entries were taken over above.
            DROP_GONE_CONSUMERS
                .key(stream)
                .arg(&self.group)
                .arg(min_idle.as_millis() as u64)
                .arg(&self.name)
                .invoke_async::<i64>(&mut self.conn)
                .await
                .map_err(command("EVALSHA drop_gone_consumers"))?;
        }
        if claimed > 0 {
            self.maybe_pending = true;
        }
        Ok(claimed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read's pipeline is read with the crate's error check off: an error any reply holds, an
    /// acknowledgement's before the read's, is the read's error, never an empty read.
    #[test]
    fn an_error_in_any_reply_of_a_reads_pipeline_fails_the_read() {
        let error = |text: &[u8]| redis::parse_redis_value(text).unwrap();
        let nogroup = || error(b"-NOGROUP No such key 's' or consumer group 'g'\r\n");
        let list = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"1-0".to_vec()),
            Value::Array(vec![
                Value::BulkString(b"data".to_vec()),
                Value::BulkString(b"{}".to_vec()),
            ]),
        ])]);
        let read = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"s".to_vec()),
            list,
        ])]);
        let acked = Value::Int(1);
        let ok = read_reply(vec![acked.clone(), read.clone()]).unwrap();
        assert_eq!((ok.len(), ok[0].id.as_str()), (1, "1-0"));
        assert!(read_reply(vec![Value::Nil]).unwrap().is_empty());
        for (replies, code) in [
            (vec![acked.clone(), nogroup()], "NOGROUP"),
            (vec![nogroup(), read.clone()], "NOGROUP"),
            (
                vec![
                    acked,
                    error(b"-WRONGTYPE Operation against a key\r\n"),
                    read,
                ],
                "WRONGTYPE",
            ),
        ] {
            let failed = read_reply(replies).unwrap_err();
            assert_eq!(failed.code(), Some(code), "{failed}");
        }
        assert!(read_reply(Vec::new()).is_err());
        assert!(read_reply(vec![Value::Int(3)]).is_err());
    }

    #[test]
    fn stream_read_replies_are_read_in_both_protocols_with_deleted_entries_and_other_fields() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = |id: &str, fields: Value| Value::Array(vec![bulk(id), fields]);
        let list = Value::Array(vec![
            entry("1-0", Value::Array(vec![bulk("data"), bulk("{}")])),
            entry("2-0", Value::Nil),
            entry("3-0", Value::Array(vec![bulk("other"), bulk("x")])),
        ]);
        let read = |reply| {
            entries(reply)
                .unwrap()
                .into_iter()
                .map(|e| (e.stream, e.id, e.data))
                .collect::<Vec<_>>()
        };
        let expected = vec![
            ("s".to_owned(), "1-0".to_owned(), Some("{}".to_owned())),
            ("s".to_owned(), "2-0".to_owned(), None),
            ("s".to_owned(), "3-0".to_owned(), None),
        ];
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("s"), list.clone()])]);
        assert_eq!(read(resp2), expected);
        assert_eq!(read(Value::Map(vec![(bulk("s"), list)])), expected);
        assert!(read(Value::Nil).is_empty());
        assert!(entries(Value::Int(3)).is_none());
        assert!(entries(Value::Array(vec![Value::Array(vec![bulk("s")])])).is_none());
    }

    #[test]
    fn the_counted_figures_win_over_redis_lag_below_the_cap() {
        let of = |n: &[i64]| GroupFigures::of(n);
        assert_eq!(of(&[0, 0, 0, 0, -1]), None, "no group");
        let drifted = of(&[1, 0, 2, 3, 50]).unwrap();
        assert_eq!(
            (drifted.unread, drifted.pending, drifted.consumers),
            (0, 2, 3),
            "Redis says 50 unread; none is"
        );
        let capped = UNREAD_CAP as i64;
        assert_eq!(of(&[1, capped, 0, 1, 25_000]).unwrap().unread, 25_000);
        assert_eq!(of(&[1, capped, 0, 1, -1]).unwrap().unread, UNREAD_CAP);
    }
}
