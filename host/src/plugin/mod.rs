//! Loading domain libraries and calling their handlers through the ABI.
//!
//! Invariants:
//! - every load goes through a private copy of the library, and no library is ever unloaded (a Rust
//!   `cdylib` cannot be unloaded safely; a same-path reload would return the old image);
//! - the ABI tag is read before abi_stable's checks, so a plugin built against another plugin-api gets a
//!   one-line error;
//! - the binary maps a build only after a child process loaded the same private copy and constructed
//!   its instances without dying or hanging ([`probe`]); `Library::load` without a probe is for
//!   programs that embed the engine and cannot run the binary;
//! - abi_stable types never leave this module: the engine sees a domain as `Handlers` (which
//!   [`Plugin`] implements), with [`Delivery`] and [`Outcome`];
//! - a [`Plugin`] runs in this process or, isolated ([`isolated`]), in worker processes behind the same
//!   calls; an isolated domain is never mapped into this process (its first worker is what stands for
//!   the probe there: a build that dies or hangs while it starts fails that worker, not this process).
#![allow(unsafe_code)]

mod elf;
mod handlers;
pub mod isolated;
mod private;
pub mod probe;
#[cfg(test)]
pub(crate) mod scripted;
mod services;
pub mod trust;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use protean_plugin_api::{
    abi::{
        loading::{
            lib_header_from_raw_library, LibraryError, RStr, RawLibrary, RootModuleError, TD_Opaque,
        },
        AbiTag, DomainInstanceBox, HandlerKind, HostLog, HostLog_TO, MessageRef, ProteanPlugin_Ref,
        ABI_TAG_MAGIC, ABI_TAG_SYMBOL, API_VERSION, PROTEAN_ABI,
    },
    HandlerOptions,
};

pub use handlers::CommandStreamError;
pub(crate) use handlers::Handlers;
pub use probe::{Instances, Probe, ProbeError};
pub use services::HostServices;

/// Why a domain library could not be loaded or instantiated. Each message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("domain library not found: {}; build it (cargo build) or fix the --domain path", .0.display())]
    Missing(PathBuf),
    #[error("cannot read domain library {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open {} as a shared library: {reason}; pass the path of a domain cdylib (lib<name>.so)", path.display())]
    Open { path: PathBuf, reason: String },
    #[error("{} is not a whole shared library: {reason}; wait for the build to finish, or rebuild it", path.display())]
    Truncated { path: PathBuf, reason: String },
    #[error("{} is not a protean domain plugin (it exports no PROTEAN_ABI_TAG); build a cdylib that calls protean_plugin_api::export_domains!", .0.display())]
    NotAPlugin(PathBuf),
    #[error("{} was built against plugin-api {plugin_version} (ABI {plugin_abi}), but this host speaks ABI {PROTEAN_ABI} (plugin-api {API_VERSION}); rebuild the plugin against plugin-api {API_VERSION}", path.display())]
    AbiMismatch {
        path: PathBuf,
        plugin_version: String,
        plugin_abi: u32,
    },
    #[error("{} has the right ABI tag but its plugin-api type layouts differ from this host's; rebuild the plugin against plugin-api {API_VERSION} (--debug shows the full report)", .0.display())]
    Layout(PathBuf),
    #[error("{}: {reason}; rebuild the plugin against plugin-api {API_VERSION}", path.display())]
    Incompatible { path: PathBuf, reason: String },
    #[error("the root module of {} failed to load: {reason}", path.display())]
    RootModule { path: PathBuf, reason: String },
    #[error("{} has no domain instance {wanted:?}; available: {}; choose one with --domain={}:NAME", path.display(), available.join(", "), path.display())]
    UnknownInstance {
        path: PathBuf,
        wanted: String,
        available: Vec<String>,
    },
    #[error("{} declares several domain instances ({}) and none is named domain or subdomain; choose one with --domain={}:NAME", path.display(), available.join(", "), path.display())]
    AmbiguousInstance {
        path: PathBuf,
        available: Vec<String>,
    },
    #[error("{} declares no domain instances; call export_domains! with at least one", .0.display())]
    NoInstances(PathBuf),
    #[error("domain instance {instance:?} of {} failed to start: {reason}", path.display())]
    Constructor {
        path: PathBuf,
        instance: String,
        reason: String,
    },
    #[error("cannot make a private directory for the library copy in {}: {reason}", dir.display())]
    PrivateDir { dir: PathBuf, reason: String },
    #[error("cannot copy {} to {}: {source}", from.display(), to.display())]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// A worker process could not load the domain; its own one-line reason.
    #[error("{0}")]
    InWorker(String),
    #[error("the worker process for {} failed: {reason}", path.display())]
    Worker { path: PathBuf, reason: String },
}

