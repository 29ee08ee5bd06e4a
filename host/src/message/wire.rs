//! A stored message in its wire form, `{"data": {...}, "metadata": {..., "event_store": {...}}}`, and
//! back. This runs once per message on the broker path, so the members are spliced as raw JSON text:
//! nothing is decoded into a tree that is only encoded again.

use std::borrow::Cow;

use serde::{de, Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::PoisonError;
use crate::store::StoredMessage;

mod one_pass;
mod splice;

/// A JSON object as its members' raw text, in their order. Keys are borrowed unless they hold escapes.
struct RawObject<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// A key as it is in the text, when it can be.
#[derive(Deserialize)]
pub(super) struct Key<'a>(#[serde(borrow)] pub(super) Cow<'a, str>);

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> de::Visitor<'de> for Members {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                RawObject::from_map(map)
            }
        }
        deserializer.deserialize_map(Members)
    }
}

impl<'de> RawObject<'de> {
    fn from_map<A: de::MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some((Key(key), value)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
            members.push((key, value));
        }
        Ok(RawObject(members))
    }
}

/// The outer object of a message on the wire, read in one pass: `data` as raw text, `metadata` split
/// into its members (`None` inside when it is there but not an object).
#[derive(Default)]
struct WireEnvelope<'a> {
    data: Option<&'a RawValue>,
    metadata: Option<Option<RawObject<'a>>>,
}

