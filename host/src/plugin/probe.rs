//! Loading a build in a throwaway process before this one loads it.
//!
//! Loading a library runs its code: its ELF initialisers when it is mapped, then the constructor of each
//! domain instance the host creates. Code that aborts, segfaults, exits or never returns there takes the
//! whole process with it, and no `catch_unwind` can help. So the binary first has a child process of its
//! own (`protean-host __probe`, [`child`]) load the build and construct the instances the host will; the
//! child writes one JSON line per step it reaches and exits. Only when the child finished does the
//! caller map the build; otherwise one error says how the child died (signal, exit code, time limit) and
//! at which step.
//!
//! The child is given the host's private copy ([`super::private`]), so the bytes probed are the bytes
//! then loaded; it reports their build id, which the host checks against its own. A clean failure in
//! the child (an ABI mismatch, a constructor that returns an error) is not the probe's to report: the
//! build passes, and loading it in this process produces the same error with its usual message.
//!
//! A probe defends against bugs, not against malice: a build that passes is loaded into the host
//! anyway. Its constructors run twice (in the probe, then here), so they should have no side effects.

use std::{
    ffi::OsString,
    io::{self, Read, Write},
    os::{fd::AsFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::Library;

/// The hidden subcommand of `protean-host` that runs [`child`].
pub const SUBCOMMAND: &str = "__probe";

/// Which instances a probe constructs: those the caller will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances<'a> {
    /// The named one, or the one the default rule selects ([`Library::select`]).
    Selected(Option<&'a str>),
    /// Every instance the library exports (`inspect`).
    Every,
}

/// Whether this process runs under an emulator such as valgrind: `/proc/self/exe` is then the
/// emulator's image, while the link's name as this process reads it (intercepted) is an existing file
/// that is not it. A binary replaced on disk reads as "… (deleted)", which does not exist.
fn emulated(proc_exe: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(named), Ok(running)) = (std::fs::read_link(proc_exe), std::fs::metadata(proc_exe))
    else {
        return false;
    };
    std::fs::metadata(named).is_ok_and(|m| (m.dev(), m.ino()) != (running.dev(), running.ino()))
}

/// How probes are run: which program, with which arguments, for how long at most.
#[derive(Debug, Clone)]
pub struct Probe {
    program: PathBuf,
    args: Vec<OsString>,
    timeout: Duration,
    show_output: bool,
}

impl Probe {
    /// Probes run by this very executable. `/proc/self/exe` names the running image even after its file
    /// was replaced (an upgrade on disk), so the child always speaks this process's protocol.
    pub fn this_binary(timeout: Duration) -> Self {
        let program = Path::new("/proc/self/exe");
        let program = if program.exists() && !emulated(program) {
            program.to_owned()
        } else {
            std::env::current_exe().unwrap_or_else(|_| program.to_owned())
        };
        Self::with_program(program, timeout)
    }

    /// Probes run by `program`, which must implement the [`SUBCOMMAND`] by calling [`child`].
    pub fn with_program(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            timeout,
            show_output: false,
        }
    }

    /// Arguments put before the subcommand (the log level and format the child logs with).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Let the child write to this process's stderr: its log lines and whatever the plugin prints.
    /// Off, that output is discarded (a passing build's constructor logs again when the host loads it).
    pub fn show_output(mut self, show: bool) -> Self {
        self.show_output = show;
        self
    }

    /// How long a probe may take before it is killed and the build refused.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Probe the private copy `copy` of the library `named`, expected to be build `build_id`.
    pub(super) fn check(
        &self,
        copy: &Path,
        named: &Path,
        build_id: &str,
        instances: Instances<'_>,
    ) -> Result<(), ProbeError> {
        let started = Instant::now();
        let finished = self.run(copy, named, build_id, instances)?;
        let verdict = finished.verdict(named, build_id, self.timeout);
        tracing::debug!(
            library = %named.display(),
            ms = started.elapsed().as_millis() as u64,
            passed = verdict.is_ok(),
            "probed the build in a child process"
        );
        verdict
    }

    fn run(
        &self,
        copy: &Path,
        named: &Path,
        build_id: &str,
        instances: Instances<'_>,
    ) -> Result<Finished, ProbeError> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .arg(SUBCOMMAND)
            .arg(copy)
            .arg("--named")
            .arg(named)
            // The child need not read and hash the copy again (a fifth of a start with a library of
            // 11 MB): this process wrote it into a directory only it can write, and read it back.
            .arg("--build")
            .arg(build_id);
        match instances {
            Instances::Selected(Some(name)) => command.arg("--instance").arg(name),
            Instances::Selected(None) => &mut command,
            Instances::Every => command.arg("--every"),
        };
        let stderr = if self.show_output {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        // A group of its own, so that killing the group also ends whatever the plugin started.
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0);
        // SAFETY: the closure runs between fork and exec and makes one async-signal-safe system call.
        unsafe { command.pre_exec(die_with_parent) };
        let mut child = command.spawn().map_err(|source| ProbeError::Spawn {
            path: named.to_owned(),
            program: self.program.clone(),
            source,
        })?;
        let pid = child.id() as libc::pid_t;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        // Read while the child runs, so that a long report cannot fill the pipe and stall it.
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stdout.read_to_end(&mut bytes);
            bytes
        });
        let (exited, exit) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = exited.send(wait_without_reaping(pid));
        });
        let timed_out = matches!(
            exit.recv_timeout(self.timeout),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        // The child is not reaped yet, so its pid (the group's id) still names it and nothing else.
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let status = child.wait().map_err(|source| ProbeError::Wait {
            path: named.to_owned(),
            source,
        })?;
        // Every writer is gone: the group is dead, and what the plugin may have exec'd did not inherit
        // the report descriptor (close-on-exec), so the read ends.
        let bytes = reader.join().unwrap_or_default();
        let lines = String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        Ok(Finished {
            status,
            timed_out,
            lines,
        })
    }
}

