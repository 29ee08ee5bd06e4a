//! A `protean-host` server running in the background, whose log lines the test can wait for.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use super::run::HostCommand;

/// How long a server may take to end by itself, or after a stop: longer than any test's run (test
/// mode gives up after its 60 s timeout).
const EXIT_LIMIT: Duration = Duration::from_secs(180);

/// A running server process.
pub struct Server {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl HostCommand {
    /// Start the command in the background, collecting its stderr.
    pub fn spawn(self) -> Server {
        let mut command = self.into_command();
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("protean-host starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Server {
            child,
            lines,
            seen: Vec::new(),
        }
    }
}

impl Server {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Wait until a log line contains every one of `needles`; fails after `limit`.
    #[track_caller]
    pub fn wait_for(&mut self, needles: &[&str], limit: Duration) -> String {
        let all = |line: &str| needles.iter().all(|n| line.contains(n));
        // A match, not a closure: the failure is reported at the test's line (`track_caller`).
        match self.next_line(all, limit) {
            Ok(line) => line,
            Err(end) => self.no_line(&format!("with {needles:?}"), limit, end),
        }
    }

    /// Wait until a log line contains one of `needles`; fails after `limit`.
    #[track_caller]
    pub fn wait_for_any(&mut self, needles: &[&str], limit: Duration) -> String {
        let any = |line: &str| needles.iter().any(|n| line.contains(n));
        match self.next_line(any, limit) {
            Ok(line) => line,
            Err(end) => self.no_line(&format!("with any of {needles:?}"), limit, end),
        }
    }

    /// Whether a log line seen so far, or one arriving within `limit`, contains every one of `needles`.
    pub fn seen_or_wait(&mut self, needles: &[&str], limit: Duration) -> bool {
        self.line_seen_or_arriving(needles, limit).is_ok()
    }

    /// The first log line since the start, seen so far or arriving within `limit`, that contains
    /// every one of `needles`; fails after `limit`. For a line the process may log before one an
    /// earlier wait stopped at (a worker's line before "engine started"), which `wait_for` never sees.
    #[track_caller]
    pub fn wait_for_since_start(&mut self, needles: &[&str], limit: Duration) -> String {
        match self.line_seen_or_arriving(needles, limit) {
            Ok(line) => line,
            Err(end) => self.no_line(&format!("with {needles:?}"), limit, end),
        }
    }

    fn line_seen_or_arriving(
        &mut self,
        needles: &[&str],
        limit: Duration,
    ) -> Result<String, RecvTimeoutError> {
        let all = |line: &str| needles.iter().all(|n| line.contains(n));
        match self.seen.iter().find(|line| all(line)) {
            Some(line) => Ok(line.clone()),
            None => self.next_line(all, limit),
        }
    }

    /// The next line arriving within `limit` that `matches`; every line read is kept in `seen`.
    fn next_line(
        &mut self,
        matches: impl Fn(&str) -> bool,
        limit: Duration,
    ) -> Result<String, RecvTimeoutError> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left)?;
            self.seen.push(line.clone());
            if matches(&line) {
                return Ok(line);
            }
        }
    }

    /// Fail a wait for a line `what`: the process may have exited (its output ended) or still run.
    #[track_caller]
    fn no_line(&mut self, what: &str, limit: Duration, end: RecvTimeoutError) -> ! {
        let why = match end {
            RecvTimeoutError::Timeout => format!("within {limit:?}"),
            RecvTimeoutError::Disconnected => {
                // Its stderr closed: it is exiting; give it a moment to be reaped.
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut status = self.exited();
                while status.is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                    status = self.exited();
                }
                match status {
                    Some(status) => format!("before protean-host exited ({status})"),
                    None => "before protean-host closed its output".into(),
                }
            }
        };
        panic!("no log line {what} {why}; saw:\n{}", self.seen.join("\n"))
    }

    /// The address its health server bound (configured on port 0), from its "listening" line.
    #[track_caller]
    pub fn health_address(&mut self) -> String {
        let line = self.wait_for(&["health server listening"], Duration::from_secs(60));
        line.split("address=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned()
    }

    /// How the process ended, if it has (without waiting).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait on protean-host")
    }

    /// Every line seen so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Send a signal.
    #[allow(unsafe_code)]
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with the pid of our own child process has no memory effects.
        let result = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(result, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Stop the process as a supervisor would (SIGTERM), and wait for it: its code and all its stderr.
    pub fn stop(self) -> (Option<i32>, String) {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    /// Stop the process, asserting that it exits cleanly (code 0); its stderr.
    #[track_caller]
    pub fn stop_cleanly(self) -> String {
        let pid = self.pid();
        let (code, log) = self.stop();
        assert_eq!(code, Some(0), "protean-host {pid} stops cleanly:\n{log}");
        log
    }

    /// Wait for the process to exit; returns its code (None if killed by a signal) and all its stderr.
    /// A process still running after [`EXIT_LIMIT`] is killed and the test fails with its log: a
    /// server that never ends fails its test instead of hanging the suite.
    #[track_caller]
    pub fn wait(mut self) -> (Option<i32>, String) {
        let pid = self.pid();
        let (exited, watch) = mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let late = watch.recv_timeout(EXIT_LIMIT) == Err(mpsc::RecvTimeoutError::Timeout);
            if late {
                // SAFETY: kill(2) on our own child, not reaped yet (wait below has not returned).
                #[allow(unsafe_code)]
                unsafe {
                    libc::kill(pid, libc::SIGKILL)
                };
            }
            late
        });
        let status = self.child.wait().expect("wait for protean-host");
        let _ = exited.send(());
        let late = watchdog.join().unwrap_or(false);
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        let log = self.seen.join("\n");
        assert!(
            !late,
            "protean-host {pid} was still running after {EXIT_LIMIT:?}, and was killed:\n{log}"
        );
        (status.code(), log)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
