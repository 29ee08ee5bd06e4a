//! Running the real `protean-host` binary.

use std::{
    path::Path,
    process::{Command, Output},
};

/// The probe process whose pid a hanging bad build wrote to `pid_file` (`BAD_DOMAIN_PID_FILE`) is
/// gone: killed and reaped, not left behind.
#[track_caller]
pub fn assert_probe_gone(pid_file: &Path) {
    let pid = std::fs::read_to_string(pid_file).expect("the hanging constructor wrote its pid");
    assert!(
        !Path::new("/proc").join(pid.trim()).exists(),
        "the hung probe process {pid} still exists"
    );
}

use super::host_binary;

/// A `protean-host` invocation with a clean environment for the variables it reads.
pub struct HostCommand {
    command: Command,
}

/// Start describing a run of the binary in `cwd`.
pub fn host(cwd: &Path) -> HostCommand {
    let mut command = Command::new(host_binary());
    command
        .current_dir(cwd)
        .env_remove("PROTEAN_DOMAIN")
        .env_remove("PROTEAN_ENV")
        .env("NO_COLOR", "1");
    HostCommand { command }
}

impl HostCommand {
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// Limit the process's data memory to `bytes` (`RLIMIT_DATA`), as a container's limit would: an
    /// allocation past it fails.
    #[allow(unsafe_code)]
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        use std::os::unix::process::CommandExt;
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: bytes,
        };
        // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent; the closure
        // allocates nothing between fork and exec.
        unsafe {
            self.command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_DATA, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        self
    }

    /// Run to completion, with `input` on stdin.
    pub fn output_with_stdin(mut self, input: &str) -> Finished {
        use std::io::Write;
        self.command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = self.command.spawn().expect("protean-host runs");
        // Written from its own thread: a child that answers while it reads would otherwise fill
        // its stdout pipe and wait for us while we wait for it to read.
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let input = input.to_owned();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let output = child.wait_with_output().expect("protean-host runs");
        writer.join().expect("stdin writer").expect("write stdin");
        Finished(output)
    }

    pub(super) fn into_command(self) -> Command {
        self.command
    }

    /// Run to completion.
    pub fn output(mut self) -> Finished {
        Finished(self.command.output().expect("protean-host runs"))
    }
}

/// A finished run.
pub struct Finished(pub Output);

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.0.status.code()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }

    /// Assert the exit code, showing the output when it differs.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Self {
        assert_eq!(
            self.code(),
            Some(code),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }

    /// The lines of stderr that start with `error:`.
    pub fn error_lines(&self) -> Vec<String> {
        self.stderr()
            .lines()
            .filter(|l| l.starts_with("error:"))
            .map(str::to_owned)
            .collect()
    }
}