/// In the child, between fork and exec: die when the thread that spawned us does, so that a probe
/// never outlives the process waiting for it (stopped by a signal, say).
fn die_with_parent() -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG only sets a flag of the calling process.
    let result = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Block until process `pid` has exited, leaving it to be reaped by its `Child`: until then its pid
/// cannot be reused, so killing it by pid stays safe.
fn wait_without_reaping(pid: libc::pid_t) -> io::Result<()> {
    loop {
        // SAFETY: siginfo_t is plain data, for which all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`, which outlives the call.
        let result = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if result == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// A probe process that ended (or was killed), with the lines it reported.
struct Finished {
    status: ExitStatus,
    timed_out: bool,
    lines: Vec<Value>,
}

impl Finished {
    fn verdict(&self, path: &Path, expected: &str, limit: Duration) -> Result<(), ProbeError> {
        let mut step = Step::Starting;
        let mut done = false;
        for line in &self.lines {
            if line.get("probe").is_some() {
                step = Step::Loading;
            } else if let Some(loaded) = line.get("loaded") {
                // The host's own probe is told the id (`--build`) and reports it back; the check bites
                // for a probe that hashed the copy itself.
                let probed = loaded["build_id"].as_str().unwrap_or_default();
                if probed != expected {
                    return Err(ProbeError::OtherBuild {
                        path: path.to_owned(),
                        probed: probed.to_owned(),
                        expected: expected.to_owned(),
                    });
                }
                step = Step::Loaded;
            } else if let Some(instance) = line.get("constructing").and_then(Value::as_str) {
                step = Step::Constructing(instance.to_owned());
            } else if let Some(instance) = line
                .get("constructed")
                .or_else(|| line.get("refused"))
                .and_then(|c| c["instance"].as_str())
            {
                step = Step::Constructed(instance.to_owned());
            } else if line.get("done").is_some() {
                done = true;
            }
        }
        let path = path.to_owned();
        if self.timed_out {
            return Err(ProbeError::TimedOut { path, limit, step });
        }
        if done && self.status.success() {
            return Ok(());
        }
        use std::os::unix::process::ExitStatusExt;
        let death = match (self.status.signal(), self.status.code()) {
            (Some(signal), _) => Death::Signal(signal),
            (None, Some(code)) => Death::Exit(code),
            (None, None) => Death::Unknown,
        };
        Err(ProbeError::Died { path, death, step })
    }
}

/// Why a build was refused by its probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot start a probe process ({}) to check {} before loading it: {source}; the host must be able to run its own binary", program.display(), path.display())]
    Spawn {
        path: PathBuf,
        program: PathBuf,
        source: io::Error,
    },
    #[error("cannot wait for the probe process of {}: {source}", path.display())]
    Wait { path: PathBuf, source: io::Error },
    #[error("{}: the probe process {death} {}, so the build was not loaded; {}", path.display(), step.during(), fix(step, death))]
    Died {
        path: PathBuf,
        death: Death,
        step: Step,
    },
    #[error("{}: the probe process was still {step} after {}, so the build was not loaded; {}", path.display(), seconds(*limit), step.hang_fix())]
    TimedOut {
        path: PathBuf,
        limit: Duration,
        step: Step,
    },
    #[error("{}: the probe loaded build {probed}, but the copy made to load is build {expected}; nothing was loaded (was the private copy changed meanwhile?)", path.display())]
    OtherBuild {
        path: PathBuf,
        probed: String,
        expected: String,
    },
}

/// How a probe process ended, when it did not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Death {
    Signal(i32),
    Exit(i32),
    Unknown,
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Death::Signal(signal) => match signal_name(*signal) {
                Some(name) => write!(f, "died of {name}"),
                None => write!(f, "died of signal {signal}"),
            },
            Death::Exit(code) => write!(f, "exited with code {code}"),
            Death::Unknown => f.write_str("ended"),
        }
    }
}

