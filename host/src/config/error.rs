//! What can be wrong with a configuration: every error is one line naming the file, the key, what is
//! wrong and how to fix it, because an operator reads it at a failed start.

use std::path::{Path, PathBuf};

/// Why the configuration could not be used. Each names the file and the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("cannot read config file {}: {reason}; check the path (--config) and that this user may read it", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("config file {}, line {line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("config file {}: {key}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        problem: Problem,
    },
}

/// A key with a bad value, before it is known which file it came from.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{key}: {problem}")]
pub struct Invalid {
    /// The key's full dotted name (`server.ordering.lease_ttl_ms`).
    pub key: String,
    pub problem: Problem,
}

impl Invalid {
    /// `key` has `problem`.
    pub fn new(key: impl Into<String>, problem: Problem) -> Self {
        Self {
            key: key.into(),
            problem,
        }
    }

    /// The error for the file at `path`.
    pub fn at(self, path: &Path) -> Error {
        Error::Invalid {
            path: path.into(),
            key: self.key,
            problem: self.problem,
        }
    }
}

/// What is wrong with a value, and the fix.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Problem {
    /// The file's shape, in serde's words: an unknown key (with the known ones), a wrong type, an
    /// unknown variant.
    #[error("{0}")]
    Shape(String),
    #[error("must be at least {min}{}", because(.why))]
    Below {
        min: u64,
        /// Why the floor is there, when the number alone does not say it.
        why: Option<&'static str>,
    },
    #[error("must be between {min} and {max}")]
    Between { min: u64, max: u64 },
    #[error("{value} is below {other_key} {other}; raise it or lower {other_key}")]
    BelowOther {
        value: u64,
        other_key: &'static str,
        other: u64,
    },
    #[error("{value} is below {floor}; the value is in bytes (1 MiB = 1048576)")]
    BytesBelow { value: u64, floor: u64 },
    #[error("{value} is above {ceiling}, the most a PostgreSQL jsonb value holds; keep large payloads outside messages and send a reference")]
    BytesAbove { value: u64, ceiling: u64 },
    #[error("applies to {setting} only; {fix}")]
    OnlyFor {
        setting: &'static str,
        fix: &'static str,
    },
    #[error("is required for {setting}; set it like {example}")]
    Required {
        setting: &'static str,
        example: &'static str,
    },
    #[error("\"stream\" needs a broker; add [brokers.default] with a uri")]
    StreamWithoutBroker,
    #[error("only [brokers.default] is supported; rename the section")]
    OnlyDefaultBroker,
    /// The value itself is not shown: without a scheme there is no telling which part is a password.
    #[error("is not a URI (no scheme://); write redis://HOST:PORT[/DB] or redis://:PASSWORD@HOST:PORT[/DB]")]
    NotAUri,
    #[error("tls_ca_file, tls_cert_file and tls_key_file need a TLS connection; write rediss://HOST:PORT[/DB]")]
    TlsWithoutRediss,
    #[error("{first} and {second} go together ({what})")]
    Together {
        first: &'static str,
        second: &'static str,
        what: &'static str,
    },
    #[error("environment variable {name} is not set; set it or write ${{{name}|default}}")]
    UnsetVariable { name: String },
    /// `text` is the value redacted: it may hold a password.
    #[error("unclosed ${{ in {text:?}; write ${{VAR}} or ${{VAR|default}}")]
    UnclosedVariable { text: String },
    #[error("unknown profile {name:?}; known profiles: {}", .known.join(", "))]
    UnknownProfile { name: String, known: Vec<String> },
    #[error("{name:?} is a built-in profile; choose another name")]
    BuiltinProfile { name: String },
    #[error("{host:?} is not an IP address; write 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")]
    NotAnAddress { host: String },
    /// The connection string does not parse; the reason never quotes it (it may hold a password).
    #[error("{0}")]
    BadUri(crate::store::postgres::UriError),
}

fn because(why: &Option<&'static str>) -> String {
    why.map(|why| format!(" ({why})")).unwrap_or_default()
}

/// `value`, unless it is below `min`.
pub(crate) fn at_least<T: Copy + Into<u64>>(
    key: &str,
    value: Option<T>,
    min: u64,
) -> Result<Option<T>, Invalid> {
    at_least_because(key, value, min, None)
}

/// `value`, unless it is below `min`; the error says `why` the floor is there.
pub(crate) fn at_least_because<T: Copy + Into<u64>>(
    key: &str,
    value: Option<T>,
    min: u64,
    why: Option<&'static str>,
) -> Result<Option<T>, Invalid> {
    match value {
        Some(v) if v.into() < min => Err(Invalid::new(key, Problem::Below { min, why })),
        value => Ok(value),
    }
}
