//! One worker process, as the host sees it: started, talked to with a deadline, stopped or killed.
//!
//! Invariants:
//! - every worker is started from one thread that lives as long as the host: a worker asks the kernel
//!   to kill it when the thread that started it ends (`PR_SET_PDEATHSIG`, so that a host killed with
//!   SIGKILL leaves no worker spinning), and tokio's blocking threads end when they have been idle;
//! - a read from the worker never waits past the call's deadline (poll(2) before each read);
//! - the worker's stderr is always drained (a full pipe would stall it), each line logged; the first
//!   line of the current call is kept, because it often says why the worker died ("memory allocation
//!   of 16777216 bytes failed"); what follows it is mostly consequences (notes, backtraces).

use std::{
    io::{self, BufRead, BufReader, Read},
    os::{fd::AsFd, unix::process::ExitStatusExt},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::Serialize;

use super::protocol::{decode, FrameReader, FrameWriter, FromWorker, Reply, ToWorker};
use crate::sync::lock;

/// The hidden subcommand of `protean-host` that runs a worker.
pub const SUBCOMMAND: &str = "__worker";

/// Why an exchange with a worker ended without an answer. The worker cannot be used again.
#[derive(Debug)]
pub(super) enum Broken {
    /// The deadline passed.
    TimedOut,
    /// The pipe broke or closed: the worker is dying or dead.
    Gone(io::Error),
    /// The worker said something out of turn, or something unreadable.
    Protocol(String),
}

impl From<io::Error> for Broken {
    fn from(error: io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::TimedOut => Broken::TimedOut,
            io::ErrorKind::InvalidData => Broken::Protocol(error.to_string()),
            _ => Broken::Gone(error),
        }
    }
}

/// What the host does with each message a worker sends during an exchange (its log lines aside).
pub(super) enum Step<T> {
    /// The exchange is over, with this result.
    Finish(T),
    /// Send this and read on.
    Answer(Reply),
    /// Not a message this exchange expects.
    Unexpected(&'static str),
}

/// A worker process.
pub(super) struct Process {
    child: Child,
    input: FrameWriter<ChildStdin>,
    output: FrameReader<Timed>,
    stderr: Stderr,
    /// The library's file name, which the plugin's log lines carry.
    plugin: Arc<str>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process").field("pid", &self.pid()).finish()
    }
}

