//! The plugin side of the ABI: [`crate::export_domains`] and the adapter that turns a [`Domain`] into an
//! ABI [`DomainInstance`](crate::abi::DomainInstance).
//!
//! Invariant: no panic leaves this module; every entry point runs under `crate::panic::catch`.

use std::sync::OnceLock;

use serde_json::value::RawValue;

use crate::{
    abi::{
        host_call::{Answer, Request},
        loading::{RResult, RSlice, RStr, RString, RVec, TD_Opaque},
        BatchOutcome, DomainInstance, DomainInstanceBox, DomainInstance_TO, HandlerFailure,
        HandlerRegistration, HostLogBox, HostRef, MessageRef,
    },
    context::{HostServices, MessageInfo, MessageKind, ScheduledMessage},
    domain::Domain,
    panic,
};

/// `instances()` of the root module.
#[doc(hidden)]
pub fn instances(names: &[&str]) -> RVec<RString> {
    panic::catch(|| names.iter().map(|name| RString::from(*name)).collect()).unwrap_or_default()
}

/// Options the host passes to a new instance.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct CreateOptions {
    /// The most verbose level the host wants forwarded (1 = error ... 5 = trace).
    log_level: Option<u8>,
}

/// An instance name and the function that builds its domain.
#[doc(hidden)]
pub type Constructor = (&'static str, fn() -> Domain);

/// `create()` of the root module: find the instance, build it, check it, wrap it.
#[doc(hidden)]
pub fn create(
    constructors: &[Constructor],
    name: RStr<'_>,
    config_json: RStr<'_>,
    logger: HostLogBox,
) -> RResult<DomainInstanceBox, RString> {
    let outcome = panic::catch(|| {
        let options: CreateOptions = serde_json::from_str(config_json.as_str()).unwrap_or_default();
        install_logger(logger, options.log_level.unwrap_or(3));
        let Some((_, constructor)) = constructors.iter().find(|(n, _)| *n == name.as_str()) else {
            return Err(format!(
                "the library has no domain instance {:?}",
                name.as_str()
            ));
        };
        let domain = constructor();
        if let Some(problem) = domain.errors().first() {
            return Err(format!("domain {:?} is invalid: {problem}", name.as_str()));
        }
        Ok(DomainInstance_TO::from_value(
            Instance { domain },
            TD_Opaque,
        ))
    });
    match outcome {
        Ok(Ok(instance)) => RResult::ROk(instance),
        Ok(Err(message)) => RResult::RErr(message.into()),
        Err(panic) => RResult::RErr(format!("the domain constructor panicked: {panic}").into()),
    }
}

struct Instance {
    domain: Domain,
}

impl DomainInstance for Instance {
    fn registrations(&self) -> RVec<HandlerRegistration> {
        panic::catch(|| {
            self.domain
                .registrations()
                .into_iter()
                .map(to_abi)
                .collect()
        })
        .unwrap_or_default()
    }

    fn handle_batch(
        &self,
        handler: RStr<'_>,
        batch: RSlice<'_, MessageRef<'_>>,
        host: HostRef<'_>,
    ) -> BatchOutcome {
        let services = AbiServices(host);
        let messages: Vec<(MessageInfo<'_>, &[u8])> = batch.iter().map(view).collect();
        let outcome = panic::catch(|| {
            self.domain
                .handle_batch(handler.as_str(), &messages, &services)
        });
        let (handled, error) = outcome.unwrap_or_else(|panic| {
            (
                0,
                Some(crate::HandlerError::retry(format!(
                    "handler panicked: {panic}"
                ))),
            )
        });
        BatchOutcome {
            handled,
            failure: error
                .map(|e| HandlerFailure {
                    retryable: e.is_retryable(),
                    message: e.message().into(),
                })
                .into(),
        }
    }

    fn command_stream(
        &self,
        message_type: RStr<'_>,
        data: RSlice<'_, u8>,
    ) -> RResult<RString, RString> {
        let stream = panic::catch(|| {
            self.domain
                .command_stream(message_type.as_str(), data.as_slice())
        })
        .unwrap_or_else(|panic| Err(crate::HandlerError::reject(format!("panicked: {panic}"))));
        match stream {
            Ok(stream) => RResult::ROk(stream.into()),
            Err(error) => RResult::RErr(error.message().into()),
        }
    }

    fn shutdown(&self) {}
}

fn view<'a>(message: &'a MessageRef<'a>) -> (MessageInfo<'a>, &'a [u8]) {
    let info = MessageInfo {
        id: message.id.as_str(),
        stream: message.stream.as_str(),
        message_type: message.message_type.as_str(),
        position: message.position,
        global_position: message.global_position,
        metadata: message.metadata.as_slice(),
    };
    (info, message.data.as_slice())
}

fn to_abi(registration: crate::Registration) -> HandlerRegistration {
    HandlerRegistration {
        name: registration.name.into(),
        kind: registration.kind,
        categories: registration
            .categories
            .into_iter()
            .map(RString::from)
            .collect(),
        message_types: registration
            .message_types
            .into_iter()
            .map(RString::from)
            .collect(),
        options_json: serde_json::to_string(&registration.options)
            .unwrap_or_default()
            .into(),
    }
}

/// The ABI host object seen as the plain-Rust [`HostServices`] a [`crate::Context`] uses.
struct AbiServices<'a>(HostRef<'a>);

