//! Isolated mode (`[server] isolation = "process"`): the domain runs in worker processes the host
//! starts and supervises, so that whatever its code does (abort, segfault, exit, allocate without
//! bound, loop forever) costs one call and a worker, never the host.
//!
//! The host keeps everything else: subscriptions, positions, the unit of work. A worker is
//! `protean-host __worker`: it maps a private copy of the library the host made, instantiates the
//! domain and answers one request at a time ([`protocol`]); the host services a handler calls are
//! answered by the host's unit-of-work buffer over the same pipes while the call runs.
//!
//! Invariants:
//! - a worker handles one call at a time; a call takes an idle worker or starts one, so there are as
//!   many workers as calls that ran at the same time;
//! - a call whose worker died, passed the deadline, or broke the protocol returns a `crashed` failure
//!   for the whole call, and that worker is reaped and never used again; the next call starts anew;
//! - dropping the pool (the generation is replaced by a reload, or the host stops) stops its workers
//!   once their calls are over: the engine drops a generation only after its batches are done.

mod process;
mod protocol;
pub mod worker;

use std::{
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use protean_plugin_api::{MessageKind, ScheduledMessage};
use serde_bytes::ByteBuf;

use self::{
    process::{Broken, Process, Step},
    protocol::{Call, FromWorker, Message, Reply, Start, ToWorker},
};
use super::{
    CommandStreamError, Delivery, Failure, HostServices, Instances, Kind, LoadError, Outcome,
    Plugin, Probe, Registration,
};
use crate::sync::lock;

pub use process::SUBCOMMAND;

/// How long a stopping worker gets to shut its instance down before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The least time a worker gets to start and load the domain: a short handler deadline is about
/// calls, and must not make a slow start (a big debug build, a busy machine) fail.
const MIN_START: Duration = Duration::from_secs(30);

/// How worker processes are started and limited.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `protean-host` binary whose worker subcommand runs a worker (normally this one).
    pub program: PathBuf,
    /// How long a request other than a handler call (naming a command's stream) may take before its
    /// worker is killed; a handler call has its handler's own deadline.
    pub timeout: Duration,
    /// The worker's data memory limit (`RLIMIT_DATA`), in MiB.
    pub memory_limit_mb: Option<u64>,
    /// CPU seconds one call, or the domain's start, may use (`RLIMIT_CPU`, moved on before each call).
    pub cpu_limit_seconds: Option<u64>,
}

impl Settings {
    /// Workers of this very binary, with the configured deadline and limits.
    pub fn from_config(config: &crate::config::Config) -> std::io::Result<Self> {
        Ok(Self {
            program: std::env::current_exe()?,
            timeout: config.handler_timeout,
            memory_limit_mb: config.isolation.memory_limit_mb,
            cpu_limit_seconds: config.isolation.cpu_limit_seconds,
        })
    }
}

