//! A stored message in its wire form, `{"data": {...}, "metadata": {..., "event_store": {...}}}`, and
//! back. This runs once per message on the broker path, so the members are spliced as raw JSON text:
//! nothing is decoded into a tree that is only encoded again.

use std::fmt::Write as _;

use serde::{de, Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::PoisonError;
use crate::store::StoredMessage;

/// A JSON object as its members' raw text, in their order.
struct RawObject<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> de::Visitor<'de> for Members {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(RawObject(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

impl RawObject<'_> {
    fn get(&self, key: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// `"key":value`, with a comma before every member but the first.
fn member(out: &mut String, key: &str, value: &str) {
    if !out.ends_with('{') {
        out.push(',');
    }
    // A key is a JSON string; serialising a `&str` cannot fail.
    out.push_str(&serde_json::to_string(key).unwrap_or_default());
    out.push(':');
    out.push_str(value);
}

/// The JSON of a stored message as Protean publishes it: `{"data", "metadata"}` with the
/// `metadata.event_store` positions filled in (before `extensions`, where Protean puts them).
pub fn wire_json(
    data: &str,
    metadata: &str,
    position: u64,
    global_position: u64,
) -> Result<String, PoisonError> {
    let data: &RawValue =
        serde_json::from_str(data).map_err(|e| PoisonError::BadData(e.to_string()))?;
    let metadata: RawObject<'_> =
        serde_json::from_str(metadata).map_err(|e| PoisonError::BadMetadata(e.to_string()))?;
    let mut positions = String::new();
    let _ = write!(
        positions,
        r#"{{"global_position":{global_position},"position":{position}}}"#
    );
    let mut out = String::with_capacity(data.get().len() + 1024);
    out.push_str(r#"{"data":"#);
    out.push_str(data.get());
    out.push_str(r#","metadata":{"#);
    let mut placed = false;
    for (key, value) in &metadata.0 {
        if key == "event_store" {
            continue;
        }
        if key == "extensions" && !placed {
            member(&mut out, "event_store", &positions);
            placed = true;
        }
        member(&mut out, key, value.get());
    }
    if !placed {
        member(&mut out, "event_store", &positions);
    }
    out.push_str("}}");
    Ok(out)
}

#[derive(Deserialize)]
struct Positions {
    global_position: Option<u64>,
    position: Option<u64>,
}

/// A message received in its wire form, as the store would hold it (metadata without `event_store`).
/// The error says, in one line, why the text is not a Protean message.
pub fn from_wire(text: &str) -> Result<StoredMessage, String> {
    let envelope: RawObject<'_> =
        serde_json::from_str(text).map_err(|e| format!("entry data is not a JSON object: {e}"))?;
    let data = envelope
        .get("data")
        .ok_or("entry is not a Protean message: no `data`")?;
    let metadata: RawObject<'_> = envelope
        .get("metadata")
        .and_then(|m| serde_json::from_str(m.get()).ok())
        .ok_or("entry is not a Protean message: no `metadata` object")?;
    let positions = metadata
        .get("event_store")
        .and_then(|p| serde_json::from_str::<Positions>(p.get()).ok());
    let headers: Option<RawObject<'_>> = metadata
        .get("headers")
        .and_then(|h| serde_json::from_str(h.get()).ok());
    let header = |key: &str| {
        headers
            .as_ref()
            .and_then(|h| h.get(key))
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
            .ok_or(format!(
                "entry is not a Protean message: no `metadata.headers.{key}`"
            ))
    };
    let mut stored_metadata = String::with_capacity(text.len() - data.get().len());
    stored_metadata.push('{');
    for (key, value) in metadata.0.iter().filter(|(k, _)| k != "event_store") {
        member(&mut stored_metadata, key, value.get());
    }
    stored_metadata.push('}');
    Ok(StoredMessage {
        global_position: positions
            .as_ref()
            .and_then(|p| p.global_position)
            .unwrap_or(0),
        position: positions.as_ref().and_then(|p| p.position).unwrap_or(0),
        stream: header("stream")?,
        message_type: header("type")?,
        id: header("id")?,
        time: header("time").unwrap_or_default(),
        data: data.get().to_owned(),
        metadata: stored_metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn metadata() -> String {
        json!({
            "headers": {"id": "m-1", "type": "Shop.Placed.v1", "stream": "shop::order-1", "time": "t"},
            "envelope": {"specversion": "1.0", "checksum": "abc"},
            "domain": {"fqn": "x"},
            "extensions": {"a\"b": 1}
        })
        .to_string()
    }

    #[test]
    fn wire_form_puts_positions_before_extensions_and_reads_back_unchanged() {
        let data = r#"{"b":[1,2.5],"a":"é"}"#;
        let wire = wire_json(data, &metadata(), 3, 42).unwrap();
        let value: Value = serde_json::from_str(&wire).unwrap();
        let keys: Vec<&String> = value["metadata"].as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["headers", "envelope", "domain", "event_store", "extensions"]
        );
        assert_eq!(
            value["metadata"]["event_store"],
            json!({"global_position": 42, "position": 3})
        );
        let back = from_wire(&wire).unwrap();
        assert_eq!((back.position, back.global_position), (3, 42));
        assert_eq!(back.data, data);
        assert_eq!(back.metadata, metadata());
        assert_eq!(
            (back.id.as_str(), back.stream.as_str()),
            ("m-1", "shop::order-1")
        );
        assert_eq!(back.message_type, "Shop.Placed.v1");
    }

    #[test]
    fn bad_wire_forms_say_what_is_missing() {
        let cases = [
            ("{not json", "entry data is not a JSON object"),
            ("[1]", "entry data is not a JSON object"),
            (r#"{"metadata":{}}"#, "no `data`"),
            (r#"{"data":{},"metadata":3}"#, "no `metadata` object"),
            (
                r#"{"data":{},"metadata":{"headers":{"id":"x"}}}"#,
                "no `metadata.headers.stream`",
            ),
        ];
        for (text, expected) in cases {
            let error = from_wire(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
        assert!(matches!(
            wire_json("{", "{}", 0, 1),
            Err(PoisonError::BadData(_))
        ));
        assert!(matches!(
            wire_json("{}", "[]", 0, 1),
            Err(PoisonError::BadMetadata(_))
        ));
    }
}
