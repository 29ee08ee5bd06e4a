//! The ABI adapter of the host services a handler reaches during one batch ([`HostServices`], defined
//! in plugin-api so that the host, the SDK and its test host share one definition). Services newer
//! than the ABI's `Host` vtable arrive as host calls inside a stream read ([`protean_plugin_api::abi::host_call`]).

use protean_plugin_api::abi::{
    host_call::{Answer, Request},
    loading::{ROption, RResult, RSlice, RStr, RString, RVec, TD_Opaque},
    Host, HostRef, Host_TO,
};
use protean_plugin_api::{MessageKind, ScheduledMessage};

pub use protean_plugin_api::HostServices;

/// The FFI-safe face of the engine's services. `&dyn HostServices` is a fat pointer and abi_stable needs
/// a thin one, so the caller keeps this adapter in its frame and lends it out as a [`HostRef`].
#[repr(transparent)]
pub(super) struct AbiHost<'a>(pub(super) &'a dyn HostServices);

impl<'a> AbiHost<'a> {
    pub(super) fn as_host_ref(&'a self) -> HostRef<'a> {
        Host_TO::from_ptr(self, TD_Opaque)
    }
}

fn ffi<T>(result: Result<T, String>) -> RResult<T, RString> {
    result.map_err(RString::from).into()
}

impl Host for AbiHost<'_> {
    fn raise_event(
        &self,
        index: u32,
        stream: RStr<'_>,
        message_type: RStr<'_>,
        data: RSlice<'_, u8>,
        expected_version: ROption<i64>,
    ) -> RResult<(), RString> {
        ffi(self.0.raise_event(
            index,
            stream.as_str(),
            message_type.as_str(),
            data.as_slice(),
            expected_version.into_option(),
        ))
    }

    fn send_command(
        &self,
        index: u32,
        stream: RStr<'_>,
        message_type: RStr<'_>,
        data: RSlice<'_, u8>,
    ) -> RResult<(), RString> {
        ffi(self.0.send_command(
            index,
            stream.as_str(),
            message_type.as_str(),
            data.as_slice(),
        ))
    }

    fn read_stream(&self, stream: RStr<'_>, from_position: u64) -> RResult<RVec<u8>, RString> {
        let answer = match Request::of(stream.as_str()) {
            Some(call) => call.and_then(|request| answer(self.0, request)),
            None => self.0.read_stream(stream.as_str(), from_position),
        };
        ffi(answer.map(RVec::from))
    }

    fn get_document(
        &self,
        collection: RStr<'_>,
        id: RStr<'_>,
    ) -> RResult<ROption<RVec<u8>>, RString> {
        ffi(self
            .0
            .get_document(collection.as_str(), id.as_str())
            .map(|d| d.map(RVec::from).into()))
    }

    fn put_document(
        &self,
        index: u32,
        collection: RStr<'_>,
        id: RStr<'_>,
        data: RSlice<'_, u8>,
    ) -> RResult<(), RString> {
        ffi(self
            .0
            .put_document(index, collection.as_str(), id.as_str(), data.as_slice()))
    }

    fn delete_document(
        &self,
        index: u32,
        collection: RStr<'_>,
        id: RStr<'_>,
    ) -> RResult<(), RString> {
        ffi(self
            .0
            .delete_document(index, collection.as_str(), id.as_str()))
    }

    fn find_documents(
        &self,
        collection: RStr<'_>,
        field: RStr<'_>,
        value_json: RSlice<'_, u8>,
    ) -> RResult<RVec<u8>, RString> {
        ffi(self
            .0
            .find_documents(collection.as_str(), field.as_str(), value_json.as_slice())
            .map(RVec::from))
    }
}

