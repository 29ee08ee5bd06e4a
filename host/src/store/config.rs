//! `[store]`: which backend, and its keys. Each backend's keys are resolved by the backend
//! (PostgreSQL's in `postgres::config`); a key of another backend is an error, not ignored.

use std::path::PathBuf;

use serde::Deserialize;

use super::{PostgresConfig, StoreConfig};
use crate::config::{Invalid, Problem};

/// The default store file, relative to the working directory.
pub const DEFAULT_STORE_PATH: &str = ".protean/store.db";

/// `[store]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreSection {
    #[serde(default)]
    provider: Provider,
    /// SQLite's file.
    path: Option<PathBuf>,
    /// PostgreSQL's keys.
    pub(super) uri: Option<String>,
    pub(super) pool_size: Option<u32>,
    pub(super) statement_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Provider {
    Memory,
    #[default]
    Sqlite,
    Postgres,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self::Sqlite {
            path: DEFAULT_STORE_PATH.into(),
        }
    }
}

impl StoreConfig {
    /// The store `[store]` names, checked.
    pub(crate) fn resolve(section: &StoreSection) -> Result<Self, Invalid> {
        if section.provider != Provider::Postgres {
            section.refuse_postgres_keys()?;
        }
        Ok(match section.provider {
            Provider::Memory => Self::Memory,
            Provider::Sqlite => Self::Sqlite {
                path: section
                    .path
                    .clone()
                    .unwrap_or_else(|| DEFAULT_STORE_PATH.into()),
            },
            Provider::Postgres => {
                if section.path.is_some() {
                    return Err(Invalid::new(
                        "store.path",
                        Problem::OnlyFor {
                            setting: "provider = \"sqlite\"",
                            fix: "the PostgreSQL store is named by store.uri",
                        },
                    ));
                }
                Self::Postgres(PostgresConfig::resolve(section)?)
            }
        })
    }
}

impl StoreSection {
    fn refuse_postgres_keys(&self) -> Result<(), Invalid> {
        let postgres_only = [
            ("store.uri", self.uri.is_some()),
            ("store.pool_size", self.pool_size.is_some()),
            (
                "store.statement_timeout_ms",
                self.statement_timeout_ms.is_some(),
            ),
        ];
        match postgres_only.into_iter().find(|(_, set)| *set) {
            Some((key, _)) => Err(Invalid::new(
                key,
                Problem::OnlyFor {
                    setting: "provider = \"postgres\"",
                    fix: "remove it or set the provider",
                },
            )),
            None => Ok(()),
        }
    }
}
