//! The ABI adapter of the host services a handler reaches during one batch ([`HostServices`], defined
//! in plugin-api so that the host, the SDK and its test host share one definition).

use protean_plugin_api::abi::{
    loading::{ROption, RResult, RSlice, RStr, RString, RVec, TD_Opaque},
    message_kind, Host, HostRef, Host_TO,
};
use protean_plugin_api::MessageKind;

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
        ffi(self
            .0
            .read_stream(stream.as_str(), from_position)
            .map(RVec::from))
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

    fn schedule(
        &self,
        index: u32,
        key: RStr<'_>,
        due_ms: i64,
        kind: u8,
        stream: RStr<'_>,
        message_type: RStr<'_>,
        data: RSlice<'_, u8>,
    ) -> RResult<(), RString> {
        let kind = match kind {
            message_kind::EVENT => MessageKind::Event,
            message_kind::COMMAND => MessageKind::Command,
            // Only a plugin-api newer than this host sends another kind.
            other => return ffi(Err(format!("a scheduled message of unknown kind {other}; this host schedules events and commands"))),
        };
        ffi(self.0.schedule(
            index,
            key.as_str(),
            due_ms,
            kind,
            stream.as_str(),
            message_type.as_str(),
            data.as_slice(),
        ))
    }

    fn cancel_schedule(&self, index: u32, key: RStr<'_>) -> RResult<(), RString> {
        ffi(self.0.cancel_schedule(index, key.as_str()))
    }

    fn now_ms(&self) -> i64 {
        self.0.now_ms()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use protean_plugin_api::abi::loading::{RResult, RSlice, RStr};

    use super::AbiHost;
    use crate::{
        clock::Clock,
        message::Cause,
        store::MemoryStore,
        unit_of_work::{Buffer, ScheduleWrite, UnitOfWork},
    };

    #[test]
    fn a_plugins_schedules_reach_the_buffer_and_it_reads_the_engines_clock() {
        let store = MemoryStore::default();
        let clock = Clock::simulated(chrono::Utc.timestamp_millis_opt(1_000).unwrap());
        let causes = [Cause::default(); 1];
        let buffer = Buffer::new(&store, &clock, &causes, 1 << 20);
        let view = buffer.view(0);
        let adapter = AbiHost(&view);
        let host = adapter.as_host_ref();
        assert_eq!(host.now_ms(), 1_000);
        let schedule = |kind: u8| {
            host.schedule(
                0,
                RStr::from_str("k"),
                5_000,
                kind,
                RStr::from_str("t::x:command-1"),
                RStr::from_str("T.Do.v1"),
                RSlice::from_slice(b"{}"),
            )
        };
        assert!(schedule(protean_plugin_api::abi::message_kind::COMMAND).is_ok());
        let unknown = schedule(7).into_result().unwrap_err();
        assert!(unknown.contains("unknown kind 7"), "{unknown}");
        assert!(matches!(
            host.cancel_schedule(0, RStr::from_str("k")),
            RResult::ROk(())
        ));
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
        let metadata: serde_json::Value = serde_json::from_str(&message.metadata).unwrap();
        assert_eq!(metadata["domain"]["kind"], "COMMAND");
    }
}
