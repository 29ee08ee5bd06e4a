//! A real Redis server per test, on a free loopback port, stopped when dropped.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running `redis-server`.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// More `redis-server` arguments, kept for a restart.
    args: Vec<String>,
}

impl RedisServer {
    /// Start one. Fails the test when redis-server is not installed: tests never skip.
    #[track_caller]
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// One on `port` (chosen by the test, to start the server after a client that waits for it).
    #[track_caller]
    pub fn start_on(port: u16) -> Self {
        Self::launched(port, &[])
    }

    /// One started with more arguments (`["--hz", "1"]`).
    #[track_caller]
    pub fn start_with(args: &[&str]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Self::launched(port, args)
    }

    #[track_caller]
    fn launched(port: u16, args: &[&str]) -> Self {
        let mut server = Self {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        server.launch();
        server
    }

    #[track_caller]
    fn launch(&mut self) {
        let child = Command::new("redis-server")
            // An append-only file, so that a restart (the restart test) keeps streams and groups.
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server ({e}); scripts/test installs it (apt-get install redis-server)"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A server on TLS only (`--port 0 --tls-port`), with `server.pem`, `server.key` and `ca.pem` of
    /// `certs`, asking clients for a certificate signed by that CA.
    #[track_caller]
    pub fn start_tls(certs: &std::path::Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let file = |name: &str| certs.join(name).display().to_string();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--tls-cert-file", &file("server.pem"), "--tls-key-file", &file("server.key")])
            .args(["--tls-ca-cert-file", &file("ca.pem"), "--tls-auth-clients", "yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server ({e}); scripts/test installs it (apt-get install redis-server)"));
        let server = Self {
            port,
            child: Some(child),
            dir: tempfile::tempdir().unwrap(),
            args: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ping = Command::new("redis-cli")
                .args([
                    "--tls",
                    "--cacert",
                    &file("ca.pem"),
                    "--cert",
                    &file("client.pem"),
                ])
                .args([
                    "--key",
                    &file("client.key"),
                    "-h",
                    "localhost",
                    "-p",
                    &port.to_string(),
                    "PING",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"));
            if ping.unwrap_or(false) {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server (TLS) on port {port} did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server answers PING.
    fn answers(&self) -> bool {
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        conn.write_all(b"PING\r\n").is_ok()
            && conn.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn uri(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The config section pointing at this server, with fast reclaim for tests.
    pub fn config(&self) -> String {
        format!(
            "[brokers.default]\nuri = \"{}\"\nclaim_idle_ms = 1000\nreclaim_interval_ms = 500\nblock_ms = 200\n",
            self.uri()
        )
    }

    /// Stop the server gracefully (SIGTERM: it writes its append-only file first).
    #[allow(unsafe_code)]
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            // A paused server handles the SIGTERM only once it runs again.
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
            let _ = child.wait();
        }
    }

    /// Freeze the server (SIGSTOP): connections stay open and commands get no answer.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Let a paused server answer again (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    #[allow(unsafe_code)]
    fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child process.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Start it again on the same port.
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Stop it, keep it down for `hold` (a timed outage, not a wait for anything), start it again.
    #[track_caller]
    pub fn outage(&mut self, hold: Duration) {
        self.stop();
        std::thread::sleep(hold);
        self.launch();
    }

    /// Entries delivered to a consumer and not yet acknowledged, over every group of every stream.
    pub fn pending(&self) -> u64 {
        let keys = self.cli(&["KEYS", "*"]);
        keys.lines()
            .filter(|key| self.cli(&["TYPE", key]).trim() == "stream")
            .flat_map(|stream| self.info(&["XINFO", "GROUPS", stream], "pending"))
            .map(|count| count.parse::<u64>().expect("a pending count"))
            .sum()
    }

    /// Whether every consumer group of `stream` was delivered all of it (its last-delivered-id is the
    /// stream's last-generated-id: facts that cannot drift, unlike `lag`) and acknowledged all it was
    /// delivered. False for a stream without groups.
    pub fn groups_drained(&self, stream: &str) -> bool {
        let last = self.info(&["XINFO", "STREAM", stream], "last-generated-id");
        let delivered = self.info(&["XINFO", "GROUPS", stream], "last-delivered-id");
        let pending = self.info(&["XINFO", "GROUPS", stream], "pending");
        !delivered.is_empty()
            && delivered.iter().all(|id| last.contains(id))
            && pending.iter().all(|count| count == "0")
    }

    /// The values of `field` in the reply of an `XINFO` command (`redis-cli` prints each field's name,
    /// then its value, a line each): one per group for `XINFO GROUPS`.
    fn info(&self, command: &[&str], field: &str) -> Vec<String> {
        let out = self.cli(command);
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        lines
            .windows(2)
            .filter(|pair| pair[0] == field)
            .map(|pair| pair[1].to_owned())
            .collect()
    }

    /// Run many commands at once (`redis-cli --pipe`, the protocol written out), in order.
    #[track_caller]
    pub fn pipe(&self, commands: &[Vec<String>]) {
        let mut protocol = Vec::new();
        for args in commands {
            protocol.extend(format!("*{}\r\n", args.len()).bytes());
            for arg in args {
                protocol.extend(format!("${}\r\n{arg}\r\n", arg.len()).bytes());
            }
        }
        let mut child = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--pipe"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("redis-cli runs");
        child.stdin.take().unwrap().write_all(&protocol).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("errors: 0"), "redis-cli --pipe: {text}");
    }

    /// Run a command with redis-cli and return its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
