//! The host services a handler reaches during one batch, and their ABI adapter.

use protean_plugin_api::abi::{
    loading::{ROption, RResult, RSlice, RStr, RString, RVec, TD_Opaque},
    Host, HostRef, Host_TO,
};

/// What the engine provides to a handler during one batch. Writes are buffered and tagged with the index
/// of the message in the batch that made them; reads see what is buffered so far.
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
    /// Buffer a command.
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
    /// Documents whose `field` equals `value_json`, as a JSON array.
    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value_json: &[u8],
    ) -> Result<Vec<u8>, String>;
}

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
}