/// A loaded domain library (one generation). Never unloaded.
pub struct Library {
    path: PathBuf,
    build_id: String,
    module: ProteanPlugin_Ref,
    probed_in: Option<Duration>,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("build_id", &self.build_id)
            .finish()
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("build_id", &self.build_id)
            .finish()
    }
}

/// Counts private copies within this process, so every copy has a fresh name.
static COPIES: AtomicU64 = AtomicU64::new(0);

/// Counts the library images this process mapped (a refused build maps none).
static MAPPED: AtomicU64 = AtomicU64::new(0);

/// How many library images this process has loaded; none is ever unloaded, so all stay mapped.
pub fn generations_loaded() -> u64 {
    MAPPED.load(std::sync::atomic::Ordering::Relaxed)
}

impl Library {
    /// Load the library at `path` through a private copy, checking its ABI tag, then its layouts. Its
    /// code runs in this process: a build that aborts takes the process with it ([`Self::load_probed`]
    /// does not).
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::load_bytes(path, &read(path)?)
    }

    /// [`Self::load`], after a child process loaded the same bytes and constructed `instances` without
    /// dying or hanging ([`probe`]).
    pub fn load_probed(
        path: &Path,
        probe: &Probe,
        instances: Instances<'_>,
    ) -> Result<Self, LoadError> {
        Self::load_bytes_probed(path, &read(path)?, probe, instances)
    }

    /// Load `bytes`, the content of the library at `path` (read once by a caller that already
    /// needed them).
    pub fn load_bytes(path: &Path, bytes: &[u8]) -> Result<Self, LoadError> {
        Self::load_private(path, bytes, None)
    }

    /// [`Self::load_bytes`], probed first like [`Self::load_probed`].
    pub fn load_bytes_probed(
        path: &Path,
        bytes: &[u8],
        probe: &Probe,
        instances: Instances<'_>,
    ) -> Result<Self, LoadError> {
        Self::load_private(path, bytes, Some((probe, instances)))
    }

    fn load_private(
        path: &Path,
        bytes: &[u8],
        probe: Option<(&Probe, Instances<'_>)>,
    ) -> Result<Self, LoadError> {
        let number = COPIES.fetch_add(1, Ordering::Relaxed);
        let (copy, build_id) = private_copy(path, bytes, &number.to_string())?;
        // The probe loads this very file, so what it vouches for is what is mapped below.
        let probed_in = match probe {
            Some((probe, instances)) => {
                let started = Instant::now();
                probe.check(&copy.path, path, &build_id, instances)?;
                Some(started.elapsed())
            }
            None => None,
        };
        let module = open(path, &copy.path)?;
        // The mapping keeps the image alive: the copy and its directory go now.
        drop(copy);
        Ok(Self {
            path: path.into(),
            build_id,
            module,
            probed_in,
        })
    }

    /// The probe process's load ([`probe::child`]): `file` is the host's private copy of the library
    /// `named`, and the process is new, so it is mapped where it is.
    fn open_in_place(named: &Path, file: &Path) -> Result<Self, LoadError> {
        let bytes = fs::read(file).map_err(|source| LoadError::Read {
            path: named.into(),
            source,
        })?;
        if let Some(reason) = elf::truncated(&bytes) {
            return Err(LoadError::Truncated {
                path: named.into(),
                reason,
            });
        }
        let module = open(named, file)?;
        Ok(Self {
            path: named.into(),
            build_id: build_id(&bytes),
            module,
            probed_in: None,
        })
    }

    /// How long the probe of this build took, if it was probed.
    pub fn probed_in(&self) -> Option<Duration> {
        self.probed_in
    }

    /// Load the private copy `copy` of the library at `path`, made (and hashed to `build_id`) by the
    /// host process that started this worker process.
    pub(crate) fn load_copy(path: &Path, copy: &Path, build_id: &str) -> Result<Self, LoadError> {
        Ok(Self {
            path: path.into(),
            build_id: build_id.into(),
            module: open(path, copy)?,
            probed_in: None,
        })
    }

    /// The path the library was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A hash of the library's content: which build this is.
    pub fn build_id(&self) -> &str {
        &self.build_id
    }

    /// The names of the domain instances the library exports.
    pub fn instances(&self) -> Vec<String> {
        (self.module.instances())()
            .into_iter()
            .map(|name| name.into_string())
            .collect()
    }

    /// Choose an instance: the one `wanted`; else `domain`, `subdomain`, or the only one.
    pub fn select(&self, wanted: Option<&str>) -> Result<String, LoadError> {
        let available = self.instances();
        let path = self.path.clone();
        if let Some(wanted) = wanted {
            return available
                .iter()
                .find(|name| *name == wanted)
                .cloned()
                .ok_or_else(|| LoadError::UnknownInstance {
                    path,
                    wanted: wanted.into(),
                    available,
                });
        }
        if let Some(name) = ["domain", "subdomain"]
            .iter()
            .find(|n| available.iter().any(|a| a == *n))
        {
            return Ok((*name).to_owned());
        }
        match available.as_slice() {
            [] => Err(LoadError::NoInstances(path)),
            [only] => Ok(only.clone()),
            _ => Err(LoadError::AmbiguousInstance { path, available }),
        }
    }

    /// Instantiate the domain instance `name`.
    pub fn instantiate(&self, name: &str, log_level: u8) -> Result<Plugin, LoadError> {
        self.instantiate_logging_to(name, log_level, None)
    }

    /// Instantiate the domain instance `name`, its log lines going to `sink` (else to `tracing`).
    pub(crate) fn instantiate_logging_to(
        &self,
        name: &str,
        log_level: u8,
        sink: Option<LogSink>,
    ) -> Result<Plugin, LoadError> {
        // The logger is installed once per loaded image, so it names the library, not the instance.
        let logger = HostLog_TO::from_value(
            PluginLog {
                source: self.file_name(),
                sink,
            },
            TD_Opaque,
        );
        let config = serde_json::json!({ "log_level": log_level }).to_string();
        let created = (self.module.create())(RStr::from_str(name), RStr::from_str(&config), logger);
        let instance = created
            .into_result()
            .map_err(|reason| LoadError::Constructor {
                path: self.path.clone(),
                instance: name.into(),
                reason: reason.into_string(),
            })?;
        Ok(Plugin::in_process(
            instance,
            name,
            &self.build_id,
            self.probed_in,
        ))
    }

    fn file_name(&self) -> String {
        file_name(&self.path)
    }
}

