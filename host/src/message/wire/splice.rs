//! The wire form of stored text already known to be JSON, made by finding where its metadata's
//! top-level members start and end instead of parsing every value. Validating parses took a third of
//! the instructions of publishing an event (11,000 of 30,000, callgrind).
//!
//! "Known to be JSON": written by this host and unchanged since (the outbox row's checksum says so),
//! or read from a `jsonb` column. On other text the scan can be wrong, so it is never used there:
//! [`super::wire_json`] validates as it goes. Anything the scan does not expect (metadata that is not
//! an object, a key written with escapes, text after the object) makes it give up, and the caller
//! takes the validating path. Where both make a wire form, it is the same one (tested below).

use super::assemble;

/// Whether `c` is JSON's whitespace, the only characters that may stand between tokens.
fn whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// The wire form of the JSON texts `data` and `metadata`, or `None` where the scan gives up.
pub(super) fn splice(
    data: &str,
    metadata: &str,
    position: u64,
    global_position: u64,
) -> Option<String> {
    let data = data.trim_matches(whitespace);
    if data.is_empty() {
        return None;
    }
    let members = members(metadata)?;
    Some(assemble(data, members, position, global_position))
}

/// The members of the JSON object `text` as (key, value) texts, in order.
fn members(text: &str) -> Option<Vec<(&str, &str)>> {
    let bytes = text.as_bytes();
    let mut at = skip_whitespace(bytes, 0);
    if bytes.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_whitespace(bytes, at + 1);
    let mut members = Vec::with_capacity(8);
    if bytes.get(at) == Some(&b'}') {
        return ends_at(bytes, at).then_some(members);
    }
    loop {
        if bytes.get(at) != Some(&b'"') {
            return None;
        }
        let close = string_end(bytes, at)?;
        let key = &text[at + 1..close];
        if key.contains('\\') {
            return None;
        }
        at = skip_whitespace(bytes, close + 1);
        if bytes.get(at) != Some(&b':') {
            return None;
        }
        let start = skip_whitespace(bytes, at + 1);
        at = value_end(bytes, start)?;
        let value = text[start..at].trim_end_matches(whitespace);
        if value.is_empty() {
            return None;
        }
        members.push((key, value));
        match bytes[at] {
            b',' => at = skip_whitespace(bytes, at + 1),
            b'}' => return ends_at(bytes, at).then_some(members),
            _ => return None,
        }
    }
}

/// Whether the object closed at `close` is the end of the text, but for whitespace.
fn ends_at(bytes: &[u8], close: usize) -> bool {
    skip_whitespace(bytes, close + 1) == bytes.len()
}

fn skip_whitespace(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(|&b| whitespace(char::from(b))) {
        at += 1;
    }
    at
}

/// Where the string opening at `open` closes. An escape's backslash hides the byte after it (the rest
/// of a `\u` escape is hex digits).
fn string_end(bytes: &[u8], open: usize) -> Option<usize> {
    let mut at = open + 1;
    loop {
        at = quote_or_backslash(bytes, at)?;
        if bytes[at] == b'"' {
            return Some(at);
        }
        at += 2;
    }
}

/// The first `"` or `\` at or after `at`, looked for eight bytes at a time: strings are most of the
/// text, and most of them are short, so a call of `memchr` per string cost more than its scan.
fn quote_or_backslash(bytes: &[u8], mut at: usize) -> Option<usize> {
    const QUOTES: u64 = ONES * b'"' as u64;
    const BACKSLASHES: u64 = ONES * b'\\' as u64;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let found = zero_bytes(word ^ QUOTES) | zero_bytes(word ^ BACKSLASHES);
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let mut rest = bytes.get(at..)?.iter();
    rest.position(|&b| b == b'"' || b == b'\\').map(|i| at + i)
}

const ONES: u64 = 0x0101_0101_0101_0101;

/// The high bit of each zero byte of `word` (little-endian), and maybe of bytes above a zero byte: the
/// lowest bit set is always a zero byte's.
fn zero_bytes(word: u64) -> u64 {
    word.wrapping_sub(ONES) & !word & (ONES << 7)
}

