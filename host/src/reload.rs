//! Hot reload: watch the domain library's directory and hand every new build to the engine.
//!
//! Cargo replaces a library by writing a new file and renaming it over the old one, so the watch is on
//! the directory, not the file, and events are debounced. A reload happens only when the file's
//! content changed (a touch does not reload). Loading goes through [`crate::plugin::start`] (a private
//! copy, first loaded by a probe process, never unloaded, ABI checked; in this process or in a new
//! worker pool): a build that aborts, exits or hangs while it loads or constructs is refused, and any
//! failure is one ERROR line while the running build carries on.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use notify_debouncer_mini::{
    new_debouncer,
    notify::{RecommendedWatcher, RecursiveMode},
    DebounceEventResult, Debouncer,
};

use crate::{
    engine::Engine,
    plugin::{trust, Isolation, Probe},
};

/// How long the directory must be quiet before a change counts (cargo writes in several steps).
const SETTLE: Duration = Duration::from_millis(200);

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {} for --reload: {source}", path.display())]
    Watch {
        path: PathBuf,
        source: notify_debouncer_mini::notify::Error,
    },
    #[error("refusing to --reload: {0}")]
    Untrusted(#[from] trust::TrustError),
}

/// Watches while it lives.
pub struct Watcher {
    _debouncer: Debouncer<RecommendedWatcher>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}

/// What to reload: the library file, which instance of it, the plugin log level, the user whose files
/// may be loaded (besides root), where each build runs (a new worker pool per build, isolated), and how
/// a new build is probed before it is loaded.
#[derive(Debug, Clone)]
pub struct Target {
    pub library: PathBuf,
    pub instance: String,
    pub log_level: u8,
    pub owner: u32,
    pub isolation: Isolation,
    /// `None` loads a new build without a probe: in this process, a crash in its initialisers or
    /// constructor ends the process; only for programs that cannot run a probe ([`Probe`]).
    pub probe: Option<Probe>,
}

/// Fail unless `library` and its directory are trusted to hold code ([`trust::check`]): with --reload
/// whoever can write either of them chooses the code this process runs. Checked before the first load.
pub fn check_trusted(library: &Path, owner: u32) -> Result<(), WatchError> {
    let library = std::path::absolute(library).unwrap_or(library.to_owned());
    let dir = library.parent().unwrap_or(Path::new("."));
    trust::check(dir, owner)?;
    trust::check(&library, owner)?;
    Ok(())
}

/// Reload `engine` whenever `target.library` gets new content.
pub fn watch(engine: Arc<Engine>, target: Target) -> Result<Watcher, WatchError> {
    check_trusted(&target.library, target.owner)?;
    let library = std::path::absolute(&target.library).unwrap_or(target.library.clone());
    let dir = library
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."));
    let last = Mutex::new(Seen {
        file: stamp(&library),
        build: engine.build_id(),
    });
    let watched = library.clone();
    let mut debouncer = new_debouncer(SETTLE, move |events: DebounceEventResult| match events {
        Ok(events) if events.iter().any(|e| e.path == watched) => {
            reload_if_changed(&engine, &target, &last)
        }
        Ok(_) => {}
        Err(error) => {
            tracing::error!(%error, "watching the domain library failed; reload may miss a build")
        }
    })
    .map_err(|source| WatchError::Watch {
        path: dir.clone(),
        source,
    })?;
    debouncer
        .watcher()
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError::Watch {
            path: dir.clone(),
            source,
        })?;
    tracing::info!(library = %library.display(), "watching the domain library; a new build is loaded when it appears");
    Ok(Watcher {
        _debouncer: debouncer,
    })
}

/// What was last seen of the library file.
struct Seen {
    /// Inode, size and modification time: when they are unchanged, so is the file. Reading the
    /// library (ours included) is an event too, and must not make us read it again.
    file: Option<(u64, u64, std::time::SystemTime)>,
    build: String,
}

fn stamp(path: &Path) -> Option<(u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.len(), meta.modified().ok()?))
}

fn reload_if_changed(engine: &Engine, target: &Target, last: &Mutex<Seen>) {
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    let file = stamp(&target.library);
    if file.is_none() || file == last.file {
        // Unchanged, or between cargo's write and rename: the next event brings the new file.
        return;
    }
    last.file = file;
    let bytes = match read_trusted(&target.library, target.owner) {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::error!(%error, "new build not loaded; the running build carries on");
            return;
        }
    };
    let build = crate::plugin::build_id(&bytes);
    if last.build == build {
        tracing::info!(
            build,
            "the library was rewritten with the same build; nothing to reload"
        );
        return;
    }
    // Not retried until the file changes again: the same bytes would fail the same way.
    last.build = build;
    if let Err(error) = load(engine, target, &bytes) {
        tracing::error!(library = %target.library.display(), %error, "reload failed; the running build carries on");
    }
}

/// The library's bytes, read from a descriptor whose file passed [`trust::check_metadata`]: the file
/// checked is the file read, even if the path is replaced in between.
fn read_trusted(library: &Path, owner: u32) -> Result<Vec<u8>, ReloadError> {
    use std::io::Read;
    let dir = library.parent().unwrap_or(Path::new("."));
    trust::check(dir, owner)?;
    let mut file = std::fs::File::open(library).map_err(|e| ReloadError::Read(e.to_string()))?;
    let meta = file
        .metadata()
        .map_err(|e| ReloadError::Read(e.to_string()))?;
    trust::check_metadata(library, &meta, owner)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes)
        .map_err(|e| ReloadError::Read(e.to_string()))?;
    Ok(bytes)
}

/// Why a new build was not taken.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error("cannot read the new build: {0}")]
    Read(String),
    #[error("refusing the new build: {0}")]
    Untrusted(#[from] trust::TrustError),
    #[error(transparent)]
    Load(#[from] crate::plugin::LoadError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
}

fn load(
    engine: &Engine,
    target: &Target,
    bytes: &[u8],
) -> Result<crate::engine::Changes, ReloadError> {
    let started = Instant::now();
    let plugin = crate::plugin::start(
        &target.library,
        bytes,
        Some(&target.instance),
        target.log_level,
        &target.isolation,
        target.probe.as_ref(),
    )?;
    tracing::info!(
        build = plugin.build_id(),
        load_ms = started.elapsed().as_millis() as u64,
        probe_ms = plugin.probed_in().map(|t| t.as_millis() as u64),
        "new build loaded; swapping after the batches in flight"
    );
    Ok(engine.reload(plugin)?)
}
