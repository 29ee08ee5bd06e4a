//! The PostgreSQL keys of `[store]` (`uri`, `pool_size`, `statement_timeout_ms`), resolved.

use std::time::Duration;

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
