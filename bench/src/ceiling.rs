//! What Redis allows a Rust client on this machine: a minimal program that only does XADD (pipelined
//! 100 at a time), then XREADGROUP and XACK 100 at a time, the batch size the host uses. The host's
//! Redis figures are also given as a ratio to these.

use std::time::Instant;

use redis::streams::StreamReadReply;

use crate::Redis;

/// Entries per second: added, and read-and-acknowledged.
pub(crate) struct ClientCeiling {
    pub(crate) xadd: f64,
    pub(crate) consume: f64,
    /// The consume rates of the runs `consume` was taken from ([`ClientCeiling::around`]); both
    /// `consume` for a single run.
    pub(crate) before: f64,
    pub(crate) after: f64,
}

impl ClientCeiling {
    /// Two runs, one right before a measured run and one right after: their geometric means.
    pub(crate) fn around(before: Self, after: Self) -> Self {
        Self {
            xadd: (before.xadd * after.xadd).sqrt(),
            consume: (before.consume * after.consume).sqrt(),
            before: before.consume,
            after: after.consume,
        }
    }
}

/// One run of the minimal client: add `events` entries, then read and acknowledge them all.
pub(crate) fn minimal_client(
    redis: &Redis,
    payload: &str,
    events: usize,
) -> anyhow::Result<ClientCeiling> {
    const BATCH: usize = 100;
    const STREAM: &str = "ceiling:client";
    let mut conn =
        redis::Client::open(format!("redis://127.0.0.1:{}/0", redis.port))?.get_connection()?;
    let _: () = redis::cmd("DEL").arg(STREAM).query(&mut conn)?;
    let started = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(BATCH) {
        let mut pipe = redis::pipe();
        for _ in chunk {
            pipe.cmd("XADD")
                .arg(STREAM)
                .arg("*")
                .arg("data")
                .arg(payload)
                .ignore();
        }
        pipe.query::<()>(&mut conn)?;
    }
    let xadd = events as f64 / started.elapsed().as_secs_f64();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg("ceiling")
        .arg("0")
        .query(&mut conn)?;
    let started = Instant::now();
    let mut read = 0;
    while read < events {
        let reply: StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("ceiling")
            .arg("c")
            .arg("COUNT")
            .arg(BATCH)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(">")
            .query(&mut conn)?;
        let ids: Vec<String> = reply
            .keys
            .into_iter()
            .flat_map(|k| k.ids)
            .map(|id| id.id)
            .collect();
        anyhow::ensure!(
            !ids.is_empty(),
            "the stream ran dry after {read} of {events} entries"
        );
        read += ids.len();
        let _: u64 = redis::cmd("XACK")
            .arg(STREAM)
            .arg("ceiling")
            .arg(&ids)
            .query(&mut conn)?;
    }
    let consume = events as f64 / started.elapsed().as_secs_f64();
    let _: () = redis::cmd("DEL").arg(STREAM).query(&mut conn)?;
    Ok(ClientCeiling {
        xadd,
        consume,
        before: consume,
        after: consume,
    })
}