/// The name plugin log lines carry: the library's file name.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(|| "plugin".into(), |n| n.to_string_lossy().into_owned())
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// The content of the domain library at `path`.
pub fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    if !path.is_file() {
        return Err(LoadError::Missing(absolute(path)));
    }
    fs::read(path).map_err(|source| LoadError::Read {
        path: path.into(),
        source,
    })
}

/// A private copy of `bytes`, the content of the library at `path`, named with `tag` (unique in this
/// process), and its build id.
fn private_copy(
    path: &Path,
    bytes: &[u8],
    tag: &str,
) -> Result<(private::Copy, String), LoadError> {
    if let Some(reason) = elf::truncated(bytes) {
        return Err(LoadError::Truncated {
            path: path.into(),
            reason,
        });
    }
    let build_id = build_id(bytes);
    let stem = path
        .file_stem()
        .map_or_else(|| "domain".into(), |s| s.to_string_lossy().into_owned());
    let name = format!("{stem}-{tag}-{build_id}.so");
    let copy = private::write(path, bytes, &name)?;
    Ok((copy, build_id))
}

/// Where a domain instance runs.
#[derive(Debug, Clone)]
pub enum Isolation {
    /// In this process.
    InProcess,
    /// In worker processes this one starts and supervises.
    Process(isolated::Settings),
}

