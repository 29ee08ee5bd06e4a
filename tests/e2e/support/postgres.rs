//! A real PostgreSQL cluster per test, in a temporary directory on a free loopback port, stopped when
//! dropped. Shared by the host's store tests, the end-to-end tests and the bench (through `#[path]`), so
//! it uses the standard library, `tempfile` and the host's own types only.
//!
//! initdb refuses to run as root; when the tests run as root the cluster is created and run as the
//! `postgres` user of Debian's package (through `setpriv`, which execs in place, so the child process
//! is the postmaster itself and signals reach it).

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running PostgreSQL cluster.
#[derive(Debug)]
pub struct PgServer {
    port: u16,
    bin: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
    durable: bool,
    /// More `-c name=value` settings.
    settings: Vec<String>,
}

impl PgServer {
    /// Create a cluster and start it. Fails the test when PostgreSQL is not installed: tests never skip.
    /// Test clusters trade durability for speed (`fsync=off`); a clean stop still keeps everything.
    #[track_caller]
    pub fn start() -> Self {
        Self::create(false)
    }

    /// A cluster with PostgreSQL's default durability (every commit flushed), for measurements.
    #[track_caller]
    #[allow(dead_code, reason = "the bench measures on it; the tests do not")]
    pub fn durable() -> Self {
        Self::durable_with(&[])
    }

    /// A durable cluster with more `-c name=value` settings (the bench's statement statistics).
    #[track_caller]
    #[allow(dead_code, reason = "the bench measures on it; the tests do not")]
    pub fn durable_with(settings: &[&str]) -> Self {
        let mut server = Self::prepare(true, Self::free_port());
        server.settings = settings.iter().map(|s| (*s).to_owned()).collect();
        server.launch();
        server
    }

    /// A cluster on `port` (chosen by the test, to start the server after a client that waits for it).
    #[allow(dead_code, reason = "the bench does not use it")]
    #[track_caller]
    pub fn start_on(port: u16) -> Self {
        Self::create_on(false, port)
    }

    #[track_caller]
    fn create(durable: bool) -> Self {
        Self::create_on(durable, Self::free_port())
    }

    #[track_caller]
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    #[track_caller]
    fn create_on(durable: bool, port: u16) -> Self {
        let mut server = Self::prepare(durable, port);
        server.launch();
        server
    }

