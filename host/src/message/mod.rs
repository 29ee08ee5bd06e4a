//! The message envelope: Protean's JSON format, exactly, so a Python Protean service and a Rust domain
//! can share one store and one broker.
//!
//! A message is `{"data": {...}, "metadata": {"headers", "envelope", "domain", "event_store", ...}}`.
//! Invariants: `metadata.envelope.checksum` is the sha256 of the sorted, compact, ASCII-escaped JSON of
//! `data` (Python's `json.dumps(data, sort_keys=True, separators=(",", ":"))`) and is checked on read
//! when present; keys this host does not know are kept as they are (every struct here flattens the rest).

mod wire;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub(crate) use wire::wire_json_of_valid;
pub use wire::{from_wire, wire_json, NotAMessage};

/// A whole message as it travels on the wire (a Redis entry's `data` field, a fixture file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub data: Value,
    pub metadata: Value,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// Why a stored or received message cannot be handled. Such a message is poison: retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoisonError {
    #[error("data is not valid JSON: {0}")]
    BadData(String),
    #[error("metadata is not valid JSON: {0}")]
    BadMetadata(String),
    #[error("checksum mismatch: metadata says {expected}, data hashes to {actual}")]
    Checksum { expected: String, actual: String },
    #[error("deadline {0:?} is not an RFC 3339 time")]
    BadDeadline(String),
}

/// A message, or a part of one, larger than `server.max_message_bytes`. Its size counts the bytes of
/// its data and metadata as stored (a document's: its data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is {size} bytes, over server.max_message_bytes = {limit}; {fix}")]
pub struct TooBig {
    /// What is too big: "message", "event Shop.Placed.v1 raised for shop::order-1", ...
    pub what: String,
    pub size: usize,
    pub limit: usize,
    /// What to do about it, for whoever reads the line.
    pub fix: &'static str,
}

impl TooBig {
    /// An error when `size` is over `limit`; `what` is only worked out then.
    pub fn check(
        size: usize,
        limit: usize,
        what: impl FnOnce() -> String,
        fix: &'static str,
    ) -> Result<(), Self> {
        if size <= limit {
            return Ok(());
        }
        Err(Self {
            what: what(),
            size,
            limit,
            fix,
        })
    }
}

/// What the engine needs from a message's metadata, read without copying the rest.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
pub struct MetaView<'a> {
    #[serde(borrow, default)]
    pub headers: HeadersView<'a>,
    #[serde(borrow, default)]
    pub envelope: Option<EnvelopeView<'a>>,
    #[serde(borrow, default)]
    pub domain: Option<DomainView<'a>>,
}

/// `metadata.headers`, the parts the engine reads.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
pub struct HeadersView<'a> {
    #[serde(borrow, default)]
    pub deadline: Option<Cow<'a, str>>,
    #[serde(default)]
    pub traceparent: Option<Value>,
}

/// `metadata.envelope`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
pub struct EnvelopeView<'a> {
    #[serde(borrow, default)]
    pub checksum: Option<Cow<'a, str>>,
}

/// `metadata.domain`, the parts the engine reads.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
pub struct DomainView<'a> {
    #[serde(borrow, default)]
    pub correlation_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub origin_stream: Option<Cow<'a, str>>,
}

impl<'a> MetaView<'a> {
    /// Parse a metadata object.
    pub fn parse(metadata: &'a str) -> Result<Self, PoisonError> {
        serde_json::from_str(metadata).map_err(|e| PoisonError::BadMetadata(e.to_string()))
    }

    /// The correlation id children inherit.
    pub fn correlation_id(&self) -> Option<&str> {
        self.domain.as_ref()?.correlation_id.as_deref()
    }

    /// Whether the message's deadline has passed at `now`.
    pub fn expired(&self, now: chrono::DateTime<chrono::Utc>) -> Result<bool, PoisonError> {
        let Some(deadline) = self.headers.deadline.as_deref() else {
            return Ok(false);
        };
        let at = parse_time(deadline).ok_or_else(|| PoisonError::BadDeadline(deadline.into()))?;
        Ok(at < now)
    }

