//! The binary interface between `protean-host` and a domain library.
//!
//! Invariant: everything in this module is `#[repr(C)]` and checked by abi_stable at load time, except
//! [`AbiTag`], which is a plain C static that the host reads *before* abi_stable's checks so that a plugin
//! built against another plugin-api gets a one-line error instead of a layout report.
//!
//! Design rules (see `shared/reference/plugin-abi.md`):
//! - messages cross as bytes (JSON) plus a few borrowed strings, never as abi_stable-typed domain structs, so
//!   domain schemas evolve without touching this module;
//! - handlers are synchronous; the host calls them on a blocking thread, one batch per call;
//! - host services reach the plugin as an FFI-safe trait object ([`Host`]), which only *buffers* what the
//!   handler produces: the host commits it after the call returns;
//! - every exported function catches panics and returns them as errors;
//! - plain structs here can never grow: [`HandlerRegistration::options_json`] is the escape hatch; nor
//!   can the prefix types (the root module and the trait vtables) within a generation, because
//!   abi_stable refuses a library whose prefix types have fewer fields than the host's: new host
//!   services are [`host_call`]s.
//!
//! Authors never use this module; it is public for `protean-host` and for [`crate::export_domains`].
#![allow(
    missing_docs,
    missing_debug_implementations,
    non_local_definitions,
    non_camel_case_types
)]

use abi_stable::{
    declare_root_module_statics,
    library::{CheckTypeLayout, LibHeader, RootModule},
    package_version_strings, sabi_trait,
    sabi_types::{RRef, VersionStrings},
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

pub use abi_stable::library::RootModuleResult;

/// Host-side loading primitives, re-exported so that abi_stable stays a dependency of this crate only.
pub mod loading {
    pub use abi_stable::library::{
        lib_header_from_raw_library, LibHeader, LibraryError, RawLibrary, RootModule,
        RootModuleError,
    };
    pub use abi_stable::sabi_trait::TD_Opaque;
    pub use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec};
}

/// The ABI generation. Bump it together with every 0.y release of plugin-api that changes a layout here.
pub const PROTEAN_ABI: u32 = if cfg!(feature = "__abi_test_next_tag") {
    2
} else {
    1
};

/// The plugin-api version a library was built against (reported in errors).
pub const API_VERSION: &str = if cfg!(feature = "__abi_test_next_tag") {
    "0.2.0-abi-test"
} else {
    env!("CARGO_PKG_VERSION")
};

/// The magic bytes that open every [`AbiTag`].
pub const ABI_TAG_MAGIC: [u8; 8] = *b"PROTEAN\0";

/// The name of the plain static every domain library exports.
pub const ABI_TAG_SYMBOL: &[u8] = b"PROTEAN_ABI_TAG\0";

/// A plain C static the host reads first. Its layout is frozen forever: magic, ABI number, version string.
#[repr(C)]
#[derive(Debug)]
pub struct AbiTag {
    pub magic: [u8; 8],
    pub abi: u32,
    pub api_version: *const u8,
    pub api_version_len: usize,
}

// SAFETY: the tag only points at a `'static` string literal and is never mutated.
unsafe impl Sync for AbiTag {}

impl AbiTag {
    /// The tag of the plugin-api this crate is.
    pub const CURRENT: AbiTag = AbiTag {
        magic: ABI_TAG_MAGIC,
        abi: PROTEAN_ABI,
        api_version: API_VERSION.as_ptr(),
        api_version_len: API_VERSION.len(),
    };

