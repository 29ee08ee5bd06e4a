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
    let mut conn = connect(redis)?;
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

/// What Redis itself spent serving a run: its command time for the reads and the acknowledgements,
/// from `INFO commandstats` (zeroed by [`ServerTime::reset`] before the run). The host and the minimal
/// client ask Redis for the same work, so this is the part of either run no client can make faster.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ServerTime {
    /// Microseconds in `XREADGROUP`, and its calls.
    pub(crate) read_us: f64,
    pub(crate) reads: f64,
    /// Microseconds in `XACK`, and its calls.
    pub(crate) ack_us: f64,
    pub(crate) acks: f64,
}

impl ServerTime {
    /// Zero the server's command statistics.
    pub(crate) fn reset(redis: &Redis) -> anyhow::Result<()> {
        let mut conn = connect(redis)?;
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query::<()>(&mut conn)?;
        Ok(())
    }

    /// The command time since the last [`ServerTime::reset`].
    pub(crate) fn since_reset(redis: &Redis) -> anyhow::Result<Self> {
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut connect(redis)?)?;
        Ok(Self::parse(&stats))
    }

    /// `cmdstat_xreadgroup:calls=1004,usec=163696,...` lines.
    fn parse(stats: &str) -> Self {
        let figures = |name: &str| {
            let line = stats
                .lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:")))
                .unwrap_or_default();
            let field = |key: &str| {
                line.split(',')
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            (field("usec"), field("calls"))
        };
        let ((read_us, reads), (ack_us, acks)) = (figures("xreadgroup"), figures("xack"));
        Self {
            read_us,
            reads,
            ack_us,
            acks,
        }
    }

    /// Total command time, in seconds.
    pub(crate) fn seconds(&self) -> f64 {
        (self.read_us + self.ack_us) / 1e6
    }

    /// `XREADGROUP 163 µs a call, XACK 47 µs`.
    pub(crate) fn per_call(&self) -> String {
        let each = |us: f64, calls: f64| us / calls.max(1.0);
        format!(
            "XREADGROUP {:.0} µs a call, XACK {:.0} µs",
            each(self.read_us, self.reads),
            each(self.ack_us, self.acks)
        )
    }
}

fn connect(redis: &Redis) -> anyhow::Result<redis::Connection> {
    Ok(redis::Client::open(format!("redis://127.0.0.1:{}/0", redis.port))?.get_connection()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_time_is_read_from_commandstats() {
        let stats = "# Commandstats\r\ncmdstat_xack:calls=1000,usec=46780,usec_per_call=46.78,rejected_calls=0,failed_calls=0\r\ncmdstat_xreadgroup:calls=1004,usec=163696,usec_per_call=163.04,rejected_calls=0,failed_calls=1\r\n";
        let time = ServerTime::parse(stats);
        assert_eq!((time.reads, time.read_us), (1004.0, 163696.0));
        assert_eq!((time.acks, time.ack_us), (1000.0, 46780.0));
        assert_eq!(time.per_call(), "XREADGROUP 163 µs a call, XACK 47 µs");
        assert_eq!(ServerTime::parse("").seconds(), 0.0);
    }
}