    /// Check the data checksum, when the metadata carries one.
    pub fn verify(&self, data: &str) -> Result<(), PoisonError> {
        let Some(expected) = self.envelope.as_ref().and_then(|e| e.checksum.as_deref()) else {
            return Ok(());
        };
        let actual =
            digest_text(data, Numbers::Stable).map_err(|e| PoisonError::BadData(e.to_string()))?;
        // A message whose checksum was taken before PostgreSQL's jsonb rewrote its large numbers
        // (Protean's, or an older host's): Python's own form as read, or with its large integers read
        // as the floats they were written as (`1e+16`, now `10000000000000000`).
        let matches = hex_is(&actual, expected)
            || [Numbers::Python, Numbers::PythonFloats]
                .into_iter()
                .any(|numbers| digest_text(data, numbers).is_ok_and(|d| hex_is(&d, expected)));
        if matches {
            Ok(())
        } else {
            Err(PoisonError::Checksum {
                expected: expected.into(),
                actual: hex(&actual),
            })
        }
    }
}

/// What a reader decoded of a message's metadata on its way in ([`from_wire`] reads a broker entry in
/// one pass): the members the engine reads, decoded in that pass, so that nothing parses the metadata
/// again. A cache of the metadata's text: it never makes two messages differ.
#[derive(Debug, Clone, Default)]
pub struct Decoded(pub(crate) Option<Box<Parts>>);

/// See [`Decoded`]: [`MetaView`]'s members, owned.
#[derive(Debug, Clone, Default)]
pub(crate) struct Parts {
    pub(crate) headers: HeadersView<'static>,
    pub(crate) envelope: Option<EnvelopeView<'static>>,
    pub(crate) domain: Option<DomainView<'static>>,
}

impl Decoded {
    /// The view of the metadata this was decoded from; `None` when nothing was decoded ahead (the
    /// engine then parses the metadata, [`MetaView::parse`], which says what it refuses).
    pub fn view(&self) -> Option<MetaView<'_>> {
        let parts = self.0.as_deref()?;
        Some(MetaView {
            headers: HeadersView {
                deadline: borrow(&parts.headers.deadline),
                traceparent: parts.headers.traceparent.clone(),
            },
            envelope: parts.envelope.as_ref().map(|e| EnvelopeView {
                checksum: borrow(&e.checksum),
            }),
            domain: parts.domain.as_ref().map(|d| DomainView {
                correlation_id: borrow(&d.correlation_id),
                origin_stream: borrow(&d.origin_stream),
            }),
        })
    }
}

/// `text` borrowed, whether it was borrowed or owned.
fn borrow<'a>(text: &'a Option<Cow<'_, str>>) -> Option<Cow<'a, str>> {
    text.as_deref().map(Cow::Borrowed)
}

/// `text` owned, to outlive what it was borrowed from.
pub(crate) fn owned(text: Option<Cow<'_, str>>) -> Option<Cow<'static, str>> {
    text.map(|t| Cow::Owned(t.into_owned()))
}

impl PartialEq for Decoded {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Decoded {}

/// Parse a Protean time: RFC 3339, or Python's `isoformat()` with a space or without an offset (UTC).
pub fn parse_time(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&chrono::Utc));
    }
    let t = text.replacen(' ', "T", 1);
    chrono::DateTime::parse_from_rfc3339(&t)
        .map(|t| t.with_timezone(&chrono::Utc))
        .ok()
        .or_else(|| {
            chrono::NaiveDateTime::parse_from_str(&t, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|n| n.and_utc())
        })
}

/// A time in the format Protean writes (`isoformat()` of an aware UTC datetime).
pub fn format_time(t: chrono::DateTime<chrono::Utc>) -> String {
    use chrono::{Datelike, Timelike};
    // One integer format instead of chrono's format-string interpreter: this runs for every message.
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond() / 1000 % 1_000_000
    )
}

/// sha256 (hex) of the canonical JSON of `data` with its numbers as jsonb keeps them
/// ([`stable_json`]): what Protean computes from the same data read back from a PostgreSQL store, so
/// both sides verify it whatever store held the message.
pub fn checksum(data: &Value) -> String {
    let mut sink = HashSink::default();
    write_canonical(data, &mut sink, Numbers::Stable);
    hex(&sink.finish())
}

/// [`checksum`] of the JSON text `data`, without decoding it into a tree (a tree of small objects
/// takes many times the text's size): the error says why the text is not JSON.
pub fn checksum_text(data: &str) -> Result<String, serde_json::Error> {
    digest_text(data, Numbers::Stable).map(|digest| hex(&digest))
}

/// The sha256 of the canonical form of the JSON text `data`.
fn digest_text(data: &str, numbers: Numbers) -> Result<[u8; 32], serde_json::Error> {
    let mut sink = HashSink::for_text(data);
    write_canonical_text(data, &mut sink, numbers)?;
    Ok(sink.finish())
}