    /// A cluster that accepts TCP connections over TLS only (`hostssl`), with the certificate and key
    /// `server.pem` and `server.key` of `certs`.
    #[allow(dead_code, reason = "the bench does not use it")]
    #[track_caller]
    pub fn start_tls(certs: &std::path::Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = Self::prepare(false, port);
        for file in ["server.pem", "server.key"] {
            let to = server.data().join(file);
            std::fs::copy(certs.join(file), &to).unwrap();
            // PostgreSQL refuses a key others can read; the server runs as postgres when we are root.
            run(Command::new("chmod").arg("0600").arg(&to));
            if is_root() {
                run(Command::new("chown").arg("postgres:postgres").arg(&to));
            }
        }
        std::fs::write(
            server.data().join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .unwrap();
        server.settings = [
            "ssl=on",
            "ssl_cert_file=server.pem",
            "ssl_key_file=server.key",
        ]
        .map(String::from)
        .to_vec();
        server.launch();
        server
    }

    #[track_caller]
    fn prepare(durable: bool, port: u16) -> Self {
        let bin = bindir();
        let dir = tempfile::Builder::new()
            .prefix("protean-pg")
            .tempdir()
            .unwrap();
        let server = Self {
            port,
            bin,
            child: None,
            dir,
            durable,
            settings: Vec::new(),
        };
        server.init();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command run as the cluster's owner: this user, or `postgres` when this user is root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("setpriv");
            command
                .args([
                    "--reuid=postgres",
                    "--regid=postgres",
                    "--init-groups",
                    "--",
                ])
                .arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    #[track_caller]
    fn init(&self) {
        if is_root() {
            // The postgres user must reach its data and socket directories inside our temp dir.
            run(Command::new("chmod").arg("0755").arg(self.dir.path()));
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(self.dir.path()));
        }
        run(self
            .command("initdb")
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "-D",
            ])
            .arg(self.data()));
    }

    #[track_caller]
    fn launch(&mut self) {
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.path().display()))
            .args(["-c", &format!("fsync={}", if self.durable { "on" } else { "off" })])
            .args(["-c", "max_connections=200"])
            .args(self.settings.iter().flat_map(|s| ["-c", s]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start postgres ({e}); scripts/test installs it (apt-get install postgresql)"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ready() {
            assert!(
                Instant::now() < deadline,
                "postgres on port {} did not become ready",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the server accepts connections (`pg_isready`).
    fn ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The port it listens on.
    #[allow(dead_code, reason = "the bench does not use it")]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgresql://postgres@127.0.0.1:PORT/postgres`.
    pub fn uri(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The store's configuration for this cluster, for opening it in-process.
    pub fn store_config(&self) -> protean_host::store::PostgresConfig {
        protean_host::store::PostgresConfig {
            uri: self.uri().into(),
            pool_size: 4,
            statement_timeout: Duration::from_secs(10),
        }
    }

    /// The `[store]` section pointing at this cluster.
    pub fn config(&self) -> String {
        format!(
            "[store]\nprovider = \"postgres\"\nuri = \"{}\"\n",
            self.uri()
        )
    }

    /// A psql session that runs what is written to its stdin and stays connected until its stdin is
    /// closed or it is killed: a client holding a transaction open, as a process frozen in one does.
    #[allow(dead_code, reason = "the tests use it; the bench does not")]
    pub fn session(&self) -> Child {
        Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-d", &self.uri()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql starts")
    }

    /// Run SQL with psql; its output (unaligned, tuples only).
    #[track_caller]
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.uri(),
                "-c",
                sql,
            ])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// From now on TCP connections must give `password` (user `postgres`); psql through this
    /// helper stops working.
    #[allow(dead_code, reason = "the bench does not use it")]
    #[track_caller]
    pub fn require_password(&self, password: &str) {
        self.psql(&format!("ALTER USER postgres PASSWORD '{password}'"));
        std::fs::write(
            self.data().join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        self.psql("SELECT pg_reload_conf()");
    }

    /// The CPU time the cluster has used: the postmaster's, its live children's, and that of the
    /// children it has reaped (sessions that ended), from /proc. Read before and after a run, the
    /// difference is what the run cost the database.
    #[allow(dead_code, reason = "the bench measures with it; the tests do not")]
    pub fn cpu(&self) -> Duration {
        let Some(postmaster) = self.child.as_ref().map(Child::id) else {
            return Duration::ZERO;
        };
        // Fields after the command's closing parenthesis: state is 0, ppid 1, utime 11, stime 12,
        // cutime 13, cstime 14 (proc(5), counted from 1 as fields 3, 4, 14..17).
        let fields = |stat: &str| -> Vec<u64> {
            let rest = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
            rest.split(' ').map(|f| f.parse().unwrap_or(0)).collect()
        };
        let mut ticks = 0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let pid: u32 = entry.file_name().to_string_lossy().parse().unwrap_or(0);
            let f = fields(&stat);
            if f.len() < 15 {
                continue;
            }
            if pid == postmaster {
                ticks += f[11] + f[12] + f[13] + f[14];
            } else if f[1] == u64::from(postmaster) {
                ticks += f[11] + f[12];
            }
        }
        let per_second: u64 = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100);
        Duration::from_millis(ticks * 1000 / per_second)
    }

    /// Stop the server (fast shutdown: sessions are ended, everything is checkpointed).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port, with the same data.
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Where PostgreSQL's server binaries are: `pg_config --bindir`, else Debian's versioned directory.
#[track_caller]
fn bindir() -> PathBuf {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .max();
    from_pg_config
        .into_iter()
        .chain(debian)
        .find(|dir| dir.join("initdb").is_file())
        .unwrap_or_else(|| panic!("PostgreSQL's initdb is not installed; scripts/test installs it (apt-get install postgresql)"))
}

#[track_caller]
fn run(command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
