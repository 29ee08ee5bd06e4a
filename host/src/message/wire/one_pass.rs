//! The usual broker entry, read in one pass: its metadata's members as raw text (to store them) and,
//! in the same pass, the members the engine reads decoded (the headers, what a stored message needs;
//! the envelope and the domain), so that nothing parses the metadata again ([`Decoded`]). The parser
//! gives the text of a member it decodes nowhere; it lies between that member's key and the next
//! one's, whose places the keys borrowed from the entry's text give.
//!
//! Anything unusual (a key written with escapes, a repeated member, a member of a type the engine
//! would refuse, no message at all) makes [`read`] give up, and [`super::general`] reads the entry
//! instead: it says what is wrong. Where both read a message, it is the same message (tested below).

use std::borrow::Cow;

use serde::{de, Deserialize, Deserializer};
use serde_json::{value::RawValue, Value};

use super::{member, Key, Positions};
use crate::{
    message::{owned, Decoded, DomainView, EnvelopeView, HeadersView, Parts},
    store::StoredMessage,
};

/// The entry `text` as a message with its metadata decoded, or `None` when it takes the general
/// reading.
pub(super) fn read(text: &str) -> Option<StoredMessage> {
    let entry: Entry<'_> = serde_json::from_str(text).ok()?;
    let (data, mut metadata) = (entry.data?, entry.metadata?);
    let close = closing_brace(text, entry.after_metadata?)?;
    let members = metadata.texts(text, close)?;
    let headers = metadata.headers.take()?;
    let mut stored = String::with_capacity(text.len() - data.get().len());
    stored.push('{');
    let mut positions = None;
    for (key, value) in members {
        if key == "event_store" {
            // The first, as the general reading takes it; none is stored.
            positions = positions.or(Some(value));
            continue;
        }
        member(&mut stored, key, value);
    }
    stored.push('}');
    let positions = positions.and_then(|p| serde_json::from_str::<Positions>(p).ok());
    let parts = Parts {
        headers: HeadersView {
            deadline: owned(headers.deadline),
            traceparent: headers.traceparent,
        },
        envelope: metadata.envelope.flatten().map(|e| EnvelopeView {
            checksum: owned(e.checksum),
        }),
        domain: metadata.domain.flatten().map(|d| DomainView {
            correlation_id: owned(d.correlation_id),
            origin_stream: owned(d.origin_stream),
        }),
    };
    Some(StoredMessage {
        global_position: positions
            .as_ref()
            .and_then(|p| p.global_position)
            .unwrap_or(0),
        position: positions.as_ref().and_then(|p| p.position).unwrap_or(0),
        stream: headers.stream?.into_owned(),
        message_type: headers.message_type?.into_owned(),
        id: headers.id?.into_owned(),
        time: headers.time.map(Cow::into_owned).unwrap_or_default(),
        data: data.get().to_owned(),
        metadata: stored,
        decoded: Decoded(Some(Box::new(parts))),
    })
}

/// The outer object: `data` as raw text, `metadata` read by [`Metadata`], and the key that follows
/// `metadata` (`Some(None)`: none does), which bounds the metadata's text.
#[derive(Default)]
struct Entry<'a> {
    data: Option<&'a RawValue>,
    metadata: Option<Metadata<'a>>,
    after_metadata: Option<Option<&'a str>>,
}

impl<'de> Deserialize<'de> for Entry<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> de::Visitor<'de> for Fields {
            type Value = Entry<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entry = Entry::default();
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    let key = borrowed(key)?;
                    if entry.metadata.is_some() && entry.after_metadata.is_none() {
                        entry.after_metadata = Some(Some(key));
                    }
                    match key {
                        "data" => once(&mut entry.data, map.next_value()?)?,
                        "metadata" => once(&mut entry.metadata, map.next_value()?)?,
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                if entry.metadata.is_some() && entry.after_metadata.is_none() {
                    entry.after_metadata = Some(None);
                }
                Ok(entry)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// The metadata object: each member's key as it is in the entry's text, with its value's text when
/// it was read raw, and the members the engine reads decoded instead (`Some(None)`: a `null`).
#[derive(Default)]
struct Metadata<'a> {
    members: Vec<(&'a str, Option<&'a RawValue>)>,
    headers: Option<Headers<'a>>,
    envelope: Option<Option<EnvelopeView<'a>>>,
    domain: Option<Option<DomainView<'a>>>,
}