impl<'de> Deserialize<'de> for WireEnvelope<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> de::Visitor<'de> for Fields {
            type Value = WireEnvelope<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut envelope = WireEnvelope::default();
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    match key.as_ref() {
                        "data" => envelope.data = Some(map.next_value()?),
                        "metadata" => {
                            envelope.metadata = Some(map.next_value::<ObjectOrNot<'de>>()?.0)
                        }
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(envelope)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// An object's members, or `None` for any other JSON value.
struct ObjectOrNot<'a>(Option<RawObject<'a>>);

impl<'de> Deserialize<'de> for ObjectOrNot<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Any;
        impl<'de> de::Visitor<'de> for Any {
            type Value = ObjectOrNot<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                RawObject::from_map(map).map(|o| ObjectOrNot(Some(o)))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(ObjectOrNot(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(ObjectOrNot(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(ObjectOrNot(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(ObjectOrNot(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(ObjectOrNot(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(ObjectOrNot(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(ObjectOrNot(None))
            }
        }
        deserializer.deserialize_any(Any)
    }
}

impl RawObject<'_> {
    fn get(&self, key: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// `"key":value`, with a comma before every member but the first.
pub(super) fn member(out: &mut String, key: &str, value: &str) {
    if !out.ends_with('{') {
        out.push(',');
    }
    if key.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(key);
        out.push('"');
    } else {
        // A key that needs escapes is rare; serialising a `&str` cannot fail.
        out.push_str(&serde_json::to_string(key).unwrap_or_default());
    }
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
    let members = metadata.0.iter().map(|(k, v)| (k.as_ref(), v.get()));
    Ok(assemble(data.get(), members, position, global_position))
}

/// [`wire_json`] of text known to be valid JSON (written by this host and unchanged since, or read from
/// a `jsonb` column): the same wire form, made without parsing every value when it can be (see
/// `splice`). Text that may not be JSON takes [`wire_json`], which says what is wrong with it.
pub(crate) fn wire_json_of_valid(
    data: &str,
    metadata: &str,
    position: u64,
    global_position: u64,
) -> Result<String, PoisonError> {
    match splice::splice(data, metadata, position, global_position) {
        Some(wire) => Ok(wire),
        None => wire_json(data, metadata, position, global_position),
    }
}

/// The wire form from the text of `data` and the metadata's members (keys unescaped, values as text):
/// the members in order, but for `event_store`, whose place the positions take.
fn assemble<'a>(
    data: &str,
    members: impl IntoIterator<Item = (&'a str, &'a str)>,
    position: u64,
    global_position: u64,
) -> String {
    let mut out = String::with_capacity(data.len() + 1024);
    out.push_str(r#"{"data":"#);
    out.push_str(data);
    out.push_str(r#","metadata":{"#);
    let mut placed = false;
    for (key, value) in members {
        if key == "event_store" {
            continue;
        }
        if key == "extensions" && !placed {
            push_positions(&mut out, position, global_position);
            placed = true;
        }
        member(&mut out, key, value);
    }
    if !placed {
        push_positions(&mut out, position, global_position);
    }
    out.push_str("}}");
    out
}

/// The member `"event_store":{"global_position":…,"position":…}`, after a comma unless it is the first.
fn push_positions(out: &mut String, position: u64, global_position: u64) {
    if !out.ends_with('{') {
        out.push(',');
    }
    out.push_str(r#""event_store":{"global_position":"#);
    out.push_str(itoa::Buffer::new().format(global_position));
    out.push_str(r#","position":"#);
    out.push_str(itoa::Buffer::new().format(position));
    out.push('}');
}

/// The headers a received message must have (`time` may be missing).
#[derive(Deserialize)]
struct Headers<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "type")]
    message_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    stream: Option<Cow<'a, str>>,
    #[serde(borrow)]
    time: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
pub(super) struct Positions {
    pub(super) global_position: Option<u64>,
    pub(super) position: Option<u64>,
}

/// Why a broker entry is not a Protean message, in one line. Such an entry is poison: it reads the
/// same however often it is read again.
#[derive(Debug, thiserror::Error)]
pub enum NotAMessage {
    #[error("entry has no text field `data`")]
    NoText,
    #[error("entry data is not a JSON object: {0}")]
    NotAnObject(serde_json::Error),
    #[error("entry is not a Protean message: no `data`")]
    NoData,
    #[error("entry is not a Protean message: no `metadata` object")]
    NoMetadata,
    #[error("entry is not a Protean message: bad `metadata.headers`: {0}")]
    BadHeaders(serde_json::Error),
    #[error("entry is not a Protean message: no `metadata.headers.{0}`")]
    NoHeader(&'static str),
}

/// A message received in its wire form, as the store would hold it (metadata without `event_store`),
/// with what the engine reads from its metadata decoded on the way ([`StoredMessage::decoded`]).
pub fn from_wire(text: &str) -> Result<StoredMessage, NotAMessage> {
    match one_pass::read(text) {
        Some(message) => Ok(message),
        None => general(text),
    }
}

/// [`from_wire`] for any entry: it says what makes an entry no message, and gives a message whose
/// metadata the engine parses itself: with that parse, the metadata is read twice and its headers three
/// times.
fn general(text: &str) -> Result<StoredMessage, NotAMessage> {
    let envelope: WireEnvelope<'_> =
        serde_json::from_str(text).map_err(NotAMessage::NotAnObject)?;
    let data = envelope.data.ok_or(NotAMessage::NoData)?;
    let metadata = envelope.metadata.flatten().ok_or(NotAMessage::NoMetadata)?;
    let positions = metadata
        .get("event_store")
        .and_then(|p| serde_json::from_str::<Positions>(p.get()).ok());
    let headers: Option<Headers<'_>> = match metadata.get("headers") {
        Some(h) => Some(serde_json::from_str(h.get()).map_err(NotAMessage::BadHeaders)?),
        None => None,
    };
    let header = |key: &'static str, value: Option<&Cow<'_, str>>| {
        value
            .map(|v| v.clone().into_owned())
            .ok_or(NotAMessage::NoHeader(key))
    };
    let Some(headers) = headers else {
        return Err(NotAMessage::NoHeader("stream"));
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
        stream: header("stream", headers.stream.as_ref())?,
        message_type: header("type", headers.message_type.as_ref())?,
        id: header("id", headers.id.as_ref())?,
        time: headers.time.map(Cow::into_owned).unwrap_or_default(),
        data: data.get().to_owned(),
        metadata: stored_metadata,
        decoded: Default::default(),
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
                r#"{"data":{},"metadata":[{"a":1}]}"#,
                "no `metadata` object",
            ),
            (r#"{"data":{},"other":{"x":[1]}}"#, "no `metadata` object"),
            (
                r#"{"data":{},"metadata":{"headers":{"id":"x"}}}"#,
                "no `metadata.headers.stream`",
            ),
            (
                r#"{"data":{},"metadata":{}}"#,
                "no `metadata.headers.stream`",
            ),
            (
                r#"{"data":{},"metadata":{"headers":{"id":5}}}"#,
                "bad `metadata.headers`",
            ),
        ];
        for (text, expected) in cases {
            let error = from_wire(text).unwrap_err().to_string();
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
