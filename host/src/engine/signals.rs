//! The process's stop signals (SIGINT, SIGTERM, SIGHUP), watched by one listener for its whole life.
//!
//! Why one: a tokio listener sees only the signals that arrive after it was created, and the handler
//! tokio installs for a signal is never removed. The wait for the store and broker at startup
//! listened for SIGTERM; once it was done, a SIGTERM that came before the engine's own listener was
//! caught by that handler and seen by nobody, and the server never stopped (the loss hunter's stop of
//! a replica that had just waited out a broker outage hung the suite). Here the first listener is
//! the only one, on a thread of its own, and it keeps what it received, so whoever asks later (the
//! startup wait, the engine) sees a signal that came before it asked.

use std::sync::OnceLock;

use tokio::sync::watch;

/// The stop signals received so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    /// The first one.
    pub first: Option<&'static str>,
    /// The latest one.
    pub last: Option<&'static str>,
    /// How many in all.
    pub count: u32,
}

static RECEIVED: OnceLock<Option<watch::Receiver<Received>>> = OnceLock::new();

/// The stop signals of this process, from the first call on; None when the handlers cannot be
/// installed (then the signals keep their default action: they end the process).
pub fn watch() -> Option<watch::Receiver<Received>> {
    RECEIVED.get_or_init(start).clone()
}

fn start() -> Option<watch::Receiver<Received>> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    // Installed before this returns: a signal from then on is never missed. (Entered, not blocked
    // on: the caller may be inside another runtime.)
    let streams = {
        let _context = runtime.enter();
        [
            (signal(SignalKind::interrupt()).ok()?, "SIGINT"),
            (signal(SignalKind::terminate()).ok()?, "SIGTERM"),
            (signal(SignalKind::hangup()).ok()?, "SIGHUP"),
        ]
    };
    let (tx, rx) = watch::channel(Received::default());
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || runtime.block_on(listen(streams, tx)))
        .ok()?;
    Some(rx)
}

async fn listen(
    streams: [(tokio::signal::unix::Signal, &'static str); 3],
    tx: watch::Sender<Received>,
) {
    let [(mut int, _), (mut term, _), (mut hup, _)] = streams;
    loop {
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = hup.recv() => "SIGHUP",
        };
        tx.send_modify(|received| {
            received.first.get_or_insert(name);
            received.last = Some(name);
            received.count += 1;
        });
    }
}