impl Process {
    /// Start `program`'s worker subcommand; it waits for its `Start`.
    pub(super) fn spawn(program: &Path, plugin: Arc<str>) -> io::Result<Self> {
        let mut command = Command::new(program);
        command
            .arg(SUBCOMMAND)
            .arg(std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_from_long_lived_thread(command)?;
        let pipe = |name| io::Error::other(format!("the worker's {name} is not piped"));
        let input = child.stdin.take().ok_or_else(|| pipe("stdin"))?;
        let output = child.stdout.take().ok_or_else(|| pipe("stdout"))?;
        let stderr = child.stderr.take().ok_or_else(|| pipe("stderr"))?;
        let stderr = Stderr::drain(stderr, child.id(), plugin.clone())?;
        Ok(Self {
            input: FrameWriter::new(input),
            output: FrameReader::new(Timed {
                pipe: output,
                deadline: None,
            }),
            stderr,
            child,
            plugin,
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `request`, then read until `on` finishes the exchange, answering what it asks; the worker's
    /// log lines are logged here. Nothing is waited for past `deadline`.
    pub(super) fn exchange<T>(
        &mut self,
        request: &ToWorker<'_>,
        deadline: Instant,
        mut on: impl FnMut(FromWorker<'_>) -> Step<T>,
    ) -> Result<T, Broken> {
        self.stderr.new_call();
        self.output.source_mut().deadline = Some(deadline);
        self.send(request)?;
        loop {
            let frame = self
                .output
                .next()?
                .ok_or_else(|| Broken::Gone(io::ErrorKind::UnexpectedEof.into()))?;
            match decode(&frame)? {
                FromWorker::Log {
                    level,
                    module,
                    message,
                } => crate::plugin::emit(level, &self.plugin, module, message),
                message => match on(message) {
                    Step::Finish(result) => return Ok(result),
                    Step::Answer(reply) => self.send(&ToWorker::Reply(reply))?,
                    Step::Unexpected(what) => return Err(Broken::Protocol(what.into())),
                },
            }
        }
    }

    fn send(&mut self, message: &impl Serialize) -> Result<(), Broken> {
        Ok(self.input.send(message)?)
    }

    /// Ask the worker to stop (its instance shuts down) and wait until `deadline` for it to exit;
    /// past that, kill it.
    pub(super) fn stop(mut self, deadline: Instant) -> ExitStatus {
        let stopped = self.exchange(&ToWorker::Stop, deadline, |_| {
            Step::<()>::Unexpected("a message after Stop")
        });
        match stopped {
            // The worker closed its end: it is exiting.
            Err(Broken::Gone(_)) => {}
            Err(other) => {
                tracing::warn!(pid = self.pid(), reason = ?other, "the worker process did not stop in time; killing it")
            }
            Ok(()) => {}
        }
        self.kill().0
    }

    /// Kill the worker (harmless if it is already dead) and reap it: its exit status, and its first
    /// line on stderr during the current call, if any.
    pub(super) fn kill(mut self) -> (ExitStatus, Option<String>) {
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
        (status, self.stderr.first_words())
    }
}

/// The worker's stdout, read only when ready before the deadline.
struct Timed {
    pipe: ChildStdout,
    deadline: Option<Instant>,
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            wait_readable(&self.pipe, deadline)?;
        }
        self.pipe.read(buf)
    }
}

fn wait_readable(pipe: &ChildStdout, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up: a wait of 0 ms would spin until the deadline.
        let millis = left.as_nanos().div_ceil(1_000_000);
        let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) if left.is_zero() => return Err(io::ErrorKind::TimedOut.into()),
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => return Ok(()),
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// The worker's stderr: drained by a thread of its own into the host's log.
struct Stderr {
    /// The first line written since the current call began.
    first: Arc<Mutex<Option<String>>>,
    /// Disconnected when the worker's stderr closed.
    closed: mpsc::Receiver<()>,
}

impl Stderr {
    fn drain(pipe: std::process::ChildStderr, pid: u32, plugin: Arc<str>) -> io::Result<Self> {
        let first: Arc<Mutex<Option<String>>> = Arc::default();
        let (open, closed) = mpsc::channel::<()>();
        let kept = first.clone();
        std::thread::Builder::new()
            .name(format!("worker-{pid}-stderr"))
            .spawn(move || {
                let _open = open;
                let mut reader = BufReader::new(pipe);
                let mut line = Vec::new();
                while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                    let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                    line.clear();
                    if !text.is_empty() {
                        tracing::warn!(target: "plugin", plugin = %plugin, worker = pid, "{text}");
                        lock(&kept).get_or_insert(text);
                    }
                }
            })?;
        Ok(Self { first, closed })
    }

    fn new_call(&self) {
        lock(&self.first).take();
    }

    /// The first line of the current call, once the worker's stderr closed (it is dead, so nothing
    /// more comes; bounded, in case something it started keeps the pipe open).
    fn first_words(&self) -> Option<String> {
        let _ = self.closed.recv_timeout(Duration::from_secs(1));
        lock(&self.first).clone()
    }
}

/// A job for the spawner thread: the command, and where to send the child.
type Job = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawn `command` from a thread that lives as long as this process (see the module's invariants).
fn spawn_from_long_lived_thread(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<Job>();
        let started = std::thread::Builder::new()
            .name("worker-spawner".into())
            .spawn(move || {
                for (mut command, answer) in queue {
                    let _ = answer.send(command.spawn());
                }
            });
        started.ok().map(|_| jobs)
    });
    let gone = || io::Error::other("the thread that starts worker processes is not running");
    let (answer, child) = mpsc::channel();
    spawner
        .as_ref()
        .ok_or_else(gone)?
        .send((command, answer))
        .map_err(|_| gone())?;
    child.recv().map_err(|_| gone())?
}