fn plain<T>(result: RResult<T, RString>) -> Result<T, String> {
    result.into_result().map_err(RString::into_string)
}

impl HostServices for AbiServices<'_> {
    fn raise_event(
        &self,
        index: u32,
        stream: &str,
        message_type: &str,
        data: &[u8],
        expected_version: Option<i64>,
    ) -> Result<(), String> {
        plain(self.0.raise_event(
            index,
            stream.into(),
            message_type.into(),
            data.into(),
            expected_version.into(),
        ))
    }

    fn send_command(
        &self,
        index: u32,
        stream: &str,
        message_type: &str,
        data: &[u8],
    ) -> Result<(), String> {
        plain(
            self.0
                .send_command(index, stream.into(), message_type.into(), data.into()),
        )
    }

    fn read_stream(&self, stream: &str, from_position: u64) -> Result<Vec<u8>, String> {
        plain(self.0.read_stream(stream.into(), from_position)).map(RVec::into_vec)
    }

    fn get_document(&self, collection: &str, id: &str) -> Result<Option<Vec<u8>>, String> {
        plain(self.0.get_document(collection.into(), id.into()))
            .map(|found| found.into_option().map(RVec::into_vec))
    }

    fn put_document(
        &self,
        index: u32,
        collection: &str,
        id: &str,
        data: &[u8],
    ) -> Result<(), String> {
        plain(
            self.0
                .put_document(index, collection.into(), id.into(), data.into()),
        )
    }

    fn delete_document(&self, index: u32, collection: &str, id: &str) -> Result<(), String> {
        plain(self.0.delete_document(index, collection.into(), id.into()))
    }

    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value_json: &[u8],
    ) -> Result<Vec<u8>, String> {
        plain(
            self.0
                .find_documents(collection.into(), field.into(), value_json.into()),
        )
        .map(RVec::into_vec)
    }

    fn schedule(&self, index: u32, scheduled: ScheduledMessage<'_>) -> Result<(), String> {
        let ScheduledMessage {
            key,
            due_ms,
            kind,
            stream,
            message_type,
            data,
        } = scheduled;
        let data = std::str::from_utf8(data)
            .ok()
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
            .ok_or_else(|| format!("{message_type} data is not JSON"))?;
        let kind = match kind {
            MessageKind::Event => "event",
            MessageKind::Command => "command",
        };
        self.call(&Request::Schedule {
            index,
            key: key.into(),
            due_ms,
            kind: kind.into(),
            stream: stream.into(),
            message_type: message_type.into(),
            data,
        })
        .map(drop)
    }

    fn cancel_schedule(&self, index: u32, key: &str) -> Result<(), String> {
        let key = key.into();
        self.call(&Request::CancelSchedule { index, key }).map(drop)
    }

    fn prefetch(&self, documents: &[(&str, &str)], streams: &[&str], finds: &[(&str, &str, &str)]) {
        let documents = documents
            .iter()
            .map(|&(collection, id)| (collection.into(), id.into()))
            .collect();
        let streams = streams.iter().map(|&s| s.into()).collect();
        let finds = finds
            .iter()
            .map(|&(collection, field, value)| (collection.into(), field.into(), value.into()))
            .collect();
        // Only a hint: a host that predates it, or fails it, answers each read as it comes.
        let _ = self.call(&Request::Prefetch {
            documents,
            streams,
            finds,
        });
    }

    fn now_ms(&self) -> i64 {
        // A host without a clock of its own, or that cannot answer now, goes by the system clock.
        match self.call(&Request::NowMs) {
            Ok(Answer {
                now_ms: Some(now_ms),
            }) => now_ms,
            _ => crate::abi::system_now_ms(),
        }
    }
}

impl AbiServices<'_> {
    /// Ask the host a call newer than the `Host` vtable ([`crate::abi::host_call`]).
    fn call(&self, request: &Request<'_>) -> Result<Answer, String> {
        let answer = plain(self.0.read_stream(request.stream().as_str().into(), 0))?;
        // A host that predates the call read a stream that does not exist: an array (of nothing).
        if answer.first() == Some(&b'[') {
            return Err(crate::abi::HOST_WITHOUT_SCHEDULES.into());
        }
        serde_json::from_slice(&answer)
            .map_err(|e| format!("the host answered a host call with something else: {e}"))
    }
}

/// Forwards the `log` crate's records to the host, so `log::info!` in a handler lands in the host's logs.
struct HostLogger(HostLogBox);

impl log::Log for HostLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        self.0.log(
            record.level() as u8,
            record.target().into(),
            message.as_str().into(),
        );
    }

    fn flush(&self) {}
}

