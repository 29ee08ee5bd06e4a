//! The fixture domain's `sequencing` instance: numbered messages published straight to Redis, as another
//! Protean publisher would, and the per-key records its ordered `recorder` keeps.

use std::collections::BTreeMap;

use protean_host::{
    message::{wire_json, Kind},
    store::Store,
    unit_of_work::NewMessage,
};
use serde_json::json;

use super::RedisServer;

/// The category the recorder reads.
pub const SEQUENCE: &str = "sequencing::sequence";

/// Message `seq` of `key` (on stream `sequencing::sequence-{key}`), with the `extra` data fields.
pub fn new_numbered(key: &str, seq: u64, extra: serde_json::Value) -> NewMessage {
    let mut data = json!({ "key": key, "seq": seq });
    if let (Some(data), Some(extra)) = (data.as_object_mut(), extra.as_object()) {
        data.extend(extra.clone());
    }
    let stream = format!("{SEQUENCE}-{key}");
    NewMessage::new(
        Kind::Event,
        &stream,
        "Sequencing.Numbered.v1",
        &data,
        None,
        None,
        None,
    )
}

/// One `Numbered` message of `key` in Protean's wire form; `global` is its place in the whole run.
pub fn numbered(key: &str, seq: u64, global: u64, extra: serde_json::Value) -> String {
    let message = new_numbered(key, seq, extra);
    wire_json(&message.data, &message.metadata, seq - 1, global).expect("a well-formed message")
}

/// `keys` keys (`k0`, `k1`, ...) with sequence numbers `seqs`, interleaved as many writers would:
/// every key's n-th message before any key's (n+1)-th.
pub fn wave(keys: usize, seqs: std::ops::RangeInclusive<u64>) -> Vec<(String, u64)> {
    seqs.flat_map(|seq| (0..keys).map(move |k| (format!("k{k}"), seq)))
        .collect()
}

/// Publish `messages` to the recorder's stream, in order.
pub fn publish(redis: &RedisServer, messages: &[String]) {
    let commands: Vec<Vec<String>> = messages
        .iter()
        .map(|m| {
            vec![
                "XADD".into(),
                SEQUENCE.into(),
                "*".into(),
                "data".into(),
                m.clone(),
            ]
        })
        .collect();
    redis.pipe(&commands);
}

/// Publish a wave of messages with the `extra` fields; `global` counts messages over the run.
pub fn publish_wave(
    redis: &RedisServer,
    wave: &[(String, u64)],
    extra: &serde_json::Value,
    global: &mut u64,
) {
    let messages: Vec<String> = wave
        .iter()
        .map(|(key, seq)| {
            *global += 1;
            numbered(key, *seq, *global, extra.clone())
        })
        .collect();
    publish(redis, &messages);
}

/// The sequence numbers recorded for `key`, in the order they were handled (committed).
pub fn record(store: &dyn Store, key: &str) -> Vec<u64> {
    store
        .document("records", key)
        .unwrap()
        .map(|text| {
            let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
            serde_json::from_value(doc["seqs"].clone()).unwrap()
        })
        .unwrap_or_default()
}

/// The records of keys `k0` .. `k{keys - 1}`.
pub fn records(store: &dyn Store, keys: usize) -> BTreeMap<String, Vec<u64>> {
    (0..keys)
        .map(|k| {
            let key = format!("k{k}");
            let seqs = record(store, &key);
            (key, seqs)
        })
        .collect()
}

/// Messages recorded over every key.
pub fn recorded(store: &dyn Store, keys: usize) -> usize {
    records(store, keys).values().map(Vec::len).sum()
}

/// Every key recorded exactly 1..=n, in order, once each.
#[track_caller]
pub fn every_key_in_order(store: &dyn Store, keys: usize, n: u64) {
    let expected: Vec<u64> = (1..=n).collect();
    for (key, seqs) in records(store, keys) {
        assert_eq!(
            seqs, expected,
            "key {key} was not handled exactly once each, in order"
        );
    }
}