/// Start the domain instance `wanted` (else the default one) of the library whose content is `bytes`
/// (read from `path`) in a first worker process, which tells its handlers. With `probe`, a probe
/// process loads the same private copy and constructs the instance first ([`super::probe`]), so a
/// build that dies or hangs while it starts is refused in the same line as in-process, before any
/// worker is started.
pub(super) fn start(
    path: &Path,
    bytes: &[u8],
    wanted: Option<&str>,
    log_level: u8,
    settings: Settings,
    probe: Option<&Probe>,
) -> Result<Plugin, LoadError> {
    static POOLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tag = format!(
        "w{}",
        POOLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let (copy, build_id) = super::private_copy(path, bytes, &tag)?;
    let probed_in = match probe {
        Some(probe) => {
            let started = Instant::now();
            probe.check(&copy.path, path, &build_id, Instances::Selected(wanted))?;
            Some(started.elapsed())
        }
        None => None,
    };
    let mut pool = Pool {
        library: path.into(),
        plugin: super::file_name(path).into(),
        copy,
        build_id,
        instance: wanted.map(str::to_owned),
        log_level,
        settings,
        idle: Mutex::default(),
    };
    let (worker, ready) = pool.spawn()?;
    pool.instance = Some(ready.instance.clone());
    pool.idle = Mutex::new(vec![worker]);
    Ok(Plugin {
        name: ready.instance,
        build_id: pool.build_id.clone(),
        registrations: ready.registrations,
        runner: super::Runner::Isolated(Box::new(pool)),
        probed_in,
    })
}

/// What a worker reports once its domain is loaded.
struct Ready {
    instance: String,
    registrations: Vec<Registration>,
}

/// The worker processes of one generation of the domain.
pub(super) struct Pool {
    library: PathBuf,
    plugin: Arc<str>,
    /// The private copy every worker of this generation maps; removed when the pool goes.
    copy: super::private::Copy,
    build_id: String,
    /// The instance; after the first worker started, the one it chose.
    instance: Option<String>,
    log_level: u8,
    settings: Settings,
    idle: Mutex<Vec<Process>>,
}

impl Pool {
    /// Start a worker and load the domain in it.
    fn spawn(&self) -> Result<(Process, Ready), LoadError> {
        let failed = |reason: String| LoadError::Worker {
            path: self.library.clone(),
            reason,
        };
        let mut worker =
            Process::spawn(&self.settings.program, self.plugin.clone()).map_err(|e| {
                failed(format!(
                    "cannot start {}: {e}",
                    self.settings.program.display()
                ))
            })?;
        let (library, copy) = (bytes_of(&self.library), bytes_of(&self.copy.path));
        let start = ToWorker::Start(Start {
            library: &library,
            copy: &copy,
            build_id: &self.build_id,
            instance: self.instance.as_deref(),
            log_level: self.log_level,
            memory_limit_mb: self.settings.memory_limit_mb,
            cpu_limit_seconds: self.settings.cpu_limit_seconds,
        });
        let limit = self.settings.timeout.max(MIN_START);
        let answer = worker.exchange(&start, Instant::now() + limit, |message| match message {
            FromWorker::Ready {
                instance,
                registrations,
            } => Step::Finish(Ok(Ready {
                instance: instance.into(),
                registrations: registrations.into_iter().map(registration).collect(),
            })),
            FromWorker::Failed(reason) => Step::Finish(Err(reason.to_owned())),
            _ => Step::Unexpected("a message other than Ready or Failed at start"),
        });
        match answer {
            Ok(Ok(ready)) => {
                tracing::info!(pid = worker.pid(), build = %self.build_id, instance = %ready.instance, "worker process started");
                Ok((worker, ready))
            }
            Ok(Err(reason)) => {
                worker.stop(Instant::now() + STOP_GRACE);
                Err(LoadError::InWorker(reason))
            }
            Err(broken) => {
                let death = Death::of(worker, broken, limit);
                Err(failed(death.describe("loading the domain")))
            }
        }
    }

    /// An idle worker, or a new one.
    fn checkout(&self) -> Result<Process, LoadError> {
        if let Some(worker) = lock(&self.idle).pop() {
            return Ok(worker);
        }
        self.spawn().map(|(worker, _)| worker)
    }

    fn checkin(&self, worker: Process) {
        lock(&self.idle).push(worker);
    }

    pub(super) fn handle_batch(
        &self,
        handler: &str,
        batch: &[Delivery<'_>],
        host: &dyn HostServices,
        limit: Duration,
    ) -> Outcome {
        let mut worker = match self.checkout() {
            Ok(worker) => worker,
            Err(error) => return no_worker(error),
        };
        let request = ToWorker::Handle {
            handler,
            batch: batch.iter().map(Message::from).collect(),
        };
        let deadline = Instant::now() + limit;
        let done = worker.exchange(&request, deadline, |message| match message {
            FromWorker::Call(call) => Step::Answer(serve(host, call)),
            FromWorker::Done { handled, failure } => Step::Finish(Outcome {
                handled: handled as usize,
                failure: failure.map(|f| Failure {
                    retryable: f.retryable,
                    message: f.message.to_owned(),
                    crashed: false,
                }),
            }),
            _ => Step::Unexpected("a message other than a host call or Done during a batch"),
        });
        match done {
            Ok(outcome) => {
                self.checkin(worker);
                outcome
            }
            Err(broken) => self.crashed(worker, broken, handler, limit),
        }
    }

    /// The outcome of a call whose worker died, hung or broke the protocol: reaped, and not reused.
    fn crashed(&self, worker: Process, broken: Broken, handler: &str, limit: Duration) -> Outcome {
        let pid = worker.pid();
        let death = Death::of(worker, broken, limit);
        let message = death.describe("handling this call");
        tracing::error!(pid, handler, build = %self.build_id, error = %message, "worker process lost; the next call starts a new one");
        Outcome {
            handled: 0,
            failure: Some(Failure {
                retryable: true,
                message,
                crashed: true,
            }),
        }
    }

    pub(super) fn command_stream(
        &self,
        message_type: &str,
        data: &[u8],
    ) -> Result<String, CommandStreamError> {
        let mut worker = self
            .checkout()
            .map_err(|e| CommandStreamError::NoWorker(Box::new(e)))?;
        let request = ToWorker::CommandStream { message_type, data };
        let deadline = Instant::now() + self.settings.timeout;
        let answer = worker.exchange(&request, deadline, |message| match message {
            FromWorker::Stream(answer) => Step::Finish(
                answer
                    .map(str::to_owned)
                    .map_err(|reason| CommandStreamError::NotACommand(reason.to_owned())),
            ),
            _ => Step::Unexpected("a message other than the command's stream"),
        });
        match answer {
            Ok(answer) => {
                self.checkin(worker);
                answer
            }
            Err(broken) => {
                let death = Death::of(worker, broken, self.settings.timeout);
                Err(CommandStreamError::WorkerLost(
                    death.describe("naming the command's stream"),
                ))
            }
        }
    }

    /// Stop the idle workers, each after its instance shut down.
    fn stop_all(workers: Vec<Process>, build: &str) {
        let deadline = Instant::now() + STOP_GRACE;
        for worker in workers {
            let pid = worker.pid();
            let status = worker.stop(deadline);
            tracing::info!(pid, build, %status, "worker process stopped");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let workers = std::mem::take(&mut *lock(&self.idle));
        let build = self.build_id.clone();
        // Dropped from an async task (a reload swaps generations there), the wait must not block
        // the runtime; at the end of the process it must happen before exit, so that every
        // instance shuts down.
        if tokio::runtime::Handle::try_current().is_ok() {
            let stopping = std::thread::Builder::new()
                .name("worker-stop".into())
                .spawn(move || Self::stop_all(workers, &build));
            if let Err(error) = stopping {
                tracing::warn!(%error, "cannot stop the old worker processes; they end with the host");
            }
        } else {
            Self::stop_all(workers, &build);
        }
    }
}

/// A call that found no worker and could not start one: retried later, like any passing failure.
fn no_worker(error: LoadError) -> Outcome {
    Outcome {
        handled: 0,
        failure: Some(Failure {
            retryable: true,
            message: error.to_string(),
            crashed: false,
        }),
    }
}

/// How a worker ended.
struct Death {
    broken: Broken,
    status: ExitStatus,
    first_words: Option<String>,
    timeout: Duration,
}

impl Death {
    /// Reap `worker`, which `broken` says can no longer be used.
    fn of(worker: Process, broken: Broken, timeout: Duration) -> Self {
        let (status, first_words) = worker.kill();
        Self {
            broken,
            status,
            first_words,
            timeout,
        }
    }

    /// One line: what happened to the worker while it was `doing` something, and what it said.
    fn describe(&self, doing: &str) -> String {
        use std::os::unix::process::ExitStatusExt;
        let what = match (&self.broken, self.status.code(), self.status.signal()) {
            (Broken::TimedOut, ..) => format!(
                "the worker process passed its deadline of {} ms {doing} and was killed",
                self.timeout.as_millis()
            ),
            (Broken::Protocol(what), ..) => {
                format!("the worker process broke the protocol {doing} ({what}) and was killed")
            }
            (Broken::Gone(_), Some(code), _) => {
                format!("the worker process exited with code {code} {doing}")
            }
            (Broken::Gone(_), None, Some(signal)) => {
                format!("the worker process died {doing} ({})", signal_name(signal))
            }
            (Broken::Gone(error), None, None) => {
                format!("the worker process was lost {doing}: {error}")
            }
        };
        match &self.first_words {
            Some(line) => format!("{what}; it wrote: {line}"),
            None => what,
        }
    }
}

/// `SIGSEGV`, `SIGABRT`, ... with a hint for the ones that need it.
fn signal_name(signal: i32) -> String {
    let name = nix::sys::signal::Signal::try_from(signal)
        .map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_owned());
    match signal {
        libc::SIGKILL => {
            format!("{name}: killed by another process, or by the kernel out of memory")
        }
        libc::SIGXCPU => format!("{name}: past its CPU time limit"),
        _ => name,
    }
}

/// Answer a host service call with the call's buffer.
fn serve(host: &dyn HostServices, call: Call<'_>) -> Reply {
    match call {
        Call::RaiseEvent {
            index,
            stream,
            message_type,
            data,
            expected_version,
        } => Reply::Unit(host.raise_event(index, stream, message_type, data, expected_version)),
        Call::SendCommand {
            index,
            stream,
            message_type,
            data,
        } => Reply::Unit(host.send_command(index, stream, message_type, data)),
        Call::ReadStream {
            stream,
            from_position,
        } => Reply::Bytes(host.read_stream(stream, from_position).map(ByteBuf::from)),
        Call::GetDocument { collection, id } => Reply::Document(
            host.get_document(collection, id)
                .map(|d| d.map(ByteBuf::from)),
        ),
        Call::PutDocument {
            index,
            collection,
            id,
            data,
        } => Reply::Unit(host.put_document(index, collection, id, data)),
        Call::DeleteDocument {
            index,
            collection,
            id,
        } => Reply::Unit(host.delete_document(index, collection, id)),
        Call::FindDocuments {
            collection,
            field,
            value_json,
        } => Reply::Bytes(
            host.find_documents(collection, field, value_json)
                .map(ByteBuf::from),
        ),
        Call::Schedule {
            index,
            key,
            due_ms,
            command,
            stream,
            message_type,
            data,
        } => {
            let kind = match command {
                true => MessageKind::Command,
                false => MessageKind::Event,
            };
            let scheduled = ScheduledMessage {
                key,
                due_ms,
                kind,
                stream,
                message_type,
                data,
            };
            Reply::Unit(host.schedule(index, scheduled))
        }
        Call::CancelSchedule { index, key } => Reply::Unit(host.cancel_schedule(index, key)),
        Call::NowMs => Reply::Millis(host.now_ms()),
    }
}

fn registration(r: protocol::Registration) -> Registration {
    Registration {
        kind: Kind::from_abi(protean_plugin_api::abi::HandlerKind(r.kind)),
        options: super::options(&r.name, &r.options_json),
        name: r.name,
        categories: r.categories,
        message_types: r.message_types,
    }
}

fn bytes_of(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::{protocol::Call, serve, Reply};
    use crate::{
        clock::Clock,
        message::Cause,
        store::MemoryStore,
        unit_of_work::{Buffer, ScheduleWrite, UnitOfWork},
    };

    #[test]
    fn a_workers_schedule_calls_are_answered_by_the_buffer_on_the_engines_clock() {
        let store = MemoryStore::default();
        let clock = Clock::simulated(chrono::Utc.timestamp_millis_opt(2_000).unwrap());
        let causes = [Cause::default(); 1];
        let buffer = Buffer::new(&store, &clock, &causes, 1 << 20);
        let view = buffer.view(0);
        assert!(matches!(serve(&view, Call::NowMs), Reply::Millis(2_000)));
        let set = Call::Schedule {
            index: 0,
            key: "k",
            due_ms: 9_000,
            command: false,
            stream: "t::x-1",
            message_type: "T.A.v1",
            data: b"{}",
        };
        assert!(matches!(serve(&view, set), Reply::Unit(Ok(()))));
        let cancel = Call::CancelSchedule { index: 0, key: "" };
        let Reply::Unit(Err(refused)) = serve(&view, cancel) else {
            panic!("an empty key is refused");
        };
        assert!(refused.contains("key is empty"), "{refused}");
        let mut unit = UnitOfWork::default();
        buffer.drain_into(&mut unit);
        let [ScheduleWrite::Set { message, .. }] = unit.schedules.as_slice() else {
            panic!("one set: {:?}", unit.schedules);
        };
        let metadata: serde_json::Value = serde_json::from_str(&message.metadata).unwrap();
        assert_eq!(metadata["domain"]["kind"], "EVENT");
    }
}
