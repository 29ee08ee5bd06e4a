//! Appends by any writer, as they commit: a connection of its own LISTENs on `protean_appended`, which
//! migration 13's trigger notifies with the highest global position each appending statement wrote.
//! A replica learns so of another replica's (or a MessageDB client's) messages at once, instead of at
//! its next poll; the poll stays, for a notification lost with a dropped connection.

use std::time::Duration;

use postgres::{fallible_iterator::FallibleIterator, Client};

use super::{pool, Tls};
use crate::store::{AppendWatch, Result};

/// How to open the listening connection.
#[derive(Clone)]
pub(super) struct Connector {
    pub(super) config: postgres::Config,
    pub(super) tls: Tls,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").finish_non_exhaustive()
    }
}

/// The listening side; connects on first use and again after a failure.
pub(super) struct Listener {
    connector: Connector,
    client: Option<Client>,
}

impl Listener {
    pub(super) fn new(connector: Connector) -> Self {
        Self {
            connector,
            client: None,
        }
    }

    fn client(&mut self) -> Result<&mut Client> {
        if self.client.is_none() {
            let Connector { config, tls } = &self.connector;
            let mut client = pool::connect(config, tls)?;
            client.batch_execute("LISTEN protean_appended")?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }
}

impl AppendWatch for Listener {
    fn next(&mut self, wait: Duration) -> Result<Option<u64>> {
        let client = self.client()?;
        let highest = highest(client, wait);
        if highest.is_err() || client.is_closed() {
            // Connected again on the next call.
            self.client = None;
        }
        Ok(highest?)
    }
}

/// The highest position notified: waiting up to `wait` for a first notification, then taking the ones
/// already arrived.
fn highest(client: &mut Client, wait: Duration) -> Result<Option<u64>, postgres::Error> {
    let position = |n: &postgres::Notification| n.payload().parse::<u64>().ok();
    let mut notifications = client.notifications();
    let Some(first) = notifications.timeout_iter(wait).next()? else {
        return Ok(None);
    };
    let mut highest = position(&first);
    let mut arrived = notifications.iter();
    while let Some(more) = arrived.next()? {
        highest = highest.max(position(&more));
    }
    Ok(highest)
}
