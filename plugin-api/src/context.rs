//! What a handler can do: load aggregates, raise events, send commands, read and write documents.
//!
//! Invariant: nothing a handler does is written when it does it. Every write is buffered by the host and
//! committed as one unit of work after the handler returns, or dropped if it fails.

use std::collections::HashMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{
    aggregate::{Aggregate, Recorded},
    error::HandlerError,
    message::{Command, Event, Naming},
};

/// A read model: a JSON document stored by collection and id.
pub trait Document: Serialize + DeserializeOwned {
    /// The collection the document lives in, e.g. `"reservations"`.
    const COLLECTION: &'static str;
    /// The document's id within its collection.
    fn id(&self) -> String;
}

/// The host services behind a [`Context`], in plain Rust: what a handler can ask of the host during one
/// batch. Writes are buffered and tagged with the index of the message in the batch that made them;
/// reads see what is buffered so far.
///
/// `protean-host` implements it (and adapts it to the ABI's [`Host`](crate::abi::Host)), as does
/// [`crate::testing::TestHost`]. Domain authors never call it directly, so it is hidden from their docs.
#[doc(hidden)]
pub trait HostServices {
    /// Buffer an event; `expected_version` is the stream's last position the handler saw.
    fn raise_event(
        &self,
        index: u32,
        stream: &str,
        message_type: &str,
        data: &[u8],
        expected_version: Option<i64>,
    ) -> Result<(), String>;
    /// Buffer a command for its command stream.
    fn send_command(
        &self,
        index: u32,
        stream: &str,
        message_type: &str,
        data: &[u8],
    ) -> Result<(), String>;
    /// Events of a stream from a position, as a JSON array of `{"type", "position", "data"}`.
    fn read_stream(&self, stream: &str, from_position: u64) -> Result<Vec<u8>, String>;
    /// A document, if it exists.
    fn get_document(&self, collection: &str, id: &str) -> Result<Option<Vec<u8>>, String>;
    /// Buffer a document write.
    fn put_document(
        &self,
        index: u32,
        collection: &str,
        id: &str,
        data: &[u8],
    ) -> Result<(), String>;
    /// Buffer a document delete.
    fn delete_document(&self, index: u32, collection: &str, id: &str) -> Result<(), String>;
    /// Documents whose top-level `field` equals `value_json`, as a JSON array.
    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value_json: &[u8],
    ) -> Result<Vec<u8>, String>;
}

/// The message being handled.
#[derive(Debug, Clone, Copy)]
pub struct MessageInfo<'a> {
    /// `metadata.headers.id`.
    pub id: &'a str,
    /// The stream it was read from.
    pub stream: &'a str,
    /// Its full type name.
    pub message_type: &'a str,
    /// Its position in its stream.
    pub position: u64,
    /// Its position in the whole store.
    pub global_position: u64,
    /// The raw `metadata` JSON.
    pub metadata: &'a [u8],
}

impl MessageInfo<'_> {
    /// `metadata.domain.correlation_id`, if present.
    pub fn correlation_id(&self) -> Option<String> {
        #[derive(Deserialize)]
        struct Meta {
            domain: Option<DomainMeta>,
        }
        #[derive(Deserialize)]
        struct DomainMeta {
            correlation_id: Option<String>,
        }
        serde_json::from_slice::<Meta>(self.metadata)
            .ok()?
            .domain?
            .correlation_id
    }
}