impl<'de> Deserialize<'de> for Metadata<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> de::Visitor<'de> for Members {
            type Value = Metadata<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // Protean's metadata has five members, a few more with extensions of its own.
                let mut metadata = Metadata {
                    members: Vec::with_capacity(8),
                    ..Metadata::default()
                };
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    let key = borrowed(key)?;
                    let raw = match key {
                        "headers" => once(&mut metadata.headers, map.next_value()?).map(|()| None),
                        "envelope" => {
                            once(&mut metadata.envelope, map.next_value()?).map(|()| None)
                        }
                        "domain" => once(&mut metadata.domain, map.next_value()?).map(|()| None),
                        _ => map.next_value().map(Some),
                    }?;
                    metadata.members.push((key, raw));
                }
                Ok(metadata)
            }
        }
        deserializer.deserialize_map(Members)
    }
}

impl<'a> Metadata<'a> {
    /// Each member's key and value text, in their order; `close` is where the object's closing
    /// brace is in `text`.
    fn texts(&self, text: &'a str, close: usize) -> Option<Vec<(&'a str, &'a str)>> {
        let mut texts = Vec::with_capacity(self.members.len());
        for (i, (key, raw)) in self.members.iter().enumerate() {
            let value = match raw {
                Some(raw) => raw.get(),
                None => {
                    // Past the key's closing quote, up to the next key's opening quote.
                    let start = offset(text, key)? + key.len() + 1;
                    let next = self.members.get(i + 1);
                    let end = match next {
                        Some((next, _)) => offset(text, next)? - 1,
                        None => close,
                    };
                    value_between(text.get(start..end)?, next.is_some())?
                }
            };
            texts.push((*key, value));
        }
        Some(texts)
    }
}

/// `metadata.headers`: what a stored message needs, and what the engine reads ([`HeadersView`]).
/// Every field the general reading and the engine read is here with the same type, so what reads here
/// reads there.
#[derive(Deserialize)]
struct Headers<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    message_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    stream: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    deadline: Option<Cow<'a, str>>,
    #[serde(default)]
    traceparent: Option<Value>,
}

/// JSON's whitespace, the only characters allowed between its tokens.
const WHITESPACE: [char; 4] = [' ', '\t', '\n', '\r'];

/// The value in `span`, the text between a key's closing quote and what follows its value: `: value`,
/// then `,` when another member follows.
fn value_between(span: &str, followed: bool) -> Option<&str> {
    let value = span
        .trim_start_matches(WHITESPACE)
        .strip_prefix(':')?
        .trim_matches(WHITESPACE);
    match followed {
        true => Some(value.strip_suffix(',')?.trim_end_matches(WHITESPACE)),
        false => Some(value),
    }
}

/// Where the metadata object's closing brace is: before the comma ahead of the key that follows it,
/// or else before the outer object's closing brace.
fn closing_brace(text: &str, after: Option<&str>) -> Option<usize> {
    let before = match after {
        Some(key) => text
            .get(..offset(text, key)? - 1)?
            .trim_end_matches(WHITESPACE)
            .strip_suffix(',')?,
        None => text.trim_end_matches(WHITESPACE).strip_suffix('}')?,
    };
    let before = before.trim_end_matches(WHITESPACE);
    before.ends_with('}').then(|| before.len() - 1)
}

/// Where the borrowed key `key` starts in `text`, checked to be a key there (quoted).
fn offset(text: &str, key: &str) -> Option<usize> {
    let at = (key.as_ptr() as usize).checked_sub(text.as_ptr() as usize)?;
    let bytes = text.as_bytes();
    let quoted =
        at >= 1 && bytes.get(at - 1) == Some(&b'"') && bytes.get(at + key.len()) == Some(&b'"');
    quoted.then_some(at)
}

/// The key as it is in the text; a key with escapes has no place there, and takes the general reading.
fn borrowed<E: de::Error>(key: Cow<'_, str>) -> Result<&str, E> {
    match key {
        Cow::Borrowed(key) => Ok(key),
        Cow::Owned(_) => Err(E::custom("a key with escapes")),
    }
}