/// Answer a host call ([`protean_plugin_api::abi::host_call`]) with the services.
fn answer(services: &dyn HostServices, request: Request<'_>) -> Result<Vec<u8>, String> {
    let answer = match request {
        Request::Schedule {
            index,
            key,
            due_ms,
            kind,
            stream,
            message_type,
            data,
        } => {
            let kind = match &*kind {
                "event" => MessageKind::Event,
                "command" => MessageKind::Command,
                // Only a plugin-api newer than this host sends another kind.
                other => {
                    return Err(format!(
                        "a scheduled message of kind {other:?}; this host schedules events and commands"
                    ))
                }
            };
            let data = data.get().as_bytes();
            let scheduled = ScheduledMessage {
                key: &key,
                due_ms,
                kind,
                stream: &stream,
                message_type: &message_type,
                data,
            };
            services.schedule(index, scheduled)?;
            Answer::default()
        }
        Request::CancelSchedule { index, key } => {
            services.cancel_schedule(index, &key)?;
            Answer::default()
        }
        Request::NowMs => Answer {
            now_ms: Some(services.now_ms()),
        },
        Request::Prefetch {
            documents,
            streams,
            finds,
        } => {
            let documents: Vec<(&str, &str)> =
                documents.iter().map(|(c, i)| (&**c, &**i)).collect();
            let streams: Vec<&str> = streams.iter().map(|s| &**s).collect();
            let finds: Vec<(&str, &str, &str)> =
                finds.iter().map(|(c, f, v)| (&**c, &**f, &**v)).collect();
            services.prefetch(&documents, &streams, &finds);
            Answer::default()
        }
    };
    serde_json::to_vec(&answer).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use protean_plugin_api::abi::{
        host_call::Request,
        loading::{RResult, RSlice, RStr, RString, RVec},
    };
    use serde_json::value::RawValue;

    use super::AbiHost;
    use crate::{
        clock::Clock,
        message::Cause,
        store::{MemoryStore, Store},
        unit_of_work::{Buffer, DocumentWrite, ScheduleWrite, UnitOfWork},
    };

    fn text(answer: RResult<RVec<u8>, RString>) -> Result<String, String> {
        answer
            .into_result()
            .map(|bytes| String::from_utf8(bytes.into_vec()).unwrap())
            .map_err(RString::into_string)
    }

    #[test]
    fn host_calls_in_a_stream_read_reach_the_buffer_and_read_the_engines_clock() {
        let store = MemoryStore::default();
        let clock = Clock::simulated(chrono::Utc.timestamp_millis_opt(1_000).unwrap());
        let causes = [Cause::default(); 1];
        let buffer = Buffer::new(&store, &clock, &causes, 1 << 20);
        let view = buffer.view(0);
        let adapter = AbiHost(&view);
        let host = adapter.as_host_ref();
        let call =
            |request: Request<'_>| text(host.read_stream(RStr::from_str(&request.stream()), 0));
        assert_eq!(call(Request::NowMs).unwrap(), r#"{"now_ms":1000}"#);
        let data: &RawValue = serde_json::from_str("{}").unwrap();
        let schedule = |kind: &'static str| {
            call(Request::Schedule {
                index: 0,
                key: "k".into(),
                due_ms: 5_000,
                kind: kind.into(),
                stream: "t::x:command-1".into(),
                message_type: "T.Do.v1".into(),
                data,
            })
        };
        assert_eq!(schedule("command").unwrap(), "{}");
        let unknown = schedule("query").unwrap_err();
        assert!(unknown.contains(r#"of kind "query""#), "{unknown}");
        let refused = call(Request::CancelSchedule {
            index: 0,
            key: "".into(),
        })
        .unwrap_err();
        assert!(
            refused.contains("key is empty"),
            "the buffer's refusal: {refused}"
        );
        assert_eq!(
            call(Request::CancelSchedule {
                index: 0,
                key: "k \"quoted\"".into(),
            })
            .unwrap(),
            "{}"
        );
        let garbled = text(host.read_stream(RStr::from_str("$protean:host-call:{nope"), 0));
        assert!(garbled
            .unwrap_err()
            .starts_with("a host call that is not one"));
        assert_eq!(
            text(host.read_stream(RStr::from_str("t::x-1"), 0)).unwrap(),
            "[]",
            "other streams are read as ever"
        );
        let mut unit = UnitOfWork::default();
        buffer.drain_into(&mut unit);
        let [ScheduleWrite::Set {
            key,
            due_ms,
            message,
        }, ScheduleWrite::Cancel { at_ms, .. }] = unit.schedules.as_slice()
        else {
            panic!("a set then a cancel: {:?}", unit.schedules);
        };
        assert_eq!((key.as_str(), *due_ms, *at_ms), ("k", 5_000, 1_000));
        let [_, ScheduleWrite::Cancel { key, .. }] = unit.schedules.as_slice() else {
            unreachable!("matched above");
        };
        assert_eq!(key, r#"k "quoted""#, "an escaped key arrives whole");
        let metadata: serde_json::Value = serde_json::from_str(&message.metadata).unwrap();
        assert_eq!(metadata["domain"]["kind"], "COMMAND");
    }

    /// A prefetch's finds reach the buffer through the ABI, which then answers the find as the store
    /// stood; a prefetch of a plugin built before finds (no such member) is answered as ever.
    #[test]
    fn finds_announced_through_the_abi_are_made_ahead_and_older_prefetches_still_parse() {
        let store = MemoryStore::default();
        let put = |id: &str| UnitOfWork {
            documents: vec![DocumentWrite::Put {
                collection: "docs".into(),
                id: id.into(),
                data: format!(r#"{{"id":"{id}","order_id":"o1"}}"#),
                expected: None,
            }],
            ..UnitOfWork::default()
        };
        store.commit(&put("a")).unwrap();
        let causes = [Cause::default(); 1];
        let buffer = Buffer::new(&store, &crate::clock::SYSTEM, &causes, 1 << 20);
        let view = buffer.view(0);
        let adapter = AbiHost(&view);
        let host = adapter.as_host_ref();
        let call =
            |request: Request<'_>| text(host.read_stream(RStr::from_str(&request.stream()), 0));
        let older = Request::Prefetch {
            documents: vec![("docs".into(), "a".into())],
            streams: vec![],
            finds: vec![],
        };
        assert!(
            !older.stream().contains("finds"),
            "the request of an older plugin: {}",
            older.stream()
        );
        assert_eq!(call(older).unwrap(), "{}");
        let finds = Request::Prefetch {
            documents: vec![],
            streams: vec![],
            finds: vec![("docs".into(), "order_id".into(), r#""o1""#.into())],
        };
        assert_eq!(call(finds).unwrap(), "{}");
        store.commit(&put("b")).unwrap();
        let found = host.find_documents(
            RStr::from_str("docs"),
            RStr::from_str("order_id"),
            RSlice::from_slice(br#""o1""#),
        );
        assert_eq!(
            text(found).unwrap(),
            r#"[{"id":"a","order_id":"o1"}]"#,
            "found ahead, before b was written"
        );
    }
}
