//! A real PostgreSQL per test: `initdb` into a temp dir, `postgres` on a random loopback port
//! (socket and lock files in that dir too), trust authentication for the `postgres` superuser,
//! fsync and synchronous commits left on. `initdb` and `postgres` refuse to run as root, so as
//! root they run through `runuser` as the `postgres` system user (or `nobody`). Stopping is an
//! immediate shutdown (SIGQUIT to the postmaster), so `restart` goes through crash recovery:
//! what was committed must still be there.
//!
//! The tests below prove the harness and what is specific to the PostgreSQL settlement store
//! (server settings, concurrent migrators and writers, restart); the shared scenarios live in
//! the settlement conformance suite.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway::money::Currency;
use gateway::settlement::postgres::PostgresStore;
use gateway::settlement::{
    check_schema, ledger, AccountRow, CommitOutcome, IntentOutcome, PaymentRow, Posting,
    SettleError, Settlement, SettlementKind, SettlementStore, SCHEMA_VERSION,
};
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

// ---- Tests: the harness and what is specific to the PostgreSQL store. ----

async fn store(server: &PostgresServer) -> PostgresStore {
    PostgresStore::connect(&server.url(), 4, 2_000)
        .await
        .expect("connect to the test PostgreSQL")
}

fn capture(payment: &str, amount: i64) -> Settlement {
    Settlement {
        payment_id: payment.into(),
        kind: SettlementKind::Capture,
        sequence: 0,
        merchant_id: "alpha".into(),
        account_id: Some("acc".into()),
        channel_id: None,
        channel_txn_id: None,
        amount_minor: amount,
        currency: Currency::Cny,
        channel_fee_minor: 0,
        commission_minor: 0,
        merchant_net_minor: amount,
        account_seq: None,
        settled_at_ms: 10,
        postings: vec![
            Posting {
                ledger: ledger::account("alpha", "acc"),
                amount_minor: -amount,
            },
            Posting {
                ledger: ledger::merchant_sales("alpha"),
                amount_minor: amount,
            },
        ],
        payment: None,
    }
}

fn payment_row(id: &str, order: &str) -> PaymentRow {
    PaymentRow {
        id: id.into(),
        merchant_id: "alpha".into(),
        account_id: Some("acc".into()),
        scope_tag: "TAG0000000".into(),
        merchant_order_id: order.into(),
        amount_minor: 100,
        currency: Currency::Cny,
        method: "balance".into(),
        purpose: "charge".into(),
        status: "succeeded".into(),
        held_minor: 0,
        hold_expires_at_ms: None,
        created_at_ms: 1,
        expires_at_ms: 5_000,
        updated_at_ms: 2,
        doc: format!("{{\"id\":\"{id}\"}}"),
    }
}

fn account() -> AccountRow {
    AccountRow {
        merchant_id: "alpha".into(),
        account_id: "acc".into(),
        currency: Currency::Cny,
        credit_limit_minor: 0,
        created_at_ms: 1,
        updated_at_ms: 1,
    }
}

#[tokio::test]
async fn postgres_runs_with_fsync_on_commit() {
    let server = PostgresServer::start().await;
    let client = server.client().await;
    for (setting, expected) in [("fsync", "on"), ("synchronous_commit", "on")] {
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), expected, "{setting}");
    }
}