/// The last step a probe process reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Before it said anything: the program did not start as a probe.
    Starting,
    /// Mapping the library (its ELF initialisers run then) and checking its ABI.
    Loading,
    Loaded,
    Constructing(String),
    Constructed(String),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Starting => f.write_str("starting"),
            Step::Loading => f.write_str("loading the library (its ELF initialisers run then)"),
            Step::Loaded => f.write_str("choosing an instance after loading the library"),
            Step::Constructing(name) => write!(f, "constructing domain instance {name:?}"),
            Step::Constructed(name) => {
                write!(f, "finishing after constructing domain instance {name:?}")
            }
        }
    }
}

impl Step {
    fn during(&self) -> String {
        match self {
            Step::Starting => "before it started probing".into(),
            other => format!("while {other}"),
        }
    }

    fn hang_fix(&self) -> String {
        let what = match self {
            Step::Constructing(name) => format!("make the constructor of domain instance {name:?}"),
            Step::Loading => "make the library's load-time code (static initialisers)".into(),
            _ => "make the build's code".into(),
        };
        format!("{what} return, or raise [server] probe_timeout_seconds")
    }
}

fn fix(step: &Step, death: &Death) -> String {
    let output = "(--debug shows the probe's output)";
    match (step, death) {
        (Step::Starting, _) => {
            "the probe is this binary's hidden __probe subcommand; run the protean-host binary itself"
                .into()
        }
        (Step::Loading, _) => format!(
            "fix the code the library runs when it is loaded (static initialisers, .init_array) and rebuild {output}"
        ),
        (Step::Constructing(name), Death::Exit(_)) => format!(
            "the constructor of domain instance {name:?} must return, not exit the process; fix it and rebuild {output}"
        ),
        (Step::Constructing(name), _) => {
            format!("fix the constructor of domain instance {name:?} and rebuild {output}")
        }
        _ => format!("fix the crash and rebuild {output}"),
    }
}

/// `30 s`, or `1500 ms` for a limit that is not whole seconds.
fn seconds(limit: Duration) -> String {
    if limit.subsec_nanos() == 0 {
        format!("{} s", limit.as_secs())
    } else {
        format!("{} ms", limit.as_millis())
    }
}

/// The usual name of a signal that ends a process.
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGABRT => "SIGABRT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGSYS => "SIGSYS",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return None,
    })
}

