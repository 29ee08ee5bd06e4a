//! `[brokers.default]`, the Redis broker's section, resolved. Only one broker, named `default`, is
//! supported; its URI is checked for a scheme here and connected to by `RedisBroker`.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::super::{BrokerConfig, GroupStart, TlsFiles};
use crate::config::{at_least_because, Invalid, Problem};

/// `[brokers.NAME]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BrokerSection {
    uri: String,
    #[serde(default)]
    group_start: GroupStart,
    block_ms: Option<u64>,
    claim_idle_ms: Option<u64>,
    reclaim_interval_ms: Option<u64>,
    tls_ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
}

impl BrokerConfig {
    /// How long a read waits for new entries when `block_ms` is not set.
    pub const DEFAULT_BLOCK: Duration = Duration::from_secs(1);
    /// `claim_idle_ms` when not set.
    pub const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(30);
    /// `reclaim_interval_ms` when not set.
    pub const DEFAULT_RECLAIM_INTERVAL: Duration = Duration::from_secs(5);

    /// The broker `[brokers.default]` configures, if any, checked.
    pub(crate) fn resolve(
        mut brokers: BTreeMap<String, BrokerSection>,
    ) -> Result<Option<Self>, Invalid> {
        if let Some(other) = brokers.keys().find(|name| *name != "default") {
            return Err(Invalid::new(
                format!("brokers.{other}"),
                Problem::OnlyDefaultBroker,
            ));
        }
        let Some(b) = brokers.remove("default") else {
            return Ok(None);
        };
        if !b.uri.contains("://") {
            return Err(Invalid::new("brokers.default.uri", Problem::NotAUri));
        }
        let tls = b.tls()?;
        let millis = |key: &str, value: Option<u64>, why, default| {
            Ok::<_, Invalid>(
                at_least_because(&format!("brokers.default.{key}"), value, 1, why)?
                    .map_or(default, Duration::from_millis),
            )
        };
        Ok(Some(Self {
            block: millis(
                "block_ms",
                b.block_ms,
                Some("0 would block forever"),
                Self::DEFAULT_BLOCK,
            )?,
            // 0 would take every pending entry from its consumer at once (claim) or spin (reclaim).
            claim_idle: millis(
                "claim_idle_ms",
                b.claim_idle_ms,
                None,
                Self::DEFAULT_CLAIM_IDLE,
            )?,
            reclaim_interval: millis(
                "reclaim_interval_ms",
                b.reclaim_interval_ms,
                None,
                Self::DEFAULT_RECLAIM_INTERVAL,
            )?,
            uri: b.uri.into(),
            tls,
            group_start: b.group_start,
        }))
    }
}

impl BrokerSection {
    /// The TLS files, which need `rediss://`, a client certificate with its key.
    fn tls(&self) -> Result<TlsFiles, Invalid> {
        let tls = TlsFiles {
            ca_file: self.tls_ca_file.clone(),
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
        };
        if tls != TlsFiles::default() && !self.uri.starts_with("rediss://") {
            return Err(Invalid::new(
                "brokers.default.uri",
                Problem::TlsWithoutRediss,
            ));
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(Invalid::new(
                "brokers.default.tls_cert_file",
                Problem::Together {
                    first: "tls_cert_file",
                    second: "tls_key_file",
                    what: "a client certificate and its key",
                },
            ));
        }
        Ok(tls)
    }
}