/// Start the domain instance `wanted` (else the default one) of the library whose content is `bytes`,
/// read from `path`, where `isolation` says. With `probe`, a child process first loads the private
/// copy and constructs the instance ([`probe`]): in this process, so that a build that dies or hangs
/// there is refused instead of taking the process with it; isolated, so that it is refused the same
/// way (the same one line, within `probe_timeout_seconds`) before any worker is started.
pub fn start(
    path: &Path,
    bytes: &[u8],
    wanted: Option<&str>,
    log_level: u8,
    isolation: &Isolation,
    probe: Option<&Probe>,
) -> Result<Plugin, LoadError> {
    match isolation {
        Isolation::InProcess => {
            let library = match probe {
                Some(probe) => {
                    Library::load_bytes_probed(path, bytes, probe, Instances::Selected(wanted))?
                }
                None => Library::load_bytes(path, bytes)?,
            };
            library.instantiate(&library.select(wanted)?, log_level)
        }
        Isolation::Process(settings) => {
            isolated::start(path, bytes, wanted, log_level, settings.clone(), probe)
        }
    }
}

/// The build id of a library's bytes: a short hash of its content. BLAKE3, for its speed on a library
/// of tens of megabytes hashed at every start and reload: SHA-256 of the 11.5 MB fixture library was
/// a quarter of the host's start (perf: about 9 ms of 33), and BLAKE3 starts it 5–6 ms sooner. It
/// stays a cryptographic hash, so that two builds with one id are the same bytes.
pub(crate) fn build_id(bytes: &[u8]) -> String {
    crate::message::hex(&blake3::hash(bytes).as_bytes()[..6])
}

fn open(original: &Path, copy: &Path) -> Result<ProteanPlugin_Ref, LoadError> {
    let path = original.to_owned();
    let raw = RawLibrary::load_at(copy).map_err(|e| LoadError::Open {
        path: path.clone(),
        reason: match e {
            LibraryError::OpenError { err, .. } => dl_reason(&err.to_string(), copy),
            other => other.to_string(),
        },
    })?;
    check_tag(&raw, original)?;
    // SAFETY: the tag check above established that this is a protean plugin of our ABI generation, whose
    // abi_stable header symbol is the static generated by `export_domains!`.
    let header = unsafe { lib_header_from_raw_library(&raw) }.map_err(|e| explain(e, original))?;
    let module = header
        .init_root_module::<ProteanPlugin_Ref>()
        .map_err(|e| explain(e, original))?;
    // Never unload: statics, vtables and thread-local destructors of the plugin must outlive every use.
    std::mem::forget(raw);
    MAPPED.fetch_add(1, Ordering::Relaxed);
    Ok(module)
}

/// dlerror text names the private copy; say it about the file the user gave instead.
fn dl_reason(reason: &str, copy: &Path) -> String {
    let copy = copy.display().to_string();
    reason
        .replace(&format!("{copy}: "), "")
        .replace(&copy, "the library")
}

fn check_tag(raw: &RawLibrary, path: &Path) -> Result<(), LoadError> {
    // SAFETY: we ask for a pointer-typed symbol (the address of a static), never call it, and only read
    // through it after checking the magic bytes that every protean tag starts with.
    let symbol = unsafe { raw.get::<*const AbiTag>(ABI_TAG_SYMBOL) };
    let Ok(symbol) = symbol else {
        return Err(LoadError::NotAPlugin(path.into()));
    };
    let pointer: *const AbiTag = *symbol;
    // SAFETY: the symbol is the address of a static in a mapped library; the magic occupies its first
    // 8 bytes in every version of the tag.
    let magic = unsafe { std::ptr::read_unaligned(pointer.cast::<[u8; 8]>()) };
    if magic != ABI_TAG_MAGIC {
        return Err(LoadError::NotAPlugin(path.into()));
    }
    // SAFETY: the magic matched, so this is a tag with the frozen `AbiTag` layout.
    let tag = unsafe { &*pointer };
    if tag.abi != PROTEAN_ABI {
        // SAFETY: as above, a genuine tag points at its own version string.
        let plugin_version = unsafe { tag.api_version() };
        return Err(LoadError::AbiMismatch {
            path: path.into(),
            plugin_version,
            plugin_abi: tag.abi,
        });
    }
    Ok(())
}