/// Where the value starting at `start` ends: the `,` or `}` after it, at the depth it started.
fn value_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut at = start;
    while let Some(&byte) = bytes.get(at) {
        match byte {
            b'"' => at = string_end(bytes, at)?,
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth == 0 => return (byte == b'}').then_some(at),
            b'}' | b']' => depth -= 1,
            b',' if depth == 0 => return Some(at),
            _ => {}
        }
        at += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::splice;
    use crate::message::wire_json;

    /// Both ways of making a wire form agree on `data` and `metadata`, or the scan gives up.
    fn agree(data: &str, metadata: &str) -> bool {
        let validated = wire_json(data, metadata, 3, 17).expect("valid JSON");
        match splice(data, metadata, 3, 17) {
            Some(spliced) => {
                assert_eq!(spliced, validated, "data {data:?}, metadata {metadata:?}");
                true
            }
            None => false,
        }
    }

    #[test]
    fn the_splice_makes_the_validated_wire_form() {
        let cases = [
            (r#"{"n":1}"#, r#"{"headers":{"id":"a"},"extensions":{}}"#),
            (
                r#" {"n": 1} "#,
                "{ \"headers\" : { \"id\" : \"a\" } ,\n\t\"extensions\" : { } }\n",
            ),
            (
                "[1,2]",
                r#"{"extensions":{"extensions":{"event_store":1}},"domain":{}}"#,
            ),
            (
                "\"text\"",
                r#"{"event_store":{"position":9},"headers":{},"extensions":{}}"#,
            ),
            ("{}", r#"{"extensions":{},"event_store":{"position":9}}"#),
            (
                "null",
                r#"{"a":"\"},{\\","b":["}",{"c":"]\\\\"}],"extensions":"x"}"#,
            ),
            (
                "1",
                r#"{"a":"é\u00e9\n","b":-1.5e3,"c":[true,false,null],"d":{}}"#,
            ),
            ("{}", "{}"),
            ("{}", " { } "),
            ("{}", r#"{"a":1,"a":2,"event_store":1,"event_store":2}"#),
            ("{}", r#"{"a":[[[]]],"b":{"c":{"d":[{}]}}}"#),
            // As PostgreSQL renders jsonb.
            (
                r#"{"n": 1, "s": "a\u0001é"}"#,
                r#"{"domain": {"kind": "EVENT"}, "headers": {"id": "a", "n": [1, 2]}, "extensions": {}}"#,
            ),
        ];
        for (data, metadata) in cases {
            assert!(agree(data, metadata), "the scan gave up on {metadata:?}");
        }
    }

    #[test]
    fn the_splice_gives_up_on_what_it_does_not_expect() {
        for metadata in [
            r#"{"extension\u0073":{}}"#,
            r#"{"a\"b":1}"#,
            "[1]",
            "\"text\"",
            "null",
            r#"{"a":1} {"b":2}"#,
            r#"{"a":1}]"#,
            "",
        ] {
            assert_eq!(splice("{}", metadata, 0, 1), None, "{metadata:?}");
        }
        assert_eq!(splice("  ", "{}", 0, 1), None, "no data");
    }

    /// Text that is not JSON never reaches the splice; this only shows it cannot panic on it.
    #[test]
    fn the_splice_cannot_panic_on_text_cut_anywhere() {
        let metadata = r#"{"a":"x\"y\\","b":[1,{"c":"}"}],"extensions":{}}"#;
        for end in 0..metadata.len() {
            let _ = splice("{}", &metadata[..end], 0, 1);
        }
    }

    /// A generator of JSON values with the characters and keys the scan must step over.
    struct Values(u64);

    impl Values {
        fn next(&mut self, below: u64) -> u64 {
            // xorshift64: deterministic, so a failure reproduces.
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % below
        }

        fn text(&mut self) -> String {
            const PIECES: [&str; 12] = [
                "a",
                "\"",
                "\\",
                "}",
                "]",
                ",",
                ":",
                "é",
                "\n",
                "\u{1}",
                "extensions",
                "event_store",
            ];
            (0..self.next(6))
                .map(|_| PIECES[self.next(PIECES.len() as u64) as usize])
                .collect()
        }

        fn value(&mut self, depth: u32) -> Value {
            match self.next(if depth == 0 { 4 } else { 6 }) {
                0 => Value::Null,
                1 => json!(self.next(1000) as i64 - 500),
                2 => Value::String(self.text()),
                3 => json!(self.next(2) == 0),
                4 => (0..self.next(4)).map(|_| self.value(depth - 1)).collect(),
                _ => self.object(depth - 1),
            }
        }

        fn object(&mut self, depth: u32) -> Value {
            let map = (0..self.next(5))
                .map(|_| (self.text(), self.value(depth)))
                .collect::<serde_json::Map<_, _>>();
            Value::Object(map)
        }
    }

    #[test]
    fn the_splice_agrees_with_the_validating_path_on_generated_json() {
        let mut values = Values(0x9E37_79B9_7F4A_7C15);
        for _ in 0..3000 {
            let (data, metadata) = (values.value(3), values.object(3));
            // The one thing that makes the scan give up on JSON: a key written with escapes.
            let escaped = metadata.as_object().unwrap().keys();
            let expected = !escaped
                .map(|k| Value::from(k.as_str()).to_string())
                .any(|k| k.contains('\\'));
            for (data, metadata) in [
                (data.to_string(), metadata.to_string()),
                (
                    serde_json::to_string_pretty(&data).unwrap(),
                    serde_json::to_string_pretty(&metadata).unwrap(),
                ),
            ] {
                assert_eq!(agree(&data, &metadata), expected, "{metadata}");
            }
        }
    }
}
