//! The PostgreSQL keys of `[store]` (`uri`, `pool_size`, `statement_timeout_ms`), resolved.

use std::{path::PathBuf, time::Duration};

use super::PostgresConfig;
use crate::{
    config::{at_least, Invalid, Problem},
    store::StoreSection,
};

impl PostgresConfig {
    /// Connections per process when `store.pool_size` is not set.
    pub const DEFAULT_POOL_SIZE: u32 = 16;
    /// `store.statement_timeout_ms` when not set.
    pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

    /// `[store]`'s PostgreSQL keys, checked; the URI is parsed (not connected to) so that a typo is
    /// reported at start with its key.
    pub(crate) fn resolve(section: &StoreSection) -> Result<Self, Invalid> {
        let Some(uri) = section.uri.clone() else {
            return Err(Invalid::new(
                "store.uri",
                Problem::Required {
                    setting: "provider = \"postgres\"",
                    example: "uri = \"postgresql://user:password@host:5432/database\"",
                },
            ));
        };
        let config = Self {
            uri: uri.into(),
            pool_size: at_least("store.pool_size", section.pool_size, 1)?
                .unwrap_or(Self::DEFAULT_POOL_SIZE),
            statement_timeout: at_least(
                "store.statement_timeout_ms",
                section.statement_timeout_ms,
                1,
            )?
            .map_or(Self::DEFAULT_STATEMENT_TIMEOUT, Duration::from_millis),
        };
        config
            .parse()
            .map_err(|reason| Invalid::new("store.uri", Problem::BadUri(reason)))?;
        Ok(config)
    }
}

/// What is wrong with `store.uri`. It never quotes the URI, which may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("{0}; expected a URI like postgresql://user:password@host:5432/database")]
    Syntax(String),
    #[error("sslmode {0:?} is not one of disable, prefer, require, verify-ca, verify-full")]
    SslMode(String),
    #[error(
        "sslmode {0} needs sslrootcert=/path/to/ca.pem (the certificate that signed the server's)"
    )]
    NeedsRootCert(String),
    #[error("sslcert and sslkey go together (a client certificate and its key)")]
    CertWithoutKey,
    /// A certificate or key file that cannot be read or holds no PEM of its kind.
    #[error("{option} {}: {reason}", path.display())]
    File {
        option: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("sslcert and sslkey: {0}")]
    ClientCertificate(String),
    /// rustls refused to build a TLS configuration (its own words).
    #[error("TLS: {0}")]
    Tls(String),
}