/// The handle a handler works through.
pub struct Context<'a> {
    services: &'a dyn HostServices,
    naming: &'a Naming,
    index: u32,
    message: MessageInfo<'a>,
    /// Last known position of each stream this handler loaded or wrote, for optimistic concurrency.
    versions: HashMap<String, i64>,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        services: &'a dyn HostServices,
        naming: &'a Naming,
        index: u32,
        message: MessageInfo<'a>,
    ) -> Self {
        Self {
            services,
            naming,
            index,
            message,
            versions: HashMap::new(),
        }
    }

    /// The message being handled.
    pub fn message(&self) -> &MessageInfo<'a> {
        &self.message
    }

    /// The domain's naming rules.
    pub fn naming(&self) -> &Naming {
        self.naming
    }

    /// Load aggregate `A` with `id` by applying its events; `None` if its stream is empty.
    ///
    /// Events raised later for the same id are appended with the loaded version as the expected one, so a
    /// concurrent writer makes this unit of work fail and be retried.
    pub fn load<A: Aggregate>(&mut self, id: &str) -> Result<Option<A>, HandlerError> {
        let stream = self.naming.stream_of::<A>(id);
        let bytes = self
            .services
            .read_stream(&stream, 0)
            .map_err(HandlerError::retry)?;
        let events: Vec<Recorded> = serde_json::from_slice(&bytes).map_err(|e| {
            HandlerError::retry(format!("host returned unreadable stream {stream}: {e}"))
        })?;
        let Some(last) = events.last() else {
            self.versions.insert(stream, -1);
            return Ok(None);
        };
        self.versions.insert(stream, last.position() as i64);
        let mut aggregate = A::default();
        for event in &events {
            aggregate.apply(event)?;
        }
        Ok(Some(aggregate))
    }

    /// Raise `event` on the aggregate with `id`. It is stored in the aggregate's stream when the handler's
    /// unit of work commits.
    pub fn raise<E: Event>(&mut self, id: &str, event: &E) -> Result<(), HandlerError> {
        let stream = self.naming.stream_of::<E::Aggregate>(id);
        let data = to_json(event)?;
        let expected = self.versions.get(&stream).copied();
        self.services
            .raise_event(
                self.index,
                &stream,
                &self.naming.type_of::<E>(),
                &data,
                expected,
            )
            .map_err(HandlerError::retry)?;
        if let Some(version) = self.versions.get_mut(&stream) {
            *version += 1;
        }
        Ok(())
    }

    /// Send `command` to its aggregate's command stream.
    pub fn send<C: Command>(&mut self, command: &C) -> Result<(), HandlerError> {
        let stream = self.naming.command_stream_of(command);
        let data = to_json(command)?;
        self.services
            .send_command(self.index, &stream, &self.naming.type_of::<C>(), &data)
            .map_err(HandlerError::retry)
    }

    /// The document `D` with `id`, if it exists (including writes buffered earlier in this batch). The
    /// host notes the version read, so a later `put` or `delete` of it cannot overwrite a concurrent
    /// write (see [`Context::put`]).
    pub fn get<D: Document>(&self, id: &str) -> Result<Option<D>, HandlerError> {
        let found = self
            .services
            .get_document(D::COLLECTION, id)
            .map_err(HandlerError::retry)?;
        found
            .map(|bytes| from_json(&bytes, D::COLLECTION))
            .transpose()
    }

    /// Write `document` (insert or replace). If this batch read it (`get` or `find`), the write commits
    /// only if nobody wrote the document since (insert only if it is still absent when it was read as
    /// absent); otherwise the host re-runs the batch on the new document. A document not read first is
    /// written whatever is stored.
    pub fn put<D: Document>(&mut self, document: &D) -> Result<(), HandlerError> {
        let data = to_json(document)?;
        self.services
            .put_document(self.index, D::COLLECTION, &document.id(), &data)
            .map_err(HandlerError::retry)
    }

    /// Delete the document `D` with `id` (no error if it does not exist).
    pub fn delete<D: Document>(&mut self, id: &str) -> Result<(), HandlerError> {
        self.services
            .delete_document(self.index, D::COLLECTION, id)
            .map_err(HandlerError::retry)
    }

    /// The documents `D` whose top-level `field` equals `value`.
    pub fn find<D: Document>(
        &self,
        field: &str,
        value: impl Serialize,
    ) -> Result<Vec<D>, HandlerError> {
        let value = to_json(&value)?;
        let bytes = self
            .services
            .find_documents(D::COLLECTION, field, &value)
            .map_err(HandlerError::retry)?;
        from_json(&bytes, D::COLLECTION)
    }
}

impl Context<'_> {
    /// A JSON document from a collection named at run time (process-manager state).
    pub(crate) fn get_raw<T: DeserializeOwned>(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Option<T>, HandlerError> {
        let found = self
            .services
            .get_document(collection, id)
            .map_err(HandlerError::retry)?;
        found.map(|bytes| from_json(&bytes, collection)).transpose()
    }

    /// Write a JSON document to a collection named at run time.
    pub(crate) fn put_raw<T: Serialize>(
        &mut self,
        collection: &str,
        id: &str,
        value: &T,
    ) -> Result<(), HandlerError> {
        let data = to_json(value)?;
        self.services
            .put_document(self.index, collection, id, &data)
            .map_err(HandlerError::retry)
    }
}

fn to_json(value: &impl Serialize) -> Result<Vec<u8>, HandlerError> {
    serde_json::to_vec(value).map_err(|e| HandlerError::reject(format!("cannot serialize: {e}")))
}

fn from_json<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, HandlerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| HandlerError::reject(format!("cannot decode {what}: {e}")))
}