/// Whether `text` is the lowercase hex of `digest` (a checksum as Protean writes it).
fn hex_is(digest: &[u8], text: &str) -> bool {
    let text = text.as_bytes();
    text.len() == digest.len() * 2
        && digest
            .iter()
            .zip(text.chunks_exact(2))
            .all(|(b, pair)| pair == hex_pair(*b))
}

/// Lowercase hex, without a formatting call per byte (this runs for every message).
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.extend(hex_pair(*b).iter().map(|d| char::from(*d)));
    }
    out
}

/// The two lowercase hex digits of `b`.
fn hex_pair(b: u8) -> [u8; 2] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]]
}

/// Python's `json.dumps(value, sort_keys=True, separators=(",", ":"))`: sorted keys, no spaces, every
/// non-ASCII character escaped as `\uXXXX`.
pub fn canonical_json(value: &Value) -> String {
    canonical_with(value, Numbers::Python)
}

/// [`canonical_json`] of `value` as it reads back from a jsonb column, which keeps a number's decimal
/// value but not how it was written: a float written with an exponent and no fraction left (`1e16`,
/// `1.5e20`) comes back as an integer (`10000000000000000`), which Python then reads as an int, and a
/// negative zero comes back as `0.0`. Every other number keeps Python's form. The form is the same
/// before and after a jsonb round trip, so a checksum of it verifies on every store.
pub fn stable_json(value: &Value) -> String {
    canonical_with(value, Numbers::Stable)
}

/// How a canonical form writes numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbers {
    /// As Python's `json.dumps` does.
    Python,
    /// As Python's `json.dumps` does after a jsonb round trip.
    Stable,
    /// As Python's `json.dumps` does, taking integers of 17 digits or more for floats (what they were
    /// before jsonb rewrote a Python `1e+16`).
    PythonFloats,
}

fn canonical_with(value: &Value, numbers: Numbers) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out, numbers);
    out
}

/// Where a canonical form goes: a string, or a hash fed as it is written.
trait Sink {
    fn push_str(&mut self, s: &str);

    fn push(&mut self, c: char) {
        self.push_str(c.encode_utf8(&mut [0; 4]));
    }
}

impl Sink for String {
    fn push_str(&mut self, s: &str) {
        String::push_str(self, s);
    }

    fn push(&mut self, c: char) {
        String::push(self, c);
    }
}

/// A sha256 of what is written, fed in chunks: the canonical form of a large message is never held
/// whole.
#[derive(Default)]
struct HashSink {
    hasher: Sha256,
    pending: String,
}

impl HashSink {
    /// Hashing in chunks of this many bytes costs no more than hashing once.
    const CHUNK: usize = 64 * 1024;

    /// A sink sized for the canonical form of `text`, which is about as long as the text: one buffer
    /// instead of one per doubling.
    fn for_text(text: &str) -> Self {
        Self {
            hasher: Sha256::default(),
            pending: String::with_capacity(text.len().min(Self::CHUNK) + 16),
        }
    }

    fn finish(mut self) -> [u8; 32] {
        self.hasher.update(self.pending.as_bytes());
        self.hasher.finalize().into()
    }
}

impl Sink for HashSink {
    fn push_str(&mut self, s: &str) {
        self.pending.push_str(s);
        if self.pending.len() >= Self::CHUNK {
            self.hasher.update(self.pending.as_bytes());
            self.pending.clear();
        }
    }
}

fn write_canonical<S: Sink>(value: &Value, out: &mut S, numbers: Numbers) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(&map[key], out, numbers);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out, numbers);
            }
            out.push(']');
        }
        Value::String(s) => write_string(s, out),
        Value::Number(n) => write_number(n, out, numbers),
        other => out.push_str(&other.to_string()),
    }
}

/// A number in canonical form. Integers, nearly every number a message holds, are written without a
/// formatting call.
fn write_number<S: Sink>(n: &serde_json::Number, out: &mut S, numbers: Numbers) {
    // PythonFloats may write a large integer as the float it once was: that takes `number`.
    if !n.is_f64() && numbers != Numbers::PythonFloats {
        let mut digits = itoa::Buffer::new();
        match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => out.push_str(digits.format(u)),
            (None, Some(i)) => out.push_str(digits.format(i)),
            _ => out.push_str(&number(n, numbers)),
        }
        return;
    }
    out.push_str(&number(n, numbers));
}

fn number(n: &serde_json::Number, numbers: Numbers) -> String {
    match (numbers, n.as_f64()) {
        (Numbers::Stable, Some(f)) if n.is_f64() => stable_float(f, n),
        (Numbers::PythonFloats, Some(f)) if !n.is_f64() && was_float(f, n) => python_float(f),
        _ => python_number(n),
    }
}