/// The probe process itself (`protean-host __probe COPY --named PATH [--build ID] [--instance NAME |
/// --every]`): load `library` in place (it is the host's private copy, and this process is new, so no
/// copy is needed), construct `instances`, and report each step as one JSON line on stdout. `build` is
/// the id the host hashed the copy to; without it the copy is read and hashed here.
///
/// ```text
/// {"probe":1}
/// {"loaded":{"build_id":"…","instances":["domain","reporting"]}}
/// {"constructing":"domain"}
/// {"constructed":{"instance":"domain","registrations":[…]}}
/// {"done":true}
/// ```
///
/// A clean failure is a line too (`{"error":"…"}`, `{"refused":{"instance":…,"error":…}}`) followed
/// by `done`. Then the process ends at once, without running exit-time code of the plugin: the question
/// is whether the build loads and constructs.
pub fn child(
    library: &Path,
    named: &Path,
    build: Option<&str>,
    instances: Instances<'_>,
    log_level: u8,
) -> ! {
    let mut report = match Report::take_stdout() {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: the probe cannot set up its report: {error}");
            exit_now(1)
        }
    };
    report.line(&json!({ "probe": 1 }));
    let opened = match build {
        Some(build) => Library::load_copy(named, library, build),
        None => Library::open_in_place(named, library),
    };
    let loaded = match opened {
        Ok(loaded) => loaded,
        Err(error) => report.finish_with_error(&error.to_string()),
    };
    report.line(
        &json!({ "loaded": { "build_id": loaded.build_id(), "instances": loaded.instances() } }),
    );
    let names = match instances {
        Instances::Every => loaded.instances(),
        Instances::Selected(wanted) => match loaded.select(wanted) {
            Ok(name) => vec![name],
            Err(error) => report.finish_with_error(&error.to_string()),
        },
    };
    for name in names {
        report.line(&json!({ "constructing": name }));
        match loaded.instantiate(&name, log_level) {
            Ok(plugin) => {
                report.line(&json!({ "constructed": { "instance": name, "registrations": plugin.registrations() } }));
                // Its shutdown is plugin code the host does not run at this point either.
                std::mem::forget(plugin);
            }
            Err(error) => {
                report.line(&json!({ "refused": { "instance": name, "error": error.to_string() } }))
            }
        }
    }
    report.finish()
}

/// Where the probe's lines go: the original stdout. Everything else written to stdout (by the plugin)
/// goes to stderr instead, so it cannot break a line.
struct Report {
    out: std::fs::File,
}

impl Report {
    fn take_stdout() -> io::Result<Self> {
        // Duplicated close-on-exec: nothing the plugin starts inherits the report pipe.
        let out = io::stdout().as_fd().try_clone_to_owned()?;
        // SAFETY: dup2 on descriptors 2 and 1 of this process; Rust's stdout keeps writing to fd 1.
        if unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { out: out.into() })
    }

    /// One line, written with one call: a crash right after it cannot leave half of it.
    fn line(&mut self, value: &Value) {
        let mut text = value.to_string();
        text.push('\n');
        if self.out.write_all(text.as_bytes()).is_err() {
            // Nobody is listening any more.
            exit_now(1);
        }
    }

    fn finish_with_error(mut self, error: &str) -> ! {
        self.line(&json!({ "error": error }));
        self.finish()
    }

    fn finish(mut self) -> ! {
        self.line(&json!({ "done": true }));
        exit_now(0)
    }
}

