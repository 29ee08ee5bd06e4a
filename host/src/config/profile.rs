//! Subscription settings as written (`[server]`, `[profiles.NAME]`, `[server.handlers.NAME]`, what a
//! handler declares in code): every key optional, laid over [`Settings`] lowest first.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{
    error::{at_least, at_least_because, Invalid, Problem},
    Settings,
};

/// Subscription settings as written; every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Profile {
    pub(super) messages_per_tick: Option<u32>,
    pub(super) max_retries: Option<u32>,
    pub(super) retry_delay_ms: Option<u64>,
    pub(super) max_retry_delay_ms: Option<u64>,
    pub(super) handler_timeout_ms: Option<u64>,
}

/// The profiles every configuration has, by name: (messages per tick, retries, first retry delay).
const BUILTIN: [(&str, u32, u32, u64); 3] = [
    ("fast", 10, 2, 100),
    ("batch", 500, 5, 2000),
    ("debug", 1, 1, 0),
];

impl Profile {
    /// Lay the keys that are set over `s`.
    pub(super) fn apply(&self, s: &mut Settings) {
        s.messages_per_tick = self.messages_per_tick.unwrap_or(s.messages_per_tick);
        s.max_retries = self.max_retries.unwrap_or(s.max_retries);
        s.retry_delay_ms = self.retry_delay_ms.unwrap_or(s.retry_delay_ms);
        s.max_retry_delay_ms = self.max_retry_delay_ms.unwrap_or(s.max_retry_delay_ms);
        s.handler_timeout_ms = self.handler_timeout_ms.unwrap_or(s.handler_timeout_ms);
    }

    /// The built-in profile `name`, if there is one.
    pub(super) fn builtin(name: &str) -> Option<Self> {
        let (_, mpt, retries, delay) = BUILTIN.into_iter().find(|(n, ..)| *n == name)?;
        Some(Self {
            messages_per_tick: Some(mpt),
            max_retries: Some(retries),
            retry_delay_ms: Some(delay),
            ..Self::default()
        })
    }

    /// The profile `name` refers to (the file's, else a built-in), for the key `key` that names it.
    pub(super) fn find(
        profiles: &BTreeMap<String, Profile>,
        name: &str,
        key: &str,
    ) -> Result<Self, Invalid> {
        if let Some(found) = profiles.get(name).cloned().or_else(|| Self::builtin(name)) {
            return Ok(found);
        }
        let known = BUILTIN.iter().map(|(n, ..)| n.to_string());
        Err(Invalid::new(
            key,
            Problem::UnknownProfile {
                name: name.to_owned(),
                known: known.chain(profiles.keys().cloned()).collect(),
            },
        ))
    }

    /// Check the keys of the section `key`.
    pub(super) fn validate(&self, key: &str) -> Result<(), Invalid> {
        at_least(
            &format!("{key}.messages_per_tick"),
            self.messages_per_tick,
            1,
        )?;
        at_least_because(
            &format!("{key}.handler_timeout_ms"),
            self.handler_timeout_ms,
            1,
            Some("a handler needs some time; raise it for slow handlers"),
        )?;
        // A profile may be used under sections that set the other key; both keys of one profile
        // must agree on their own. `[server]` and handler sections are checked layered, in resolve.
        if let (Some(delay), Some(max)) = (self.retry_delay_ms, self.max_retry_delay_ms) {
            super::resolve::backoff(key, delay, max)?;
        }
        Ok(())
    }
}
