//! A worker process (`protean-host __worker HOST_PID`): loads the domain the host names and answers
//! the host's requests until told to stop or until the host goes.
//!
//! Before any plugin code runs it moves the protocol off stdin and stdout (so whatever the plugin
//! prints goes to stderr, which the host logs), asks to be killed when the host dies, and sets the
//! memory and CPU limits. Each call's host services are asked of the host over the same pipes.

use std::{
    cell::RefCell,
    ffi::OsStr,
    fs::File,
    io,
    os::{fd::AsFd, unix::ffi::OsStrExt},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::sys::resource::{getrlimit, getrusage, setrlimit, Resource, UsageWho};

use super::protocol::{
    decode, Call, Failure, FrameReader, FrameWriter, FromWorker, Registration, Reply, Start,
    ToWorker,
};
use crate::plugin::{Delivery, HostServices, Library, LoadError, LogSink, Plugin};
use protean_plugin_api::{MessageKind, ScheduledMessage};

/// Why a worker process gave up. It says so on stderr, which the host logs.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the worker process cannot set itself up: {0}")]
    Setup(#[from] nix::errno::Errno),
    #[error("the host process {0} is gone")]
    Orphan(u32),
    #[error("the channel to the host failed: {0}")]
    Channel(#[from] io::Error),
    #[error("the host sent {0}; a worker only runs under protean-host")]
    Protocol(&'static str),
}

type Writer = Mutex<FrameWriter<File>>;

/// Serve the host `host_pid` that started this process.
pub fn serve(host_pid: u32) -> Result<(), WorkerError> {
    let (input, output) = protocol_pipes()?;
    die_with(host_pid)?;
    let mut reader = FrameReader::new(input);
    let writer = Arc::new(Mutex::new(FrameWriter::new(output)));
    let Some(frame) = reader.next()? else {
        return Ok(());
    };
    let ToWorker::Start(start) = decode(&frame)? else {
        return Err(WorkerError::Protocol("a request before Start"));
    };
    limit(&start)?;
    let cpu_limit = start.cpu_limit_seconds;
    let plugin = match load(&start, &writer) {
        Ok(plugin) => plugin,
        Err(error) => return Ok(send(&writer, &FromWorker::Failed(&error.to_string()))?),
    };
    send(
        &writer,
        &FromWorker::Ready {
            instance: plugin.name(),
            registrations: plugin.registrations().iter().map(wire).collect(),
        },
    )?;
    drop(frame);
    serve_requests(&plugin, &mut reader, &writer, cpu_limit)
}

/// The protocol's own copies of stdin and stdout; then stdin reads nothing and stdout is stderr.
fn protocol_pipes() -> io::Result<(File, File)> {
    let input = io::stdin().as_fd().try_clone_to_owned()?;
    let output = io::stdout().as_fd().try_clone_to_owned()?;
    nix::unistd::dup2_stdin(File::open("/dev/null")?)?;
    nix::unistd::dup2_stdout(io::stderr())?;
    Ok((input.into(), output.into()))
}

/// Be killed when the host dies, even in the middle of a handler that never returns.
fn die_with(host_pid: u32) -> Result<(), WorkerError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    // A host that died before the line above has handed this process to another parent already.
    if nix::unistd::getppid().as_raw() as u32 != host_pid {
        return Err(WorkerError::Orphan(host_pid));
    }
    Ok(())
}

/// The memory limit for the rest of this process's life, and the CPU budget of the domain's start.
fn limit(start: &Start<'_>) -> nix::Result<()> {
    if let Some(mb) = start.memory_limit_mb {
        let (_, hard) = getrlimit(Resource::RLIMIT_DATA)?;
        let bytes = mb.saturating_mul(1 << 20).min(hard);
        setrlimit(Resource::RLIMIT_DATA, bytes, bytes)?;
    }
    budget_cpu(start.cpu_limit_seconds)
}

/// Allow `seconds` more CPU time from now. RLIMIT_CPU counts the whole life of the process, so the
/// soft limit moves on before each call; the kernel sends SIGXCPU, which kills, when a call passes it.
fn budget_cpu(seconds: Option<u64>) -> nix::Result<()> {
    let Some(seconds) = seconds else {
        return Ok(());
    };
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    // Whole seconds used so far, rounded up.
    let used = (usage.user_time().tv_sec() + usage.system_time().tv_sec()) as u64 + 1;
    let (_, hard) = getrlimit(Resource::RLIMIT_CPU)?;
    setrlimit(Resource::RLIMIT_CPU, (used + seconds).min(hard), hard)
}

fn load(start: &Start<'_>, writer: &Arc<Writer>) -> Result<Plugin, LoadError> {
    let library = Path::new(OsStr::from_bytes(start.library));
    let copy = Path::new(OsStr::from_bytes(start.copy));
    let loaded = Library::load_copy(library, copy, start.build_id)?;
    let instance = loaded.select(start.instance)?;
    let writer = writer.clone();
    let sink: LogSink = Arc::new(move |level, module, message| {
        // A log line the host cannot get is lost with the host.
        let _ = send(
            &writer,
            &FromWorker::Log {
                level,
                module,
                message,
            },
        );
    });
    loaded.instantiate_logging_to(&instance, start.log_level, Some(sink))
}

/// Answer requests until the host says stop or closes the channel.
fn serve_requests(
    plugin: &Plugin,
    reader: &mut FrameReader<File>,
    writer: &Writer,
    cpu_limit: Option<u64>,
) -> Result<(), WorkerError> {
    while let Some(frame) = reader.next()? {
        match decode(&frame)? {
            ToWorker::Handle { handler, batch } => {
                budget_cpu(cpu_limit)?;
                let deliveries: Vec<Delivery<'_>> = batch.iter().map(Delivery::from).collect();
                let host = Remote {
                    reader: RefCell::new(&mut *reader),
                    writer,
                };
                // The host kills this process past the handler's deadline; nothing to watch here.
                let outcome = plugin.handle_batch(handler, &deliveries, &host, Duration::MAX);
                let failure = outcome.failure.as_ref().map(|f| Failure {
                    retryable: f.retryable,
                    message: &f.message,
                });
                let handled = u32::try_from(outcome.handled).unwrap_or(u32::MAX);
                send(writer, &FromWorker::Done { handled, failure })?;
            }
            ToWorker::CommandStream { message_type, data } => {
                budget_cpu(cpu_limit)?;
                let answer = plugin
                    .command_stream(message_type, data)
                    .map_err(|e| e.to_string());
                let answer = answer.as_deref().map_err(String::as_str);
                send(writer, &FromWorker::Stream(answer))?;
            }
            ToWorker::Stop => return Ok(()),
            ToWorker::Start(_) => return Err(WorkerError::Protocol("a second Start")),
            ToWorker::Reply(_) => return Err(WorkerError::Protocol("a reply nobody asked for")),
        }
    }
    Ok(())
}

fn send(writer: &Writer, message: &FromWorker<'_>) -> io::Result<()> {
    writer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(message)
}

fn wire(r: &crate::plugin::Registration) -> Registration {
    Registration {
        name: r.name.clone(),
        kind: r.kind.to_abi().0,
        categories: r.categories.clone(),
        message_types: r.message_types.clone(),
        options_json: serde_json::to_string(&r.options).unwrap_or_else(|_| "{}".into()),
    }
}

/// Why a host call got no usable answer from the host process. The handler sees it as the call's error.
#[derive(Debug, thiserror::Error)]
enum Unanswered {
    #[error("{0}")]
    Channel(#[from] io::Error),
    #[error("the host closed the channel")]
    Closed,
    #[error("the host answered a host call with something else")]
    NotAReply,
    #[error("the host's reply does not match the call")]
    Mismatch,
}

impl From<Unanswered> for String {
    fn from(error: Unanswered) -> Self {
        error.to_string()
    }
}

/// The host services of one call, asked of the host.
struct Remote<'a> {
    reader: RefCell<&'a mut FrameReader<File>>,
    writer: &'a Writer,
}

impl Remote<'_> {
    fn ask(&self, call: Call<'_>) -> Result<Reply, Unanswered> {
        send(self.writer, &FromWorker::Call(call))?;
        let frame = self.reader.borrow_mut().next()?.ok_or(Unanswered::Closed)?;
        match decode(&frame)? {
            ToWorker::Reply(reply) => Ok(reply),
            _ => Err(Unanswered::NotAReply),
        }
    }

    fn unit(&self, call: Call<'_>) -> Result<(), String> {
        match self.ask(call)? {
            Reply::Unit(result) => result,
            _ => Err(Unanswered::Mismatch.into()),
        }
    }

    fn bytes(&self, call: Call<'_>) -> Result<Vec<u8>, String> {
        match self.ask(call)? {
            Reply::Bytes(result) => result.map(|b| b.into_vec()),
            _ => Err(Unanswered::Mismatch.into()),
        }
    }
}

impl HostServices for Remote<'_> {
    fn raise_event(
        &self,
        index: u32,
        stream: &str,
        message_type: &str,
        data: &[u8],
        expected_version: Option<i64>,
    ) -> Result<(), String> {
        self.unit(Call::RaiseEvent {
            index,
            stream,
            message_type,
            data,
            expected_version,
        })
    }

    fn send_command(
        &self,
        index: u32,
        stream: &str,
        message_type: &str,
        data: &[u8],
    ) -> Result<(), String> {
        self.unit(Call::SendCommand {
            index,
            stream,
            message_type,
            data,
        })
    }

    fn read_stream(&self, stream: &str, from_position: u64) -> Result<Vec<u8>, String> {
        self.bytes(Call::ReadStream {
            stream,
            from_position,
        })
    }

    fn get_document(&self, collection: &str, id: &str) -> Result<Option<Vec<u8>>, String> {
        match self.ask(Call::GetDocument { collection, id })? {
            Reply::Document(result) => result.map(|d| d.map(|b| b.into_vec())),
            _ => Err(Unanswered::Mismatch.into()),
        }
    }

    fn put_document(
        &self,
        index: u32,
        collection: &str,
        id: &str,
        data: &[u8],
    ) -> Result<(), String> {
        self.unit(Call::PutDocument {
            index,
            collection,
            id,
            data,
        })
    }

    fn delete_document(&self, index: u32, collection: &str, id: &str) -> Result<(), String> {
        self.unit(Call::DeleteDocument {
            index,
            collection,
            id,
        })
    }

    fn find_documents(
        &self,
        collection: &str,
        field: &str,
        value_json: &[u8],
    ) -> Result<Vec<u8>, String> {
        self.bytes(Call::FindDocuments {
            collection,
            field,
            value_json,
        })
    }

    fn schedule(&self, index: u32, scheduled: ScheduledMessage<'_>) -> Result<(), String> {
        self.unit(Call::Schedule {
            index,
            key: scheduled.key,
            due_ms: scheduled.due_ms,
            command: scheduled.kind == MessageKind::Command,
            stream: scheduled.stream,
            message_type: scheduled.message_type,
            data: scheduled.data,
        })
    }

    fn cancel_schedule(&self, index: u32, key: &str) -> Result<(), String> {
        self.unit(Call::CancelSchedule { index, key })
    }

    fn now_ms(&self) -> i64 {
        match self.ask(Call::NowMs) {
            Ok(Reply::Millis(ms)) => ms,
            // No answer: the host is gone or broke the protocol, and this call's outcome will never
            // be committed; the system clock keeps the handler going until it learns so.
            _ => protean_plugin_api::abi::system_now_ms(),
        }
    }
}