/// One sentence per abi_stable error; the full layout report only at debug level.
fn explain(error: LibraryError, path: &Path) -> LoadError {
    let path = path.to_owned();
    match error {
        LibraryError::AbiInstability(report) => {
            tracing::debug!(library = %path.display(), "abi_stable layout report:\n{report}");
            LoadError::Layout(path)
        }
        LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => {
            LoadError::Incompatible {
                path,
                reason: format!(
                    "plugin-api version mismatch: this host has {expected_version}, the plugin {actual_version}"
                ),
            }
        }
        LibraryError::InvalidAbiHeader(_) => LoadError::Incompatible {
            path,
            reason: "the plugin was built with another abi_stable version".into(),
        },
        LibraryError::RootModule { err: RootModuleError::Unwound, .. } => {
            LoadError::RootModule { path, reason: "its root module constructor panicked".into() }
        }
        other => LoadError::RootModule { path, reason: other.to_string() },
    }
}

/// What the host keeps of a handler registration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Registration {
    pub name: String,
    pub kind: Kind,
    pub categories: Vec<String>,
    pub message_types: Vec<String>,
    #[serde(skip)]
    pub options: HandlerOptions,
}

/// The kinds of handler the host knows how to subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    EventHandler,
    CommandHandler,
    Projector,
    ProcessManager,
    /// A kind from a newer plugin-api; the host does not subscribe it.
    Unknown(u8),
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::EventHandler => f.write_str("event handler"),
            Kind::CommandHandler => f.write_str("command handler"),
            Kind::Projector => f.write_str("projector"),
            Kind::ProcessManager => f.write_str("process manager"),
            Kind::Unknown(n) => write!(f, "unknown kind {n}"),
        }
    }
}

impl Kind {
    fn from_abi(kind: HandlerKind) -> Self {
        match kind {
            HandlerKind::EVENT_HANDLER => Kind::EventHandler,
            HandlerKind::COMMAND_HANDLER => Kind::CommandHandler,
            HandlerKind::PROJECTOR => Kind::Projector,
            HandlerKind::PROCESS_MANAGER => Kind::ProcessManager,
            HandlerKind(other) => Kind::Unknown(other),
        }
    }

    /// The kind's number in the ABI.
    fn to_abi(self) -> HandlerKind {
        match self {
            Kind::EventHandler => HandlerKind::EVENT_HANDLER,
            Kind::CommandHandler => HandlerKind::COMMAND_HANDLER,
            Kind::Projector => HandlerKind::PROJECTOR,
            Kind::ProcessManager => HandlerKind::PROCESS_MANAGER,
            Kind::Unknown(other) => HandlerKind(other),
        }
    }
}

impl Registration {
    fn from_abi(r: protean_plugin_api::abi::HandlerRegistration) -> Self {
        Self {
            options: options(&r.name, r.options_json.as_str()),
            name: r.name.into_string(),
            kind: Kind::from_abi(r.kind),
            categories: r.categories.into_iter().map(|c| c.into_string()).collect(),
            message_types: r
                .message_types
                .into_iter()
                .map(|t| t.into_string())
                .collect(),
        }
    }
}

/// A handler's options as it declared them (as JSON); unreadable ones are the defaults, with a warning.
fn options(handler: &str, json: &str) -> HandlerOptions {
    serde_json::from_str(json).unwrap_or_else(|error| {
        tracing::warn!(handler, %error, "ignoring unreadable handler options");
        HandlerOptions::default()
    })
}

/// One instantiated domain: loaded in this process, or running in worker processes.
pub struct Plugin {
    runner: Runner,
    name: String,
    build_id: String,
    registrations: Vec<Registration>,
    /// How long the probe of its build took, if it was probed.
    probed_in: Option<Duration>,
}

impl Plugin {
    /// The instance `instance` called `name`, of build `build_id`, running in this process.
    fn in_process(
        instance: DomainInstanceBox,
        name: &str,
        build_id: &str,
        probed_in: Option<Duration>,
    ) -> Self {
        let registrations = instance
            .registrations()
            .into_iter()
            .map(Registration::from_abi)
            .collect();
        Plugin {
            runner: Runner::InProcess(instance),
            name: name.into(),
            build_id: build_id.into(),
            registrations,
            probed_in,
        }
    }