/// Whether the integer `n` (`f` as a float) is what jsonb gives back for a large float: the float's
/// shortest digits, padded with zeros.
fn was_float(f: f64, n: &serde_json::Number) -> bool {
    f.abs() >= 1e16
        && serde_json::Number::from_f64(f)
            .is_some_and(|float| stable_float(f, &float) == n.to_string())
}

/// A float as Python writes what jsonb gives back for it: an integer when its written form has an
/// exponent and no fraction digits left after it (serde writes `1e16`, `1.2345e20` for the integral
/// floats from 1e16 up), else Python's repr; `-0.0` is `0.0` (numeric has no negative zero).
fn stable_float(f: f64, n: &serde_json::Number) -> String {
    if f == 0.0 {
        return "0.0".into();
    }
    let written = n.to_string();
    let Some((mantissa, exponent)) = written.split_once(['e', 'E']) else {
        return python_float(f);
    };
    let Ok(exponent) = exponent.parse::<i32>() else {
        return python_float(f);
    };
    let (sign, mantissa) = mantissa
        .strip_prefix('-')
        .map_or(("", mantissa), |m| ("-", m));
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    match usize::try_from(exponent) {
        Ok(shift) if frac.len() <= shift => {
            let digits = format!("{int}{frac}{}", "0".repeat(shift - frac.len()));
            let digits = digits.trim_start_matches('0');
            format!("{sign}{}", if digits.is_empty() { "0" } else { digits })
        }
        _ => python_float(f),
    }
}

/// Numbers as Python's `json.dumps` writes them: integers as they are, floats as `repr(float)` (the
/// shortest digits that round-trip; positional for exponents -4 to 15, else `1e-05` / `1.5e+16`).
fn python_number(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() => python_float(f),
        _ => n.to_string(),
    }
}

fn python_float(f: f64) -> String {
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, like Python's repr: "-1.2345e-5".
    let scientific = format!("{f:e}");
    let (mantissa, exponent) = scientific
        .split_once('e')
        .expect("{:e} always has an exponent");
    let exponent: i32 = exponent.parse().expect("{:e} exponents are integers");
    let (sign, mantissa) = mantissa
        .strip_prefix('-')
        .map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exponent) {
        let point = exponent + 1;
        if point <= 0 {
            return format!(
                "{sign}0.{}{digits}",
                "0".repeat(point.unsigned_abs() as usize)
            );
        }
        let point = point as usize;
        let (int, frac) = if digits.len() > point {
            digits.split_at(point)
        } else {
            (digits.as_str(), "")
        };
        let int = format!("{int}{}", "0".repeat(point.saturating_sub(digits.len())));
        let frac = if frac.is_empty() { "0" } else { frac };
        return format!("{sign}{int}.{frac}");
    }
    let (first, rest) = digits.split_at(1);
    let mantissa = if rest.is_empty() {
        first.to_owned()
    } else {
        format!("{first}.{rest}")
    };
    let exponent_sign = if exponent < 0 { '-' } else { '+' };
    format!(
        "{sign}{mantissa}e{exponent_sign}{:02}",
        exponent.unsigned_abs()
    )
}

/// How deep arrays and objects may nest: serde_json's own limit when it decodes a tree.
const MAX_DEPTH: usize = 128;

/// The canonical form of the JSON text `text`, written as it is read: objects are taken apart into
/// their members' raw text (borrowed from `text`), sorted, and each member written in turn; arrays
/// and scalars go straight through. Nothing the size of the text is held besides the text itself.
/// Duplicate keys keep their last value, as a decoded tree (and Python) would.
fn write_canonical_text<S: Sink>(
    text: &str,
    out: &mut S,
    numbers: Numbers,
) -> Result<(), serde_json::Error> {
    write_canonical_at(text, out, numbers, 0)
}

fn write_canonical_at<S: Sink>(
    text: &str,
    out: &mut S,
    numbers: Numbers,
    depth: usize,
) -> Result<(), serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    serde::de::DeserializeSeed::deserialize(
        Canonical {
            out,
            numbers,
            depth,
            comma: false,
        },
        &mut deserializer,
    )?;
    deserializer.end()
}

/// Writes one JSON value in canonical form as serde reads it (see [`write_canonical_text`]).
struct Canonical<'o, S> {
    out: &'o mut S,
    numbers: Numbers,
    /// Arrays and objects this value is inside.
    depth: usize,
    /// Write a comma first: the value is an array's element after the first.
    comma: bool,
}

