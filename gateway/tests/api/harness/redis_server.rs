//! A real Redis per test (or benchmark): random loopback port, temp dir, AOF on (so a restart
//! keeps its data), killed on drop. Shared by the integration tests and the benchmarks (which
//! include this file by path), so it depends on nothing but std, tokio, redis and tempfile.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A picked free loopback port (the tiny race with another process is retried by callers).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn redis_binary() -> PathBuf {
    for candidate in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        let path = PathBuf::from(candidate);
        if path.exists() {
            return path;
        }
    }
    panic!("redis-server not found: run scripts/test.sh, which installs it");
}

/// A real Redis, private to one test: random port, temp dir, AOF on (so a restart keeps
/// its data), killed on drop.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    fsync: &'static str,
    child: Option<Child>,
}

impl RedisServer {
    /// AOF with `appendfsync always`: a restart loses nothing (what the outage tests need).
    pub async fn start() -> Self {
        Self::start_with_fsync("always").await
    }

    /// AOF with the given `appendfsync` policy (`always`, `everysec` — production's — or `no`).
    pub async fn start_with_fsync(policy: &'static str) -> Self {
        for _ in 0..5 {
            let mut server = RedisServer {
                port: free_port(),
                dir: tempfile::tempdir().expect("temp dir"),
                fsync: policy,
                child: None,
            };
            if server.launch().await {
                return server;
            }
        }
        panic!("could not start redis-server");
    }

    async fn launch(&mut self) -> bool {
        let child = Command::new(redis_binary())
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                self.fsync,
                "--maxmemory-policy",
                "noeviction",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        for _ in 0..200 {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            if self.ping().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (connections refused until `restart`).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory; the AOF brings the data back.
    pub async fn restart(&mut self) {
        assert!(self.launch().await, "redis-server restart");
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
