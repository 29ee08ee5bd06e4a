//! The one rule that keeps secrets out of every output: connection strings (Redis and PostgreSQL URIs,
//! libpq `key=value` strings) are shown with their passwords replaced by `***`.
//!
//! Every configuration value that can hold a secret is a [`ConnectionString`], whose `Display`,
//! `Debug` and `Serialize` all go through [`redact`]: a log line, an error, a status table or the
//! `--debug` configuration dump cannot print the secret by accident. Only the code that connects
//! calls [`ConnectionString::expose`].
//!
//! The rule errs on the side of hiding: the user-info of a URI ends at its *last* `@` before the query
//! (so a password holding a raw `@` or `:` is hidden whole), and a query parameter or `key=value` pair
//! whose key names a secret (`password`, `pass`, `sslpassword`, …) has its value hidden, quoted or not.

use std::fmt;

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// `text` with every password it holds replaced by [`MASK`]: a URI (`scheme://user:pass@host/...?password=...`)
/// or a libpq `key=value` string (`host=db password='x y'`).
pub fn redact(text: &str) -> String {
    match text.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", uri_rest(rest)),
        None => key_values(text),
    }
}

/// Whether a parameter of this name carries a secret.
fn is_secret(key: &str) -> bool {
    let key = key.trim().to_ascii_lowercase();
    matches!(
        key.as_str(),
        "pass" | "passwd" | "pwd" | "secret" | "token" | "auth"
    ) || key.contains("password")
}

/// The part of a URI after `://`: user-info password, then query parameters.
fn uri_rest(rest: &str) -> String {
    let (head, query) = rest.split_at(rest.find('?').unwrap_or(rest.len()));
    let head = match head.rfind('@') {
        Some(at) => {
            let (userinfo, host) = head.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:{MASK}{host}"),
                None => head.to_owned(),
            }
        }
        None => head.to_owned(),
    };
    let query = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_secret(key.trim_start_matches('?')) => format!("{key}={MASK}"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{head}{query}")
}

/// A libpq `key = value` string, values optionally single-quoted with `\` escapes: the text as written
/// with the values of secret keys replaced. Text it cannot parse after a secret key is hidden whole.
fn key_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let Some(eq) = rest.find('=') else {
            out.push_str(rest);
            return out;
        };
        let key = rest[..eq].split_whitespace().last().unwrap_or_default();
        out.push_str(&rest[..=eq]);
        let after = &rest[eq + 1..];
        let value_start = after.len() - after.trim_start().len();
        let value_len = value_len(&after[value_start..]);
        out.push_str(&after[..value_start]);
        let value = &after[value_start..value_start + value_len];
        out.push_str(if is_secret(key) { MASK } else { value });
        rest = &after[value_start + value_len..];
    }
}

/// The length of a value at the start of `text`: a quoted one up to its closing quote (or the end), a
/// bare one up to white space.
fn value_len(text: &str) -> usize {
    if !text.starts_with('\'') {
        return text.find(char::is_whitespace).unwrap_or(text.len());
    }
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '\'' => return i + 1,
            _ => {}
        }
    }
    text.len()
}

/// A configuration value that may hold a secret (a broker or store URI). Shown, debug-printed and
/// serialized redacted; [`ConnectionString::expose`] gives the real text to the code that connects.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString(String);

impl ConnectionString {
    /// The text as configured, password included: for connecting, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for ConnectionString {
    fn from(text: String) -> Self {
        Self(text)
    }
}

impl From<&str> for ConnectionString {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact(&self.0))
    }
}

impl serde::Serialize for ConnectionString {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&redact(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn uris_lose_their_passwords() {
        for (given, shown) in [
            (
                "redis://app:s3cret@127.0.0.1:6379/0",
                "redis://app:***@127.0.0.1:6379/0",
            ),
            ("rediss://:s3cret@cache:6380", "rediss://:***@cache:6380"),
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            (
                "postgresql://app:s3cret@db:5432/shop",
                "postgresql://app:***@db:5432/shop",
            ),
            (
                "postgresql://app:p@ss:w@rd@db/shop",
                "postgresql://app:***@db/shop",
            ),
            (
                "postgresql://app:p%40ss%3A@db/shop",
                "postgresql://app:***@db/shop",
            ),
            (
                "postgresql://db/shop?user=app&password=s3cret&sslmode=require",
                "postgresql://db/shop?user=app&password=***&sslmode=require",
            ),
            (
                "postgresql://db/shop?password=s3cret",
                "postgresql://db/shop?password=***",
            ),
            ("postgres://db/shop", "postgres://db/shop"),
            (
                "postgresql://app@db/shop?sslpassword=k",
                "postgresql://app@db/shop?sslpassword=***",
            ),
        ] {
            assert_eq!(redact(given), shown, "{given}");
        }
    }

    #[test]
    fn key_value_strings_lose_their_passwords() {
        for (given, shown) in [
            (
                "host=db user=app password=s3cret",
                "host=db user=app password=***",
            ),
            (
                "host=db password = s3cret user=app",
                "host=db password = *** user=app",
            ),
            (
                "host=db password='s3 cr\\'et' user=app",
                "host=db password=*** user=app",
            ),
            ("password='unterminated s3cret", "password=***"),
            ("PASSWORD=s3cret", "PASSWORD=***"),
            ("host=db", "host=db"),
        ] {
            assert_eq!(redact(given), shown, "{given}");
        }
    }

    #[test]
    fn connection_strings_print_redacted_everywhere() {
        let uri = super::ConnectionString::from("redis://:p@ss@h:1/0");
        assert_eq!(uri.to_string(), "redis://:***@h:1/0");
        assert_eq!(format!("{uri:?}"), "\"redis://:***@h:1/0\"");
        assert_eq!(
            serde_json::to_string(&uri).unwrap(),
            "\"redis://:***@h:1/0\""
        );
        assert_eq!(uri.expose(), "redis://:p@ss@h:1/0");
    }
}