impl<S: Sink> Canonical<'_, S> {
    fn start(&mut self) {
        if self.comma {
            self.out.push(',');
        }
    }

    fn number<E>(mut self, n: serde_json::Number) -> Result<(), E> {
        self.start();
        write_number(&n, self.out, self.numbers);
        Ok(())
    }

    fn nest<E: serde::de::Error>(&self) -> Result<usize, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom("recursion limit exceeded"));
        }
        Ok(self.depth + 1)
    }
}

impl<'de, S: Sink> serde::de::DeserializeSeed<'de> for Canonical<'_, S> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, S: Sink> serde::de::Visitor<'de> for Canonical<'_, S> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(mut self, b: bool) -> Result<(), E> {
        self.start();
        self.out.push_str(if b { "true" } else { "false" });
        Ok(())
    }

    fn visit_i64<E>(self, n: i64) -> Result<(), E> {
        self.number(n.into())
    }

    fn visit_u64<E>(self, n: u64) -> Result<(), E> {
        self.number(n.into())
    }

    fn visit_f64<E>(mut self, f: f64) -> Result<(), E> {
        match serde_json::Number::from_f64(f) {
            Some(n) => self.number(n),
            // What a decoded tree makes of a float it cannot hold (JSON text has none).
            None => {
                self.start();
                self.out.push_str("null");
                Ok(())
            }
        }
    }

    fn visit_str<E>(mut self, s: &str) -> Result<(), E> {
        self.start();
        write_string(s, self.out);
        Ok(())
    }

    fn visit_unit<E>(mut self) -> Result<(), E> {
        self.start();
        self.out.push_str("null");
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let depth = self.nest()?;
        self.start();
        self.out.push('[');
        let mut comma = false;
        while seq
            .next_element_seed(Canonical {
                out: &mut *self.out,
                numbers: self.numbers,
                depth,
                comma,
            })?
            .is_some()
        {
            comma = true;
        }
        self.out.push(']');
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let depth = self.nest()?;
        let mut members: Vec<(Cow<'de, str>, &'de serde_json::value::RawValue)> = Vec::new();
        while let Some((Key(key), value)) = map.next_entry()? {
            members.push((key, value));
        }
        // Stable: of equal keys, the last stays last, and is the one written.
        members.sort_by(|(a, _), (b, _)| a.cmp(b));
        self.start();
        self.out.push('{');
        let mut first = true;
        for (i, (key, value)) in members.iter().enumerate() {
            if members.get(i + 1).is_some_and(|(next, _)| next == key) {
                continue;
            }
            if !first {
                self.out.push(',');
            }
            first = false;
            write_string(key, self.out);
            self.out.push(':');
            write_canonical_at(value.get(), self.out, self.numbers, depth)
                .map_err(serde::de::Error::custom)?;
        }
        self.out.push('}');
        Ok(())
    }
}

/// An object key as it is in the text, when it has no escapes.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

fn write_string<S: Sink>(s: &str, out: &mut S) {
    out.push('"');
    // Runs of printable ASCII go through as they are, in one piece.
    let plain = |b: &u8| (0x20..=0x7e).contains(b) && *b != b'"' && *b != b'\\';
    let mut s = s;
    loop {
        let run = s.bytes().position(|b| !plain(&b)).unwrap_or(s.len());
        out.push_str(&s[..run]);
        s = &s[run..];
        let Some(ch) = s.chars().next() else { break };
        s = &s[ch.len_utf8()..];
        escape(ch, out);
    }
    out.push('"');
}

/// One character that is not printable ASCII, or `"` or `\`, as Python's `json.dumps` escapes it.
fn escape<S: Sink>(ch: char, out: &mut S) {
    match ch {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{08}' => out.push_str("\\b"),
        '\u{0c}' => out.push_str("\\f"),
        c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str("\\u");
                out.push_str(&hex(&unit.to_be_bytes()));
            }
        }
        c => out.push(c),
    }
}

/// What kind of message a new one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Event,
    Command,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "EVENT",
            Kind::Command => "COMMAND",
        }
    }
}

/// The message that caused a new one: its id, stream and metadata flow into the new message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cause<'a> {
    pub id: &'a str,
    pub stream: &'a str,
    pub meta: Option<&'a MetaView<'a>>,
}

/// Everything needed to write the metadata of a new message.
#[derive(Debug, Clone, Copy)]
pub struct NewMeta<'a> {
    pub id: &'a str,
    pub kind: Kind,
    pub message_type: &'a str,
    pub stream: &'a str,
    pub time: &'a str,
    pub checksum: &'a str,
    pub expected_version: Option<i64>,
    pub deadline: Option<&'a str>,
    pub cause: Option<Cause<'a>>,
}

