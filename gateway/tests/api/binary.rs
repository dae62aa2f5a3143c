//! The real `gateway` binary as a child process: started on port 0 in a data dir, driven over
//! HTTP, stopped with SIGTERM or killed with SIGKILL.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the binary may take to say it listens (startup recovery included).
const START_TIMEOUT: Duration = Duration::from_secs(30);

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::Value;

use crate::redis_server::RedisServer;

pub const BIN: &str = env!("CARGO_BIN_EXE_gateway");

pub struct Gateway {
    pub child: Child,
    pub addr: String,
    /// What it printed up to its listening line.
    pub banner: String,
}

impl Gateway {
    pub fn start(data: &std::path::Path, redis: Option<&RedisServer>) -> Self {
        Self::start_with(data, redis, "127.0.0.1:0", &[])
    }

    /// As [`Gateway::start`], on `listen`, with extra environment variables.
    pub fn start_with(
        data: &std::path::Path,
        redis: Option<&RedisServer>,
        listen: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--sandbox", "--listen", listen, "--data-dir"])
            .arg(data)
            .envs(env.iter().copied())
            .env("GATEWAY__STORE__RECOVERY_MIN_AGE_MS", "100")
            .env("GATEWAY__STORE__RECOVERY_INTERVAL_MS", "100")
            .env_remove("GATEWAY__STORE__URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match redis {
            Some(redis) => command.env("GATEWAY__REDIS__URL", redis.url()),
            None => command.env_remove("GATEWAY__REDIS__URL"),
        };
        let mut child = command.spawn().unwrap();
        // Drain both pipes for the whole life of the process (a full pipe would block its
        // logging), collecting the output for diagnostics; stdout lines also go to `lines`.
        let output = Arc::new(Mutex::new(String::new()));
        let (lines_tx, lines) = mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (out, err) = (output.clone(), output.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                out.lock().unwrap().push_str(&line);
                out.lock().unwrap().push('\n');
                let _ = lines_tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                err.lock().unwrap().push_str(&line);
                err.lock().unwrap().push('\n');
            }
        });
        let mut gateway = Gateway {
            child,
            addr: String::new(),
            banner: String::new(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            gateway.banner.push_str(&line);
            gateway.banner.push('\n');
            if let Some(addr) = line.trim().strip_prefix("gateway listening on http://") {
                gateway.addr = addr.to_owned();
                return gateway;
            }
        }
        // It exited or never said it listens: show why (Drop kills and reaps it).
        let _ = gateway.child.kill();
        let _ = gateway.child.wait();
        std::thread::sleep(Duration::from_millis(100)); // let the drain threads finish
        panic!(
            "the gateway did not start; it printed:\n{}",
            output.lock().unwrap()
        );
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        idempotency: Option<&str>,
        body: Value,
    ) -> Option<(u16, Value)> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.addr, path))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json");
        if let Some(k) = idempotency {
            request = request.header("idempotency-key", k);
        }
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let response = client
            .request(request.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .ok()?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        Some((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}

impl Gateway {
    /// SIGTERM, then the exit status (bounded: 10 s).
    pub async fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the gateway did not exit after SIGTERM");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