    /// The plugin-api version recorded in the tag, or `"unknown"` when it does not look like one.
    ///
    /// # Safety
    /// `self` must be a tag whose `api_version` points at `api_version_len` readable bytes, which holds for
    /// any library that passed the magic check.
    pub unsafe fn api_version(&self) -> String {
        if self.api_version.is_null() || self.api_version_len > 256 {
            return "unknown".into();
        }
        // SAFETY: bounds checked above; the caller vouches for the pointer.
        let bytes = unsafe { std::slice::from_raw_parts(self.api_version, self.api_version_len) };
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// What kind of handler a registration is. An open set: new kinds are new constants, never a new layout.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HandlerKind(pub u8);

impl HandlerKind {
    pub const EVENT_HANDLER: Self = Self(0);
    pub const COMMAND_HANDLER: Self = Self(1);
    pub const PROJECTOR: Self = Self(2);
    pub const PROCESS_MANAGER: Self = Self(3);
}

/// One handler as the plugin declares it. `options_json` carries everything else (retries, correlation
/// field, ...) as a JSON object, so new options never change this layout.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct HandlerRegistration {
    pub name: RString,
    pub kind: HandlerKind,
    /// Full stream categories, e.g. `fulfilment::order` (command handlers: the aggregate's category).
    pub categories: RVec<RString>,
    /// Full type names (`Fulfilment.OrderPlaced.v1`) this handler handles.
    pub message_types: RVec<RString>,
    pub options_json: RString,
}

/// One message handed to a handler, borrowed from the host for the duration of the call.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct MessageRef<'a> {
    pub id: RStr<'a>,
    pub stream: RStr<'a>,
    pub message_type: RStr<'a>,
    pub position: u64,
    pub global_position: u64,
    /// Always `application/json` today; room for other encodings.
    pub content_type: RStr<'a>,
    /// The message's `data` object.
    pub data: RSlice<'a, u8>,
    /// The message's `metadata` object.
    pub metadata: RSlice<'a, u8>,
}

/// Why a handler failed. `retryable == false` means "dead-letter now".
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct HandlerFailure {
    pub retryable: bool,
    pub message: RString,
}

/// The outcome of one batch: messages `[0, handled)` succeeded; if `failure` is set, message `handled`
/// failed and nothing after it was attempted.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct BatchOutcome {
    pub handled: u32,
    pub failure: ROption<HandlerFailure>,
}

/// Log levels on the wire (same numbering as the `log` crate).
pub mod level {
    pub const ERROR: u8 = 1;
    pub const WARN: u8 = 2;
    pub const INFO: u8 = 3;
    pub const DEBUG: u8 = 4;
    pub const TRACE: u8 = 5;
}

/// Host services available during one batch. Writes are buffered by the host and tagged with the index
/// of the message in the batch that caused them; reads see the writes buffered so far.
#[sabi_trait]
pub trait Host {
    /// Buffer an event for `stream`. `expected_version` is the stream's last position the handler saw
    /// (`-1` for a new stream), or none for "no concurrency check".
    fn raise_event(
        &self,
        index: u32,
        stream: RStr<'_>,
        message_type: RStr<'_>,
        data: RSlice<'_, u8>,
        expected_version: ROption<i64>,
    ) -> RResult<(), RString>;

    /// Buffer a command for its command stream (`{category}:command-{id}`).
    fn send_command(
        &self,
        index: u32,
        stream: RStr<'_>,
        message_type: RStr<'_>,
        data: RSlice<'_, u8>,
    ) -> RResult<(), RString>;