impl NewMeta<'_> {
    /// The metadata object, in Protean's shape. Correlation and causation come from the cause: a root
    /// message correlates to itself.
    pub fn to_json(&self) -> String {
        let cause_meta = self.cause.and_then(|c| c.meta);
        let deadline = match self.kind {
            Kind::Command => self
                .deadline
                .or(cause_meta.and_then(|m| m.headers.deadline.as_deref())),
            Kind::Event => None,
        };
        let (fqn, version) = split_type(self.message_type);
        let out = MetaOut {
            headers: HeadersOut {
                id: self.id,
                time: self.time,
                message_type: self.message_type,
                stream: self.stream,
                traceparent: cause_meta.and_then(|m| m.headers.traceparent.as_ref()),
                idempotency_key: None,
                deadline,
            },
            envelope: EnvelopeOut {
                specversion: "1.0",
                checksum: self.checksum,
            },
            domain: DomainOut {
                fqn,
                kind: self.kind.as_str(),
                // Protean's rule: a command comes from the stream of the event that caused it; an event
                // carries on the origin of the command it answers (none when an event handler raised it).
                origin_stream: match self.kind {
                    Kind::Command => self.cause.map(|c| c.stream),
                    Kind::Event => {
                        cause_meta.and_then(|m| m.domain.as_ref()?.origin_stream.as_deref())
                    }
                },
                // Protean leaves a command's category empty; an event's is its stream's.
                stream_category: match self.kind {
                    Kind::Event => Some(crate::store::category(self.stream)),
                    Kind::Command => None,
                },
                version,
                sequence_id: None,
                asynchronous: true,
                expected_version: self.expected_version,
                priority: 0,
                correlation_id: match cause_meta
                    .and_then(MetaView::correlation_id)
                    .or(self.cause.map(|c| c.id))
                {
                    Some(inherited) => Cow::Borrowed(inherited),
                    // A root message starts a new chain, with a fresh id as Protean makes them.
                    None => Cow::Owned(uuid::Uuid::new_v4().simple().to_string()),
                },
                causation_id: self.cause.map(|c| c.id),
            },
            extensions: Map::new(),
        };
        serde_json::to_string(&out).expect("metadata of strings and numbers serializes")
    }
}

#[derive(Serialize)]
struct MetaOut<'a> {
    headers: HeadersOut<'a>,
    envelope: EnvelopeOut<'a>,
    domain: DomainOut<'a>,
    extensions: Map<String, Value>,
}

#[derive(Serialize)]
struct HeadersOut<'a> {
    id: &'a str,
    time: &'a str,
    #[serde(rename = "type")]
    message_type: &'a str,
    stream: &'a str,
    traceparent: Option<&'a Value>,
    idempotency_key: Option<&'a str>,
    deadline: Option<&'a str>,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    specversion: &'a str,
    checksum: &'a str,
}

#[derive(Serialize)]
struct DomainOut<'a> {
    fqn: &'a str,
    kind: &'a str,
    origin_stream: Option<&'a str>,
    stream_category: Option<&'a str>,
    version: u64,
    sequence_id: Option<&'a str>,
    asynchronous: bool,
    expected_version: Option<i64>,
    priority: u8,
    correlation_id: Cow<'a, str>,
    causation_id: Option<&'a str>,
}