/// End the process now: no destructors, no atexit handlers, no plugin exit-time code.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process; nothing of it is used afterwards.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn finished(status: i32, timed_out: bool, lines: &[Value]) -> Finished {
        Finished {
            status: ExitStatus::from_raw(status),
            timed_out,
            lines: lines.to_vec(),
        }
    }

    fn loaded(build: &str) -> Value {
        json!({ "loaded": { "build_id": build, "instances": ["domain"] } })
    }

    #[test]
    fn a_probe_that_reported_done_and_exited_zero_passes() {
        let lines = [
            json!({"probe": 1}),
            loaded("b1"),
            json!({"constructing": "domain"}),
            json!({"constructed": {"instance": "domain", "registrations": []}}),
            json!({"done": true}),
        ];
        let verdict =
            finished(0, false, &lines).verdict(Path::new("lib.so"), "b1", Duration::from_secs(30));
        assert!(verdict.is_ok(), "{verdict:?}");
    }

    #[test]
    fn a_death_names_the_signal_and_the_step() {
        let lines = [
            json!({"probe": 1}),
            loaded("b1"),
            json!({"constructing": "domain"}),
        ];
        // A raw wait status of 6: killed by signal 6 (SIGABRT).
        let error = finished(libc::SIGABRT, false, &lines)
            .verdict(Path::new("lib.so"), "b1", Duration::from_secs(30))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "lib.so: the probe process died of SIGABRT while constructing domain instance \"domain\", so the build was not loaded; fix the constructor of domain instance \"domain\" and rebuild (--debug shows the probe's output)"
        );
        let error = finished(libc::SIGSEGV, false, &lines[..1])
            .verdict(Path::new("lib.so"), "b1", Duration::from_secs(30))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("died of SIGSEGV while loading the library"),
            "{error}"
        );
    }

    #[test]
    fn an_exit_without_done_is_a_failure_even_with_code_zero() {
        let lines = [
            json!({"probe": 1}),
            loaded("b1"),
            json!({"constructing": "domain"}),
        ];
        for code in [0, 3] {
            let error = finished(code << 8, false, &lines)
                .verdict(Path::new("lib.so"), "b1", Duration::from_secs(30))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("exited with code {code} while constructing")),
                "{error}"
            );
            assert!(
                error.contains("must return, not exit the process"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_timeout_names_the_limit_and_the_setting() {
        let lines = [
            json!({"probe": 1}),
            loaded("b1"),
            json!({"constructing": "domain"}),
        ];
        let error = finished(libc::SIGKILL, true, &lines)
            .verdict(Path::new("lib.so"), "b1", Duration::from_secs(2))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "lib.so: the probe process was still constructing domain instance \"domain\" after 2 s, so the build was not loaded; make the constructor of domain instance \"domain\" return, or raise [server] probe_timeout_seconds"
        );
    }

    #[test]
    fn another_build_than_the_one_copied_is_refused() {
        let lines = [json!({"probe": 1}), loaded("b2"), json!({"done": true})];
        let error = finished(0, false, &lines)
            .verdict(Path::new("lib.so"), "b1", Duration::from_secs(30))
            .unwrap_err();
        assert!(matches!(error, ProbeError::OtherBuild { .. }), "{error}");
    }

    /// A shell standing in for the probe program: the real process machinery, a scripted child.
    fn shell(script: &str, limit: Duration) -> Probe {
        Probe::with_program("/bin/sh", limit).args(["-c", script, "sh"])
    }

    #[test]
    fn a_probe_past_its_limit_is_killed_with_what_it_started() {
        // The background sleep holds the report pipe: only killing the whole group ends the read.
        let probe = shell("sleep 60 & sleep 60", Duration::from_millis(300));
        let started = Instant::now();
        let finished = probe
            .run(
                Path::new("copy.so"),
                Path::new("lib.so"),
                "b1",
                Instances::Every,
            )
            .unwrap();
        assert!(finished.timed_out);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_real_death_by_signal_is_named_with_the_last_step() {
        let probe = shell(
            r#"echo '{"probe":1}'; kill -ABRT $$"#,
            Duration::from_secs(30),
        );
        let error = probe
            .check(
                Path::new("copy.so"),
                Path::new("lib.so"),
                "b1",
                Instances::Selected(None),
            )
            .unwrap_err()
            .to_string();
        assert!(
            error
                .starts_with("lib.so: the probe process died of SIGABRT while loading the library"),
            "{error}"
        );
    }

    #[test]
    fn a_program_that_is_not_a_probe_is_named_as_such() {
        let error = finished(2 << 8, false, &[])
            .verdict(Path::new("lib.so"), "b1", Duration::from_secs(30))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("exited with code 2 before it started probing"),
            "{error}"
        );
    }
}