    /// The domain `domain` linked into this binary, as instance `name` of build [`LINKED_BUILD`]:
    /// created through the export table `export_domains!` gives a library (`create`, then the ABI
    /// instance), only without loading one. For tests that run the engine on a domain.
    #[cfg(test)]
    pub(crate) fn linked(
        name: &'static str,
        domain: fn() -> protean_plugin_api::Domain,
    ) -> Result<Self, LoadError> {
        let logger = HostLog_TO::from_value(
            PluginLog {
                source: format!("linked {name}"),
                sink: None,
            },
            TD_Opaque,
        );
        let config = serde_json::json!({ "log_level": 2 }).to_string();
        let created = protean_plugin_api::export::create(
            &[(name, domain)],
            RStr::from_str(name),
            RStr::from_str(&config),
            logger,
        );
        let instance = created
            .into_result()
            .map_err(|reason| LoadError::Constructor {
                path: PathBuf::from("(linked)"),
                instance: name.into(),
                reason: reason.into_string(),
            })?;
        Ok(Plugin::in_process(instance, name, LINKED_BUILD, None))
    }
}

/// The build id of a domain linked into this binary ([`Plugin::linked`]).
#[cfg(test)]
pub(crate) const LINKED_BUILD: &str = "linked";

/// Where the instance's calls go.
enum Runner {
    InProcess(DomainInstanceBox),
    Isolated(Box<isolated::Pool>),
}

/// One message handed to a handler.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub id: &'a str,
    pub stream: &'a str,
    pub message_type: &'a str,
    pub position: u64,
    pub global_position: u64,
    pub data: &'a [u8],
    pub metadata: &'a [u8],
}

/// The result of one batch: `handled` messages succeeded; `failure` is about the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub handled: usize,
    pub failure: Option<Failure>,
}

impl Outcome {
    /// The outcome once the host refused a write of message `index` of the call (over the size
    /// limit): that message fails for good with `reason`, whatever the plugin reported for it (the SDK
    /// makes a host error retryable, a handler may ignore it), unless an earlier message failed first.
    pub fn refused_at(self, index: usize, reason: String) -> Self {
        if self.handled < index {
            return self;
        }
        Self {
            handled: index,
            failure: Some(Failure {
                retryable: false,
                message: reason,
                crashed: false,
            }),
        }
    }
}

impl Outcome {
    /// The outcome once a read of the call failed in a way no retry can mend (see
    /// `unit_of_work::Buffer::unreadable`): the failure the plugin reported, if any, is for good,
    /// whatever the plugin said (the SDK makes every host error retryable). A call that did not return
    /// stays as it is: which message failed is unknown.
    pub fn unreadable(mut self, reason: &str) -> Self {
        if let Some(failure) = self.failure.as_mut().filter(|f| !f.crashed) {
            failure.retryable = false;
            if !failure.message.contains(reason) {
                failure.message = format!("{}: {reason}", failure.message);
            }
        }
        self
    }
}

/// A handler failure as reported by the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub retryable: bool,
    pub message: String,
    /// The call did not return (the worker process running it died, or it passed its deadline): which
    /// message of the call caused it is unknown, so the engine retries the call's messages one by one.
    pub crashed: bool,
}

impl Plugin {
    /// The instance's name (`domain`, `reporting`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The build id of the library this instance came from.
    pub fn build_id(&self) -> &str {
        &self.build_id
    }

    /// Every handler the instance registered.
    pub fn registrations(&self) -> &[Registration] {
        &self.registrations
    }

