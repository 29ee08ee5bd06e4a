//! A `protean-host` server running in the background, whose log lines the test can wait for.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    sync::mpsc::{self, Receiver},
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
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if needles.iter().all(|n| line.contains(n)) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with {needles:?} within {limit:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Wait until a log line contains one of `needles`; fails after `limit`.
    #[track_caller]
    pub fn wait_for_any(&mut self, needles: &[&str], limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if needles.iter().any(|n| line.contains(n)) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with any of {needles:?} within {limit:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Whether a log line seen so far, or one arriving within `limit`, contains every one of `needles`.
    pub fn seen_or_wait(&mut self, needles: &[&str], limit: Duration) -> bool {
        self.line_seen_or_arriving(needles, limit).is_some()
    }

    /// The first log line since the start, seen so far or arriving within `limit`, that contains
    /// every one of `needles`; fails after `limit`. For a line the process may log before one an
    /// earlier wait stopped at (a worker's line before "engine started"), which `wait_for` never sees.
    #[track_caller]
    pub fn wait_for_since_start(&mut self, needles: &[&str], limit: Duration) -> String {
        match self.line_seen_or_arriving(needles, limit) {
            Some(line) => line,
            None => panic!(
                "no log line with {needles:?} within {limit:?}; saw:\n{}",
                self.seen.join("\n")
            ),
        }
    }

    fn line_seen_or_arriving(&mut self, needles: &[&str], limit: Duration) -> Option<String> {
        let matches = |line: &str| needles.iter().all(|n| line.contains(n));
        if let Some(line) = self.seen.iter().find(|line| matches(line)) {
            return Some(line.clone());
        }
        let deadline = Instant::now() + limit;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line.clone());
            if matches(&line) {
                return Some(line);
            }
        }
        None
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