/// Keep `value` in the empty `slot`; a member seen twice takes the general reading.
fn once<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    match slot {
        Some(_) => Err(E::custom("a repeated member")),
        None => {
            *slot = Some(value);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{wire::general, MetaView};

    /// The wire form our outbox writes, compact.
    const COMPACT: &str = r#"{"data":{"n":0,"label":"tick"},"metadata":{"headers":{"id":"01a2","time":"2026-12-04T20:57:51.122898+00:00","type":"Probe.Ticked.v1","stream":"probe::probe-0","traceparent":null,"idempotency_key":null,"deadline":null},"envelope":{"specversion":"1.0","checksum":"e78d"},"domain":{"fqn":"Probe.Ticked","kind":"EVENT","origin_stream":null,"stream_category":"probe::probe","version":1,"correlation_id":"be95","causation_id":null},"event_store":{"global_position":7,"position":3},"extensions":{}}}"#;

    /// Python's `json.dumps` with its default separators, as Protean publishes.
    fn spaced(text: &str) -> String {
        let value: Value = serde_json::from_str(text).unwrap();
        let mut out = Vec::new();
        let formatter = serde_json::ser::PrettyFormatter::with_indent(b"");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
        serde::Serialize::serialize(&value, &mut ser).unwrap();
        String::from_utf8(out).unwrap().replace('\n', " ")
    }

    /// Every way the one pass and the general reading could part: both read `text` the same, or the
    /// one pass gives up; and its decoded view is what parsing the stored metadata gives.
    fn agree(text: &str) -> Option<StoredMessage> {
        let fast = read(text);
        let general = general(text);
        if let Some(fast) = &fast {
            let general = general.as_ref().expect("the general reading reads it too");
            let same = (
                fast.global_position == general.global_position,
                fast.position == general.position,
                (&fast.stream, &fast.message_type, &fast.id, &fast.time)
                    == (
                        &general.stream,
                        &general.message_type,
                        &general.id,
                        &general.time,
                    ),
                fast.data == general.data,
                fast.metadata == general.metadata,
            );
            assert_eq!(same, (true, true, true, true, true), "{text}");
            // What the one pass takes, the engine reads as its own parse of the metadata does.
            let parsed = MetaView::parse(&general.metadata).ok();
            assert_eq!(fast.decoded.view(), parsed, "{text}");
        }
        fast
    }

    #[test]
    fn the_usual_forms_take_one_pass_and_read_as_the_general_reading_does() {
        let pretty =
            serde_json::to_string_pretty(&serde_json::from_str::<Value>(COMPACT).unwrap()).unwrap();
        for text in [COMPACT.to_owned(), spaced(COMPACT), pretty] {
            let message = agree(&text).unwrap_or_else(|| panic!("one pass: {text}"));
            assert_eq!((message.global_position, message.position), (7, 3));
            let view = message.decoded.view().unwrap();
            assert_eq!(view.correlation_id(), Some("be95"));
            assert!(!message.metadata.contains("event_store"));
        }
    }

    /// What Python Protean 0.18 published on Redis, what this host published, and Protean's stored
    /// messages in its own wire form (captured by the scripts beside them).
    #[test]
    fn entries_captured_from_protean_and_from_us_take_one_pass() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let mut read = 0;
        for dir in [
            "protean-redis/python-to-rust",
            "protean-redis/published-by-protean-host",
            "protean/messages",
        ] {
            for file in std::fs::read_dir(fixtures.join(dir)).unwrap() {
                let path = file.unwrap().path();
                if path.file_name().is_some_and(|n| n == "entries.json") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(agree(&text).is_some(), "one pass: {}", path.display());
                read += 1;
            }
        }
        assert!(read >= 15, "only {read} fixtures");
    }

    #[test]
    fn wherever_the_members_are_both_readings_agree() {
        let value: Value = serde_json::from_str(COMPACT).unwrap();
        let metadata = value["metadata"].as_object().unwrap();
        let keys: Vec<&String> = metadata.keys().collect();
        // Every rotation of the metadata's members: each member first, last and in between.
        for turn in 0..keys.len() {
            let order = keys.iter().cycle().skip(turn).take(keys.len());
            let members: Vec<String> = order
                .map(|k| format!("{}:{}", Value::from(k.as_str()), metadata[*k]))
                .collect();
            let meta = format!("{{{}}}", members.join(","));
            let data = &value["data"];
            for text in [
                format!(r#"{{"data":{data},"metadata":{meta}}}"#),
                format!(r#"{{"metadata":{meta},"data":{data}}}"#),
                format!(r#"{{"metadata":{meta},"other":[1,{{"metadata":2}}],"data":{data}}}"#),
                format!(" \n{{ \"metadata\" :\t{meta} , \"data\" : {data} }}\r\n"),
            ] {
                for text in [text.clone(), spaced(&text)] {
                    assert!(agree(&text).is_some(), "one pass: {text}");
                }
            }
        }
    }

    #[test]
    fn what_one_pass_does_not_take_reads_as_before() {
        let cases = [
            // Escaped keys: no place in the text.
            COMPACT.replace(r#""metadata""#, r#""metad\u0061ta""#),
            COMPACT.replace(r#""extensions""#, r#""ext\u0065nsions""#),
            COMPACT.replace(r#""headers""#, r#""h\u0065aders""#),
            COMPACT.replace(r#""data":{"n""#, r#""d\u0061ta":{"n""#),
            // Repeated members.
            COMPACT.replace(r#""extensions":{}"#, r#""headers":{"id":"x"},"extensions":{}"#),
            COMPACT.replace(r#""extensions":{}"#, r#""envelope":null,"extensions":{}"#),
            COMPACT.replace(r#""extensions":{}"#, r#""domain":{},"extensions":{}"#),
            COMPACT.replace(r#"{"data":"#, r#"{"data":1,"data":"#),
            COMPACT.replace(r#"}}}"#, r#"}},"metadata":{}}"#),
            // Headers of types the engine refuses, or the store needs.
            COMPACT.replace(r#""deadline":null"#, r#""deadline":5"#),
            COMPACT.replace(r#""type":"Probe.Ticked.v1","#, ""),
            COMPACT.replace(r#""id":"01a2","#, r#""id":7,"#),
            COMPACT.replace(
                r#""headers":{"id":"01a2","time":"2026-12-04T20:57:51.122898+00:00","type":"Probe.Ticked.v1","stream":"probe::probe-0","traceparent":null,"idempotency_key":null,"deadline":null},"#,
                r#""headers":null,"#,
            ),
            // No message.
            r#"{"data":{},"metadata":[1]}"#.to_owned(),
            r#"{"metadata":{}}"#.to_owned(),
            "[1]".to_owned(),
            "{not json".to_owned(),
        ];
        for text in cases {
            assert!(agree(&text).is_none(), "one pass took {text}");
        }
    }

    /// An envelope or a domain the engine refuses takes the general reading, which decodes nothing
    /// ahead: the engine's own parse of the metadata then says why it refuses it.
    #[test]
    fn an_envelope_or_domain_the_engine_refuses_is_left_to_its_parse() {
        let cases = [
            COMPACT.replace(r#""checksum":"e78d""#, r#""checksum":[1]"#),
            COMPACT.replace(
                r#""envelope":{"specversion":"1.0","checksum":"e78d"}"#,
                r#""envelope":"v1""#,
            ),
            COMPACT.replace(r#""correlation_id":"be95""#, r#""correlation_id":{}"#),
            COMPACT.replace(r#""origin_stream":null"#, r#""origin_stream":false"#),
        ];
        for text in cases {
            assert!(agree(&text).is_none(), "one pass took {text}");
            let message = general(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(message.decoded.view().is_none(), "{text}");
            assert!(MetaView::parse(&message.metadata).is_err(), "{text}");
        }
    }

    #[test]
    fn what_one_pass_takes_besides_agrees_too() {
        let cases = [
            // A repeated member the engine does not read: both keep both.
            COMPACT.replace(r#""extensions":{}"#, r#""extensions":{},"extensions":[]"#),
            // Two positions: the first counts, neither is stored.
            COMPACT.replace(r#""extensions":{}"#, r#""event_store":{"position":9},"extensions":{}"#),
            // No positions; positions that are not numbers.
            COMPACT.replace(r#""event_store":{"global_position":7,"position":3},"#, ""),
            COMPACT.replace(r#""position":3"#, r#""position":"3""#),
            // What the engine reads, there.
            COMPACT
                .replace(r#""deadline":null"#, r#""deadline":"2026-12-05T00:00:00+00:00""#)
                .replace(r#""origin_stream":null"#, r#""origin_stream":"probe::probe-9""#),
            // Escapes in values; empty objects; nulls where the engine reads nothing.
            COMPACT.replace(r#""be95""#, r#""b\u00e9\"95""#),
            COMPACT.replace(r#""fqn":"Probe.Ticked""#, r#""fqn":"\"{,}\"""#),
            COMPACT.replace(r#""envelope":{"specversion":"1.0","checksum":"e78d"}"#, r#""envelope":null"#),
            COMPACT.replace(r#""envelope":{"specversion":"1.0","checksum":"e78d"},"#, ""),
            COMPACT.replace(r#""traceparent":null"#, r#""traceparent":{"a":[1,{"b":"}"}]}"#),
            r#"{"data":{},"metadata":{"headers":{"id":"i","type":"T","stream":"s"}}}"#.to_owned(),
            r#"{"data":[],"metadata":{"headers":{"id":"i","type":"T","stream":"s"},"domain":null}}"#
                .to_owned(),
        ];
        for text in cases {
            assert!(agree(&text).is_some(), "one pass: {text}");
        }
    }
}
