//! The `sequencing` instance: an ordered handler that records, per key, the sequence numbers it handled,
//! so tests and benchmarks can check that every key's messages were handled once each and in order.
//!
//! A `Numbered` event of stream `sequence-{key}` carries its key and sequence number. The `recorder`
//! appends the number to the `records` document of its key. Two switches make failures on purpose:
//! `poison` fails the message (retryably) while the file named by `SEQUENCING_POISON_FILE` exists, and
//! `stall_ms` makes the handler take that long (a replica stalled inside a handler).

use protean_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

/// A sequence of numbered events, one per key.
#[derive(Debug, Default, Aggregate)]
pub struct Sequence;

/// `Sequencing.Numbered.v1`: message `seq` of `key`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(aggregate = Sequence)]
pub struct Numbered {
    /// The ordering key (also the stream id's suffix).
    pub key: String,
    /// 1, 2, 3 ... within the key.
    pub seq: u64,
    /// Fail while the poison file exists.
    #[serde(default)]
    pub poison: bool,
    /// Take this long to handle.
    #[serde(default)]
    pub stall_ms: u64,
}

/// The sequence numbers handled for one key, in the order they were handled.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, Document)]
#[document(collection = "records")]
pub struct Record {
    /// The key.
    pub id: String,
    /// Sequence numbers, in handling order.
    pub seqs: Vec<u64>,
}

fn record(event: Numbered, ctx: &mut Context) -> HandlerResult {
    if event.stall_ms > 0 {
        log::info!(
            "stalling in {} #{} for {} ms",
            event.key,
            event.seq,
            event.stall_ms
        );
        std::thread::sleep(std::time::Duration::from_millis(event.stall_ms));
    }
    if event.poison && poisoned() {
        return Err(HandlerError::retry(format!(
            "{} #{} is poisoned while the poison file exists",
            event.key, event.seq
        )));
    }
    let mut record = ctx.get::<Record>(&event.key)?.unwrap_or(Record {
        id: event.key.clone(),
        seqs: Vec::new(),
    });
    record.seqs.push(event.seq);
    ctx.put(&record)
}

fn poisoned() -> bool {
    std::env::var_os("SEQUENCING_POISON_FILE")
        .is_some_and(|path| std::path::Path::new(&path).exists())
}

/// The sequencing instance: one handler, ordered by stream; a key parks behind a dead letter.
pub fn domain() -> Domain {
    Domain::new("Sequencing").event_handler(
        EventHandler::new("recorder")
            .on(record)
            .ordered()
            .after_dead_letter(AfterDeadLetter::Park),
    )
}