    /// The events of `stream` from `from_position`, as a JSON array of `{"type", "position", "data"}`.
    fn read_stream(&self, stream: RStr<'_>, from_position: u64) -> RResult<RVec<u8>, RString>;

    /// A document as JSON, if it exists.
    fn get_document(
        &self,
        collection: RStr<'_>,
        id: RStr<'_>,
    ) -> RResult<ROption<RVec<u8>>, RString>;

    /// Buffer a document write.
    fn put_document(
        &self,
        index: u32,
        collection: RStr<'_>,
        id: RStr<'_>,
        data: RSlice<'_, u8>,
    ) -> RResult<(), RString>;

    /// Buffer a document delete.
    fn delete_document(
        &self,
        index: u32,
        collection: RStr<'_>,
        id: RStr<'_>,
    ) -> RResult<(), RString>;

    /// Documents whose top-level `field` equals `value_json`, as a JSON array.
    #[sabi(last_prefix_field)]
    fn find_documents(
        &self,
        collection: RStr<'_>,
        field: RStr<'_>,
        value_json: RSlice<'_, u8>,
    ) -> RResult<RVec<u8>, RString>;
}

/// What a host that predates schedules answers to them.
pub const HOST_WITHOUT_SCHEDULES: &str = "this protean-host predates schedules and timeouts, which this domain uses; upgrade protean-host, then replay the dead letter";

/// Now on the system clock, in ms since the Unix epoch (before it: negative).
pub fn system_now_ms() -> i64 {
    let now = std::time::SystemTime::now();
    match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// Host services added within the generation, asked through [`Host::read_stream`].
///
/// abi_stable refuses to load a library whose prefix types (the `Host` vtable among them) have fewer
/// fields than the host's, so a host that grew `Host` could no longer load the domains built before.
/// Newer services therefore travel as a JSON request in the stream name of a read, under
/// [`host_call::STREAM`]: a host that knows the call answers a JSON object (or an error), and an older
/// host reads a stream that does not exist and answers an empty JSON array, with nothing written.
pub mod host_call {
    use std::borrow::Cow;

    use serde::{Deserialize, Serialize};
    use serde_json::value::RawValue;

    /// The stream-name prefix of a host call; the request's JSON follows it.
    pub const STREAM: &str = "$protean:host-call:";

    /// A host call. Externally tagged and with `Cow` strings, so that it decodes from the stream name
    /// whatever its strings hold (an escaped string cannot be borrowed) and its data stays raw.
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Request<'a> {
        /// See `HostServices::schedule`.
        Schedule {
            index: u32,
            #[serde(borrow)]
            key: Cow<'a, str>,
            due_ms: i64,
            /// `event` or `command`.
            #[serde(borrow)]
            kind: Cow<'a, str>,
            #[serde(borrow)]
            stream: Cow<'a, str>,
            #[serde(borrow)]
            message_type: Cow<'a, str>,
            #[serde(borrow)]
            data: &'a RawValue,
        },
        /// See `HostServices::cancel_schedule`.
        CancelSchedule {
            index: u32,
            #[serde(borrow)]
            key: Cow<'a, str>,
        },
        /// See `HostServices::now_ms`.
        NowMs,
        /// See `HostServices::prefetch`.
        Prefetch {
            /// (collection, id) pairs.
            #[serde(borrow)]
            documents: Vec<(Cow<'a, str>, Cow<'a, str>)>,
            #[serde(borrow)]
            streams: Vec<Cow<'a, str>>,
            /// (collection, field, value as JSON) triples. Absent from the requests of plugins built
            /// before it; a host built before it ignores it (a hint, answered by each find alone).
            #[serde(borrow, default, skip_serializing_if = "Vec::is_empty")]
            finds: Vec<(Cow<'a, str>, Cow<'a, str>, Cow<'a, str>)>,
        },
    }

    /// A known call's answer (a refusal comes back as the read's error).
    #[derive(Debug, Default, Serialize, Deserialize)]
    pub struct Answer {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub now_ms: Option<i64>,
    }

    impl Request<'_> {
        /// The stream name that carries the request.
        pub fn stream(&self) -> String {
            let json = serde_json::to_string(self).unwrap_or_default();
            format!("{STREAM}{json}")
        }

        /// The request a stream name carries, if it is a host call (`Some(Err)`: a malformed one).
        pub fn of(stream: &str) -> Option<Result<Request<'_>, String>> {
            let json = stream.strip_prefix(STREAM)?;
            Some(
                serde_json::from_str(json).map_err(|e| format!("a host call that is not one: {e}")),
            )
        }
    }

    #[cfg(test)]
    mod tests {
        use super::{Request, STREAM};

        /// What lets a request grow a member within a generation: a host reads past the members it
        /// does not know (as a host built before `finds` reads a prefetch that has them), and a
        /// member a plugin does not send is empty (a plugin built before `finds` sends none).
        #[test]
        fn a_request_reads_past_members_it_does_not_know_and_empties_those_not_sent() {
            let newer = format!(
                r#"{STREAM}{{"prefetch":{{"documents":[],"streams":["s-1"],"finds":[["c","f","1"]],"later":[1]}}}}"#
            );
            let Some(Ok(Request::Prefetch { streams, finds, .. })) = Request::of(&newer) else {
                panic!("{:?}", Request::of(&newer));
            };
            assert_eq!((streams.len(), finds.len()), (1, 1));
            let older = format!(r#"{STREAM}{{"prefetch":{{"documents":[],"streams":["s-1"]}}}}"#);
            let Some(Ok(Request::Prefetch { finds, .. })) = Request::of(&older) else {
                panic!("{:?}", Request::of(&older));
            };
            assert!(finds.is_empty());
        }
    }
}

/// The per-batch host object as the plugin receives it.
pub type HostRef<'a> = Host_TO<'a, RRef<'a, ()>>;

/// Where the plugin's log lines go. Kept by the plugin for its whole life.
#[sabi_trait]
pub trait HostLog: Send + Sync + 'static {
    #[sabi(last_prefix_field)]
    fn log(&self, level: u8, target: RStr<'_>, message: RStr<'_>);
}