/// What the restart test committed, read back through the store.
async fn check_data(store: &PostgresStore) {
    assert_eq!(store.schema_version().await.unwrap(), Some(SCHEMA_VERSION));
    assert_eq!(
        store.postings_sum_by_movement().await.unwrap(),
        vec![("pay_x".to_owned(), "capture".to_owned(), 0, 0)]
    );
    let balances = store.balances().await.unwrap();
    assert_eq!(balances.len(), 1);
    assert_eq!(balances[0].balance_minor, -100);
    assert_eq!(
        store.payment("pay_x").await.unwrap(),
        Some(payment_row("pay_x", "order-1"))
    );
    assert_eq!(store.payment("pay_z").await.unwrap(), None);
    assert_eq!(store.flagged(10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn postgres_store_migrates_commits_and_survives_a_restart() {
    let mut server = PostgresServer::start().await;
    let store = store(&server).await;

    assert_eq!(store.schema_version().await.unwrap(), None);
    assert!(matches!(
        check_schema(&store).await,
        Err(SettleError::Unmigrated)
    ));
    assert_eq!(store.migrate().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(store.schema_version().await.unwrap(), Some(SCHEMA_VERSION));
    assert_eq!(store.migrate().await.unwrap(), SCHEMA_VERSION, "a no-op");
    check_schema(&store).await.unwrap();
    store.upsert_account(&account()).await.unwrap();

    // A balanced capture that finalizes its payment.
    let mut first = capture("pay_x", 100);
    first.payment = Some(payment_row("pay_x", "order-1"));
    assert_eq!(
        store.commit(std::slice::from_ref(&first)).await.unwrap(),
        vec![CommitOutcome::Inserted]
    );
    assert_eq!(
        store.commit(std::slice::from_ref(&first)).await.unwrap(),
        vec![CommitOutcome::AlreadyCommitted]
    );
    // Same key, other amount and postings: refused and flagged.
    let mut other = capture("pay_x", 150);
    other.payment = first.payment.clone();
    assert_eq!(
        store.commit(&[other]).await.unwrap(),
        vec![CommitOutcome::Conflict {
            stored_hash: first.content_hash()
        }]
    );
    let flagged = store.flagged(10).await.unwrap();
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    assert_eq!(flagged[0].kind, "settlement_conflict");
    assert_eq!(flagged[0].payment_id, "pay_x");

    // Unbalanced: refused before anything is written.
    let mut unbalanced = capture("pay_y", 100);
    unbalanced.postings[1].amount_minor = 99;
    assert!(matches!(
        store.commit(&[capture("pay_z", 5), unbalanced]).await,
        Err(SettleError::Invalid(_))
    ));

    // What PostgreSQL holds: the postings' line numbers, one settlement, the payment.
    let client = server.client().await;
    let lines: Vec<(String, i32, i64)> = client
        .query(
            "SELECT payment_id, line, amount_minor FROM postings ORDER BY payment_id, line",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        lines,
        vec![("pay_x".to_owned(), 0, -100), ("pay_x".to_owned(), 1, 100)]
    );
    drop(client);

    check_data(&store).await;

    // Down: calls fail (fast, bounded by the timeouts), and come back with the server.
    server.stop();
    assert!(matches!(
        store.ping().await,
        Err(SettleError::Unavailable(_))
    ));
    assert!(store.commit(&[capture("pay_w", 7)]).await.is_err());
    server.restart().await;
    store.ping().await.unwrap();
    check_data(&store).await;
    // The pool's connections were replaced: writes work again.
    assert_eq!(
        store.commit(&[capture("pay_w", 7)]).await.unwrap(),
        vec![CommitOutcome::Inserted]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrators_serialize_and_a_newer_schema_is_refused() {
    let server = PostgresServer::start().await;
    let stores = [
        store(&server).await,
        store(&server).await,
        store(&server).await,
    ];
    let (a, b, c) = tokio::join!(
        stores[0].migrate(),
        stores[1].migrate(),
        stores[2].migrate()
    );
    for result in [a, b, c] {
        assert_eq!(result.unwrap(), SCHEMA_VERSION);
    }
    let client = server.client().await;
    let applied: i64 = client
        .query_one("SELECT COUNT(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        applied,
        i64::from(SCHEMA_VERSION),
        "each migration applied once"
    );

    // A newer binary migrated this database: this one refuses it.
    let newer = i32::try_from(SCHEMA_VERSION + 1).unwrap();
    client
        .execute(
            "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, 0)",
            &[&newer],
        )
        .await
        .unwrap();
    assert!(matches!(
        stores[0].migrate().await,
        Err(SettleError::WrongSchema { found, expected }) if found == SCHEMA_VERSION + 1 && expected == SCHEMA_VERSION
    ));
    assert!(matches!(
        check_schema(&stores[1]).await,
        Err(SettleError::WrongSchema { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_from_several_instances_agree() {
    let server = PostgresServer::start().await;
    let one = store(&server).await;
    let two = store(&server).await;
    one.migrate().await.unwrap();

    // Two instances record intents for different payments with the same order id at once:
    // exactly one holds the order id.
    for round in 0..10 {
        let order = format!("order-{round}");
        let mut left = payment_row(&format!("pay_l{round}"), &order);
        let mut right = payment_row(&format!("pay_r{round}"), &order);
        left.status = "pending".into();
        right.status = "pending".into();
        let (l, r) = tokio::join!(one.record_intent(&left), two.record_intent(&right));
        let outcomes = [l.unwrap(), r.unwrap()];
        let inserted = outcomes
            .iter()
            .filter(|o| **o == IntentOutcome::Inserted)
            .count();
        assert_eq!(inserted, 1, "{outcomes:?}");
        assert!(
            outcomes
                .iter()
                .any(|o| matches!(o, IntentOutcome::DuplicateOrder(_))),
            "{outcomes:?}"
        );
        // The same intent again: a retry for the winner, a duplicate order for the loser.
        let (winner, loser) = if outcomes[0] == IntentOutcome::Inserted {
            (&left, &right)
        } else {
            (&right, &left)
        };
        assert_eq!(
            two.record_intent(winner).await.unwrap(),
            IntentOutcome::AlreadyRecorded
        );
        assert_eq!(
            one.record_intent(loser).await.unwrap(),
            IntentOutcome::DuplicateOrder(winner.id.clone())
        );
    }

    // Two instances re-drive the same settlements at once: each is inserted exactly once.
    for round in 0..10 {
        let batch: Vec<Settlement> = (0..5)
            .map(|i| capture(&format!("pay_{round}_{i}"), 10 + i))
            .collect();
        let (l, r) = tokio::join!(one.commit(&batch), two.commit(&batch));
        let (l, r) = (l.unwrap(), r.unwrap());
        for (x, y) in l.iter().zip(&r) {
            let mut pair = [x.clone(), y.clone()];
            pair.sort_by_key(|o| matches!(o, CommitOutcome::AlreadyCommitted));
            assert_eq!(
                pair,
                [CommitOutcome::Inserted, CommitOutcome::AlreadyCommitted],
                "{l:?} {r:?}"
            );
        }
    }
    let sums = one.postings_sum_by_movement().await.unwrap();
    assert_eq!(sums.len(), 50);
    assert!(sums.iter().all(|(_, _, _, sum)| *sum == 0));
    assert!(one.flagged(10).await.unwrap().is_empty());
}
