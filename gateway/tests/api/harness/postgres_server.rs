//! A real PostgreSQL per test: `initdb` into a temp dir, `postgres` on a random loopback port
//! (socket and lock files in that dir too), trust authentication for the `postgres` superuser,
//! fsync and synchronous commits left on. `initdb` and `postgres` refuse to run as root, so as
//! root they run through `runuser` as the `postgres` system user (or `nobody`). Stopping is an
//! immediate shutdown (SIGQUIT to the postmaster), so `restart` goes through crash recovery:
//! what was committed must still be there.
//!
//! Shared by the integration tests and the benchmarks (which include this file by path), so
//! it depends on nothing but std, tokio-postgres and tempfile.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// How long a start (or restart, with crash recovery) may take before it counts as failed.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an immediate shutdown may take before the postmaster is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The `bin` dir of the highest PostgreSQL version under /usr/lib/postgresql.
fn postgres_bin_dir() -> PathBuf {
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: Vec<u32> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").exists() && bin.join("postgres").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL not found under /usr/lib/postgresql/*/bin: \
             run scripts/test.sh, which installs postgresql"
        ),
    }
}

fn running_as_root() -> bool {
    // The effective uid, from /proc (no libc in the test dependencies).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The unprivileged user to run PostgreSQL as when we are root.
fn unprivileged_user() -> String {
    let exists = |user: &str| {
        Command::new("id")
            .args(["-u", user])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if exists("postgres") {
        "postgres".into()
    } else {
        "nobody".into()
    }
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A real PostgreSQL, private to one test: random port, temp dir, stopped and removed on drop.
pub struct PostgresServer {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `Some(user)` when running as root: the programs run through `runuser -u user --`.
    user: Option<String>,
    child: Option<Child>,
}

impl PostgresServer {
    pub async fn start() -> Self {
        let bin = postgres_bin_dir();
        let user = running_as_root().then(unprivileged_user);
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(user) = &user {
            let status = Command::new("chown")
                .args(["-R", user])
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(status.success(), "chown {user} {}", dir.path().display());
        }
        let mut server = PostgresServer {
            port: 0,
            dir,
            bin,
            user,
            child: None,
        };
        server.initdb().await;
        for _ in 0..5 {
            server.port = free_port();
            if server.launch().await {
                return server;
            }
        }
        panic!("could not start postgres; its log:\n{}", server.log_tail());
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A command running `program` from the PostgreSQL bin dir, as the unprivileged user when
    /// we are root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        };
        command.current_dir(self.dir.path()).stdin(Stdio::null());
        command
    }

    async fn initdb(&self) {
        let mut command = self.command("initdb");
        command.arg("-D").arg(self.data_dir()).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            // Only skips initdb's own fsyncs; the server keeps fsync on.
            "--no-sync",
        ]);
        let output = tokio::process::Command::from(command)
            .output()
            .await
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Starts the postmaster on `self.port`; `false` if it exits (port taken) or never answers.
    async fn launch(&mut self) -> bool {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the postgres log");
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                // The defaults, spelled out: DESIGN.md §7 wants fsync on commit.
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
                // Many servers run side by side in one test run: keep each one small.
                "-c",
                "shared_buffers=16MB",
                "-c",
                "max_connections=40",
            ])
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log);
        self.child = Some(command.spawn().expect("spawn postgres"));
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            if self.answers().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.stop();
        false
    }

    /// Whether *our* server answers on the port (not another test's that took it meanwhile).
    async fn answers(&self) -> bool {
        let Ok(Ok((client, connection))) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio_postgres::connect(&self.url(), NoTls),
        )
        .await
        else {
            return false;
        };
        let task = tokio::spawn(connection);
        let ours = match client.query_one("SHOW data_directory", &[]).await {
            Ok(row) => row
                .try_get::<_, String>(0)
                .is_ok_and(|dir| same_path(Path::new(&dir), &self.data_dir())),
            Err(_) => false,
        };
        drop(client);
        let _ = task.await;
        ours
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A plain connection as the superuser, to look behind the store's back.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), NoTls)
            .await
            .expect("connect to the test PostgreSQL");
        tokio::spawn(connection);
        client
    }

    fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Immediate shutdown (connections refused until `restart`); the next start recovers from
    /// the WAL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The child may be `runuser`, which would not pass a kill on: signal the postmaster.
        let pid = self.postmaster_pid();
        match pid {
            Some(pid) => signal(pid, "QUIT"),
            None => {
                let _ = child.kill();
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(pid) = pid {
            signal(pid, "KILL");
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts it again on the same port and data dir; committed data is still there.
    pub async fn restart(&mut self) {
        assert!(
            self.launch().await,
            "postgres restart on port {}; its log:\n{}",
            self.port,
            self.log_tail()
        );
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}