/// The logger object as the plugin receives it.
pub type HostLogBox = HostLog_TO<RBox<()>>;

/// One instantiated domain.
#[sabi_trait]
pub trait DomainInstance: Send + Sync + 'static {
    /// Every handler of the domain.
    fn registrations(&self) -> RVec<HandlerRegistration>;

    /// Handle `batch` with the handler named `handler`, stopping at the first failure.
    fn handle_batch(
        &self,
        handler: RStr<'_>,
        batch: RSlice<'_, MessageRef<'_>>,
        host: HostRef<'_>,
    ) -> BatchOutcome;

    /// The stream a command of `message_type` with `data` is sent to (`{category}:command-{id}`), or why
    /// the data is not such a command.
    fn command_stream(
        &self,
        message_type: RStr<'_>,
        data: RSlice<'_, u8>,
    ) -> RResult<RString, RString>;

    /// Called once when the host stops using the instance.
    #[sabi(last_prefix_field)]
    fn shutdown(&self);
}

/// An instantiated domain as the host holds it.
pub type DomainInstanceBox = DomainInstance_TO<RBox<()>>;

#[cfg(not(feature = "__abi_test_layout"))]
type AbiField = u32;
// A different field type with the same tag: the layout check must catch it.
#[cfg(feature = "__abi_test_layout")]
type AbiField = u64;

/// The root module every domain library exports (through [`crate::export_domains`]).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = ProteanPlugin_Ref)))]
#[sabi(missing_field(panic))]
pub struct ProteanPlugin {
    pub abi: AbiField,
    pub api_version: RStr<'static>,
    /// The names of the domain instances in the library.
    pub instances: extern "C" fn() -> RVec<RString>,
    /// Instantiate one domain. Errors and panics come back as `RErr`.
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(
        name: RStr<'_>,
        config_json: RStr<'_>,
        logger: HostLogBox,
    ) -> RResult<DomainInstanceBox, RString>,
}

impl RootModule for ProteanPlugin_Ref {
    declare_root_module_statics! {ProteanPlugin_Ref}
    const BASE_NAME: &'static str = "protean_domain";
    const NAME: &'static str = "protean domain plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// Builds the root module; used by [`crate::export_domains`].
#[doc(hidden)]
pub fn root_module(
    instances: extern "C" fn() -> RVec<RString>,
    create: extern "C" fn(RStr<'_>, RStr<'_>, HostLogBox) -> RResult<DomainInstanceBox, RString>,
) -> ProteanPlugin_Ref {
    use abi_stable::prefix_type::PrefixTypeTrait;
    ProteanPlugin {
        abi: PROTEAN_ABI as AbiField,
        api_version: RStr::from_str(API_VERSION),
        instances,
        create,
    }
    .leak_into_prefix()
}

/// The erased loader abi_stable calls; used by [`crate::export_domains`].
#[doc(hidden)]
pub fn call_root_loader(root: fn() -> ProteanPlugin_Ref) -> RootModuleResult {
    abi_stable::library::__call_root_module_loader(root)
}

/// The library header abi_stable looks up; used by [`crate::export_domains`].
#[doc(hidden)]
pub const fn lib_header(loader: extern "C" fn() -> RootModuleResult) -> LibHeader {
    // SAFETY: `loader` is generated by `export_domains!` from `call_root_loader`, so it returns the root
    // module of type `ProteanPlugin_Ref`, which is what `from_constructor` requires.
    unsafe { LibHeader::from_constructor::<ProteanPlugin_Ref>(loader, CheckTypeLayout::Yes) }
}