/// Install the host's logger as this library's `log` logger (once per loaded image: each generation of a
/// reloaded library has fresh statics, so each gets its own).
fn install_logger(logger: HostLogBox, level: u8) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let max = match level {
            0 => log::LevelFilter::Off,
            1 => log::LevelFilter::Error,
            2 => log::LevelFilter::Warn,
            3 => log::LevelFilter::Info,
            4 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        };
        if log::set_boxed_logger(Box::new(HostLogger(logger))).is_ok() {
            log::set_max_level(max);
        }
    });
}

/// Export the domains of this library to `protean-host`. Use it exactly once, in the `cdylib` crate:
///
/// ```text
/// protean_plugin_api::export_domains! {
///     "domain" => fulfilment,     // fn fulfilment() -> Domain
///     "reporting" => reporting,
/// }
/// ```
///
/// The names are the instances a user picks with `--domain=lib.so:NAME`; without one the host takes
/// `domain`, then `subdomain`, then the only instance.
#[macro_export]
macro_rules! export_domains {
    ($($name:literal => $constructor:expr),+ $(,)?) => {
        // An anonymous const, not a module, so the constructors resolve where the macro is written
        // (also inside a function body, as in a doctest).
        #[allow(non_upper_case_globals, unsafe_code)]
        const _: () = {
            use $crate::abi::loading::{RResult, RStr, RString, RVec};

            /// Read by the host before anything else, to report a plugin-api mismatch in one line.
            #[no_mangle]
            pub static PROTEAN_ABI_TAG: $crate::abi::AbiTag = $crate::abi::AbiTag::CURRENT;

            extern "C" fn instances() -> RVec<RString> {
                $crate::export::instances(&[$($name),+])
            }

            extern "C" fn create(
                name: RStr<'_>,
                config_json: RStr<'_>,
                logger: $crate::abi::HostLogBox,
            ) -> RResult<$crate::abi::DomainInstanceBox, RString> {
                $crate::export::create(
                    &[$(($name, $constructor as fn() -> $crate::Domain)),+],
                    name,
                    config_json,
                    logger,
                )
            }

            fn root() -> $crate::abi::ProteanPlugin_Ref {
                $crate::abi::root_module(instances, create)
            }

            extern "C" fn loader() -> $crate::abi::RootModuleResult {
                $crate::abi::call_root_loader(root)
            }

            /// abi_stable's entry point (the name its loader looks up).
            #[no_mangle]
            pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::abi::loading::LibHeader =
                $crate::abi::lib_header(loader);
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{abi::loading::ROption, context::Context, message::Naming};

    /// A host as built before schedules: a host call is a read of a stream it does not have.
    struct OlderHost;

    impl crate::abi::Host for OlderHost {
        fn raise_event(
            &self,
            _: u32,
            _: RStr<'_>,
            _: RStr<'_>,
            _: RSlice<'_, u8>,
            _: ROption<i64>,
        ) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn send_command(
            &self,
            _: u32,
            _: RStr<'_>,
            _: RStr<'_>,
            _: RSlice<'_, u8>,
        ) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn read_stream(&self, _: RStr<'_>, _: u64) -> RResult<RVec<u8>, RString> {
            RResult::ROk(b"[]".to_vec().into())
        }
        fn get_document(&self, _: RStr<'_>, _: RStr<'_>) -> RResult<ROption<RVec<u8>>, RString> {
            RResult::ROk(ROption::RNone)
        }
        fn put_document(
            &self,
            _: u32,
            _: RStr<'_>,
            _: RStr<'_>,
            _: RSlice<'_, u8>,
        ) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn delete_document(&self, _: u32, _: RStr<'_>, _: RStr<'_>) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn find_documents(
            &self,
            _: RStr<'_>,
            _: RStr<'_>,
            _: RSlice<'_, u8>,
        ) -> RResult<RVec<u8>, RString> {
            RResult::ROk(b"[]".to_vec().into())
        }
    }

    #[test]
    fn a_host_without_schedules_fails_a_schedule_for_good_and_tells_the_system_time() {
        let older = OlderHost;
        let services = AbiServices(crate::abi::Host_TO::from_ptr(&older, TD_Opaque));
        let naming = Naming::new("Shop");
        let info = MessageInfo {
            id: "m1",
            stream: "shop::order-1",
            message_type: "Shop.Placed.v1",
            position: 0,
            global_position: 0,
            metadata: b"{}",
        };
        let mut ctx = Context::new(&services, &naming, 0, info);
        let error = ctx.cancel("k").unwrap_err();
        assert!(!error.is_retryable(), "no retry makes an old host new");
        assert_eq!(error.message(), crate::abi::HOST_WITHOUT_SCHEDULES);
        let message = ScheduledMessage {
            key: "k",
            due_ms: 0,
            kind: MessageKind::Event,
            stream: "s-1",
            message_type: "T.A.v1",
            data: b"{}",
        };
        let scheduled = services.schedule(0, message);
        assert_eq!(scheduled.unwrap_err(), crate::abi::HOST_WITHOUT_SCHEDULES);
        let before = crate::abi::system_now_ms();
        let now = ctx.now();
        let after = crate::abi::system_now_ms();
        let now_ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((before..=after).contains(&now_ms), "the system clock");
    }
}