    /// Call `handler` with `batch`. Blocking: run it on a blocking thread. `limit` is the handler's
    /// deadline: a worker process still in the call past it is killed, and the call fails as
    /// crashed; a call in this process cannot be stopped, so there it is only watched
    /// (`engine::deadlines`, which fails liveness).
    pub fn handle_batch(
        &self,
        handler: &str,
        batch: &[Delivery<'_>],
        host: &dyn HostServices,
        limit: Duration,
    ) -> Outcome {
        match &self.runner {
            Runner::InProcess(instance) => handle_in_process(instance, handler, batch, host),
            Runner::Isolated(pool) => pool.handle_batch(handler, batch, host, limit),
        }
    }
}

fn handle_in_process(
    instance: &DomainInstanceBox,
    handler: &str,
    batch: &[Delivery<'_>],
    host: &dyn HostServices,
) -> Outcome {
    let messages: Vec<MessageRef<'_>> = batch.iter().map(to_message_ref).collect();
    let adapter = services::AbiHost(host);
    let outcome = instance.handle_batch(
        RStr::from_str(handler),
        messages.as_slice().into(),
        adapter.as_host_ref(),
    );
    Outcome {
        handled: outcome.handled as usize,
        failure: outcome.failure.into_option().map(|f| Failure {
            retryable: f.retryable,
            message: f.message.into_string(),
            crashed: false,
        }),
    }
}

impl Plugin {
    /// The stream a command goes to, asking the plugin (which knows the command's identity field);
    /// an error says why `data` is not a command of `message_type`.
    pub fn command_stream(
        &self,
        message_type: &str,
        data: &[u8],
    ) -> Result<String, CommandStreamError> {
        match &self.runner {
            Runner::InProcess(instance) => instance
                .command_stream(RStr::from_str(message_type), data.into())
                .into_result()
                .map(|s| s.into_string())
                .map_err(|e| CommandStreamError::NotACommand(e.into_string())),
            Runner::Isolated(pool) => pool.command_stream(message_type, data),
        }
    }

    /// Whether the instance runs in worker processes.
    pub fn isolated(&self) -> bool {
        matches!(self.runner, Runner::Isolated(_))
    }

    /// How long the probe of this instance's build took, if it was probed.
    pub fn probed_in(&self) -> Option<Duration> {
        self.probed_in
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        // A pool stops its workers when it is dropped; each runs its instance's shutdown.
        if let Runner::InProcess(instance) = &self.runner {
            instance.shutdown();
        }
    }
}

fn to_message_ref<'a>(d: &Delivery<'a>) -> MessageRef<'a> {
    MessageRef {
        id: RStr::from_str(d.id),
        stream: RStr::from_str(d.stream),
        message_type: RStr::from_str(d.message_type),
        position: d.position,
        global_position: d.global_position,
        content_type: RStr::from_str("application/json"),
        data: d.data.into(),
        metadata: d.metadata.into(),
    }
}

/// Where a worker process sends its plugin's log lines (level, module, message): to the host.
pub(crate) type LogSink = Arc<dyn Fn(u8, &str, &str) + Send + Sync>;

/// Re-emits the plugin's log lines as host `tracing` events, with the plugin as their source; in a
/// worker process, hands them to the sink that carries them to the host.
struct PluginLog {
    source: String,
    sink: Option<LogSink>,
}

impl HostLog for PluginLog {
    fn log(&self, level: u8, target: RStr<'_>, message: RStr<'_>) {
        match &self.sink {
            Some(sink) => sink(level, target.as_str(), message.as_str()),
            None => emit(level, &self.source, target.as_str(), message.as_str()),
        }
    }
}

/// One plugin log line as a `tracing` event of target `plugin`.
fn emit(level: u8, plugin: &str, module: &str, message: &str) {
    use protean_plugin_api::abi::level;
    match level {
        level::ERROR => tracing::error!(target: "plugin", plugin, module, "{message}"),
        level::WARN => tracing::warn!(target: "plugin", plugin, module, "{message}"),
        level::INFO => tracing::info!(target: "plugin", plugin, module, "{message}"),
        level::DEBUG => tracing::debug!(target: "plugin", plugin, module, "{message}"),
        _ => tracing::trace!(target: "plugin", plugin, module, "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(handled: usize, retryable: Option<bool>) -> Outcome {
        Outcome {
            handled,
            failure: retryable.map(|retryable| Failure {
                retryable,
                message: "the plugin's".into(),
                crashed: false,
            }),
        }
    }

    #[test]
    fn a_refused_write_fails_its_message_for_good_unless_an_earlier_one_failed() {
        let refused = |o: Outcome| o.refused_at(1, "refused".into());
        let for_good = Outcome {
            handled: 1,
            failure: Some(Failure {
                retryable: false,
                message: "refused".into(),
                crashed: false,
            }),
        };
        assert_eq!(refused(outcome(3, None)), for_good, "the refusal ignored");
        assert_eq!(refused(outcome(1, Some(true))), for_good, "made retryable");
        assert_eq!(
            refused(outcome(2, Some(false))),
            for_good,
            "a later failure"
        );
        assert_eq!(
            refused(outcome(0, Some(true))),
            outcome(0, Some(true)),
            "an earlier failure stands"
        );
    }
}
