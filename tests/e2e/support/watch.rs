//! Watching a directory for the files made in it.

use notify_debouncer_mini::notify;
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

/// The files created in a directory since it was watched.
pub struct Created {
    dir: PathBuf,
    events: std::sync::mpsc::Receiver<notify::Result<notify::Event>>,
    _watcher: notify::RecommendedWatcher,
}

impl Created {
    pub fn watch(dir: &Path) -> Self {
        use notify::Watcher;
        let (sender, events) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(sender).unwrap();
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .unwrap();
        Self {
            dir: dir.into(),
            events,
            _watcher: watcher,
        }
    }

    /// Every creation reported before a marker file made now: events come in order, so the marker's
    /// arrival means all earlier ones have.
    pub fn since(&self) -> Vec<PathBuf> {
        let marker = self.dir.join("marker");
        std::fs::write(&marker, b"").unwrap();
        let mut created = Vec::new();
        loop {
            let event = self
                .events
                .recv_timeout(Duration::from_secs(10))
                .expect("the marker file's creation is reported")
                .unwrap();
            if !event.kind.is_create() {
                continue;
            }
            if event.paths.contains(&marker) {
                return created;
            }
            created.extend(event.paths);
        }
    }
}