/// `Fulfilment.OrderPlaced.v1` → (`Fulfilment.OrderPlaced`, 1).
fn split_type(message_type: &str) -> (&str, u64) {
    match message_type.rsplit_once(".v") {
        Some((name, version)) => (name, version.parse().unwrap_or(1)),
        None => (message_type, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_matches_python_json_dumps() {
        let value: Value = serde_json::from_str(
            r#"{"b": [1, 2.5, "é😀"], "a": {"z": null, "y": true}, "c": 1e16, "d": 1e-7}"#,
        )
        .unwrap();
        assert_eq!(
            canonical_json(&value),
            r#"{"a":{"y":true,"z":null},"b":[1,2.5,"\u00e9\ud83d\ude00"],"c":1e+16,"d":1e-07}"#
        );
        // json.dumps({"k": 'q"u\\b\nl\t\x01\x7fz', "n": [-7, 18446744073709551615]}, sort_keys=True,
        // separators=(",", ":")): every character outside space to tilde escaped, runs between.
        let value = serde_json::json!({"n": [-7, u64::MAX], "k": "q\"u\\b\nl\t\u{1}\u{7f}z"});
        assert_eq!(
            canonical_json(&value),
            r#"{"k":"q\"u\\b\nl\t\u0001\u007fz","n":[-7,18446744073709551615]}"#
        );
    }

    #[test]
    fn the_stable_form_is_what_a_jsonb_round_trip_gives_back() {
        // Written by serde, as the host stores it; and as PostgreSQL's jsonb gives it back.
        let written: Value = serde_json::from_str(
            r#"{"a": 1e16, "b": 1.2345e20, "c": 1.5e-7, "d": 30.5, "e": 12.0, "f": -0.0, "g": 7, "h": "é", "i": -2.5e17, "j": 1e15}"#,
        )
        .unwrap();
        let jsonb: Value = serde_json::from_str(
            r#"{"a": 10000000000000000, "b": 123450000000000000000, "c": 0.00000015, "d": 30.5, "e": 12.0, "f": 0.0, "g": 7, "h": "é", "i": -250000000000000000, "j": 1000000000000000.0}"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&written["a"]).unwrap(),
            "1e+16",
            "serde writes integral floats from 1e16 up with an exponent"
        );
        assert_eq!(stable_json(&written), stable_json(&jsonb));
        assert_eq!(
            stable_json(&written),
            r#"{"a":10000000000000000,"b":123450000000000000000,"c":1.5e-07,"d":30.5,"e":12.0,"f":0.0,"g":7,"h":"\u00e9","i":-250000000000000000,"j":1000000000000000.0}"#,
            "Python's json.dumps of the data read back from jsonb"
        );
    }

    #[test]
    fn a_python_checksum_taken_before_jsonb_still_verifies_after_it() {
        let python: Value = serde_json::from_str(r#"{"a": 1e16, "c": 1.5e-7, "h": "ü"}"#).unwrap();
        let jsonb = r#"{"a": 10000000000000000, "c": 0.00000015, "h": "ü"}"#;
        let metadata = format!(
            r#"{{"envelope": {{"checksum": "{}"}}}}"#,
            hex(&Sha256::digest(canonical_json(&python).as_bytes()))
        );
        assert_eq!(MetaView::parse(&metadata).unwrap().verify(jsonb), Ok(()));
        let other = r#"{"a": 10000000000000001, "c": 0.00000015, "h": "ü"}"#;
        assert!(MetaView::parse(&metadata).unwrap().verify(other).is_err());
    }

    #[test]
    fn origin_streams_follow_protean() {
        let command = MetaView::parse(
            r#"{"headers": {"id": "c1"}, "domain": {"origin_stream": "shop::cart-9"}}"#,
        )
        .unwrap();
        let cause = Cause {
            id: "c1",
            stream: "shop::order:command-1",
            meta: Some(&command),
        };
        let meta = |kind| NewMeta {
            id: "n1",
            kind,
            message_type: "Shop.X.v1",
            stream: "shop::order-1",
            time: "t",
            checksum: "x",
            expected_version: None,
            deadline: None,
            cause: Some(cause),
        };
        let event: Value = serde_json::from_str(&meta(Kind::Event).to_json()).unwrap();
        assert_eq!(
            event["domain"]["origin_stream"], "shop::cart-9",
            "an event carries on its command's origin"
        );
        let sent: Value = serde_json::from_str(&meta(Kind::Command).to_json()).unwrap();
        assert_eq!(
            sent["domain"]["origin_stream"], "shop::order:command-1",
            "a command comes from its cause's stream"
        );
    }

    #[test]
    fn the_canonical_form_of_a_text_is_that_of_its_decoded_tree() {
        let texts = [
            r#"{"b": [1, 2.5, "é😀", {"z": null, "y": [true, false]}], "a": {"z": null, "y": true}}"#,
            r#"{"c": 1e16, "d": 1e-7, "e": -0.0, "f": 12.0, "g": 1.2345e20, "h": 18446744073709551615, "i": -9223372036854775808, "j": 123456789012345678901234567890}"#,
            r#"{"k\"ey": "q\"uote\\back\nline\u0001", "\u00e9": "\ud83d\ude00", "": []}"#,
            r#"{"dup": 1, "a": 0, "dup": {"x": 2, "x": 3}}"#,
            r#"  [ {"b":1,"a":2} , [] , {} , "s" , -1.5e-9 ]  "#,
            r#""just a string""#,
            "42",
            "null",
        ];
        for text in texts {
            let tree: Value = serde_json::from_str(text).unwrap();
            for numbers in [Numbers::Python, Numbers::Stable, Numbers::PythonFloats] {
                let mut streamed = String::new();
                write_canonical_text(text, &mut streamed, numbers).unwrap();
                assert_eq!(
                    streamed,
                    canonical_with(&tree, numbers),
                    "{text} ({numbers:?})"
                );
            }
            assert_eq!(checksum_text(text).unwrap(), checksum(&tree), "{text}");
        }
    }

    #[test]
    fn a_text_that_is_not_json_or_nests_too_deep_has_no_canonical_form() {
        for bad in ["{not json", r#"{"a": 1} trailing"#, r#"{"a": [1,]}"#, ""] {
            assert!(checksum_text(bad).is_err(), "{bad:?}");
        }
        // Objects are read member by member, each with a fresh parser: the depth is counted across.
        let nested = |depth: usize| {
            format!(
                "{}1{}",
                r#"{"a":["#.repeat(depth / 2),
                "]}".repeat(depth / 2)
            )
        };
        assert!(checksum_text(&nested(MAX_DEPTH)).is_ok());
        let error = checksum_text(&nested(MAX_DEPTH + 2)).unwrap_err();
        assert!(
            error.to_string().contains("recursion limit exceeded"),
            "{error}"
        );
    }

    #[test]
    fn floats_are_written_as_python_repr() {
        let cases = [
            (30.5, "30.5"),
            (12.0, "12.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-1.5e-7, "-1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e20, "1.2345e+20"),
            (0.1, "0.1"),
            (123456.789, "123456.789"),
        ];
        for (f, python) in cases {
            assert_eq!(python_float(f), python, "{f}");
        }
    }

    #[test]
    fn a_tampered_payload_fails_its_checksum() {
        let data: Value = serde_json::json!({"order_id": "o1", "total": 30.0});
        let meta = format!(
            r#"{{"headers": {{"id": "m1"}}, "envelope": {{"checksum": "{}"}}}}"#,
            checksum(&data)
        );
        let view = MetaView::parse(&meta).unwrap();
        assert_eq!(view.verify(r#"{"total": 30.0, "order_id": "o1"}"#), Ok(()));
        assert!(matches!(
            view.verify(r#"{"order_id": "o2", "total": 30.0}"#),
            Err(PoisonError::Checksum { .. })
        ));
        assert!(matches!(
            view.verify("{not json"),
            Err(PoisonError::BadData(_))
        ));
    }

    #[test]
    fn deadlines_parse_in_protean_formats() {
        let now = parse_time("2026-01-01T00:00:00+00:00").unwrap();
        for (deadline, expired) in [
            ("2025-12-31T23:59:59.999999+00:00", true),
            ("2026-01-01 00:00:01", false),
        ] {
            let meta = format!(r#"{{"headers": {{"deadline": "{deadline}"}}}}"#);
            assert_eq!(
                MetaView::parse(&meta).unwrap().expired(now),
                Ok(expired),
                "{deadline}"
            );
        }
        let bad = MetaView::parse(r#"{"headers": {"deadline": "soon"}}"#).unwrap();
        assert!(bad.expired(now).is_err());
    }

    #[test]
    fn children_inherit_correlation_and_name_their_cause() {
        let parent =
            MetaView::parse(r#"{"headers": {"id": "p1"}, "domain": {"correlation_id": "corr-9"}}"#)
                .unwrap();
        let cause = Cause {
            id: "p1",
            stream: "shop::order-1",
            meta: Some(&parent),
        };
        let meta = NewMeta {
            id: "c1",
            kind: Kind::Event,
            message_type: "Shop.Placed.v2",
            stream: "shop::order-1",
            time: "t",
            checksum: "x",
            expected_version: Some(3),
            deadline: None,
            cause: Some(cause),
        };
        let json: Value = serde_json::from_str(&meta.to_json()).unwrap();
        assert_eq!(json["domain"]["correlation_id"], "corr-9");
        assert_eq!(json["domain"]["causation_id"], "p1");
        assert_eq!(json["domain"]["version"], 2);
        assert_eq!(json["domain"]["fqn"], "Shop.Placed");
        assert_eq!(json["domain"]["stream_category"], "shop::order");
        let root = NewMeta {
            cause: None,
            kind: Kind::Command,
            ..meta
        };
        let json: Value = serde_json::from_str(&root.to_json()).unwrap();
        let correlation = json["domain"]["correlation_id"].as_str().unwrap();
        assert_eq!(
            correlation.len(),
            32,
            "a fresh uuid4 hex, as Protean makes: {correlation}"
        );
        assert_eq!(json["domain"]["causation_id"], Value::Null);
        assert_eq!(
            json["domain"]["stream_category"],
            Value::Null,
            "Protean leaves a command's category empty"
        );
    }
}
