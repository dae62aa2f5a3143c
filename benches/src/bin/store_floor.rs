//! The least a SQLite store can do per balance payment, measured on this machine: the floor
//! under issue 14's SQLite budgets (docs/PERFORMANCE.md, "The store's floor").
//!
//! A database made by the gateway's own migrations (`SqliteStore::open`), then one thread on a
//! plain connection with the gateway's pragmas writes what a balance payment's commit must
//! hold: its payment row (which carries the idempotency key and the live order id, each under
//! its unique index) and its transfer row (the account's sequence under its unique index), a
//! group of them per commit, `synchronous=FULL` (an fsync per commit), SQLite's automatic
//! checkpoint at the gateway's size. No HTTP, no Redis, no look-ups beyond what the unique
//! indexes do on insert, no content hash, no tasks: what is left is what the schema and the
//! durability rule cost. Prints the thread's CPU (user + system, from
//! `/proc/thread-self/schedstat`) per payment.
//!
//! With `--checkout` (SQLite) each unit is a checkout through a supplier channel instead, in
//! its steady state: a commit holds the new checkouts' intents (the payment pending with its
//! hold and next status check, the first attempt sent) and the previous commit's settlements
//! (the attempt accepted, then succeeded; the payment succeeded; the capture transfer), the
//! rows of the two commits a checkout waits on and of the one it does not.
//!
//! With `--postgres URL` the same rows go to that PostgreSQL instead (its schema by the
//! gateway's migrations): per commit one `INSERT … SELECT FROM UNNEST` per table, pipelined
//! with `BEGIN` and `COMMIT` on one connection, as the gateway's writer does; printed: the CPU
//! of every PostgreSQL process (the postmaster's children, from `/proc/<pid>/stat`) and of this
//! program's thread, per payment. Run it on the machine that runs PostgreSQL.
//!
//! ```text
//! cargo run --release -p benches --bin store_floor -- [--rate N | --saturate] [--per-commit N]
//!     [--spacing-ms N] [--prefill N] [--seconds N] [--doc-bytes N] [--dir DIR]
//!     [--checkout | --postgres URL]
//! ```
//!
//! `--rate N` (default 1000) waits `--spacing-ms` (default 5, the gateway's
//! `store.commit_spacing_us`) after each commit, as the gateway's writer does, and commits the
//! payments that arrived since the previous one began; `--saturate` commits
//! `--per-commit` (default 16, the gateway's `store.commit_spacing_rows`) at a time with no
//! pause. `--prefill` payments (default 60000, about what a bench stack holds after its runs)
//! are written first so the indexes have their working size; keys are random as clients'
//! idempotency keys and order ids are; 64 accounts as the closed loop's.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gateway::settlement::sqlite::SqliteStore;
use gateway::settlement::SchemaStore;
use rusqlite::{params, Connection};

/// WAL pages after which SQLite checkpoints: the gateway's 4 096 000 bytes of 2 KiB pages.
const CHECKPOINT_PAGES: u32 = 2_000;
/// Accounts the payments spread over (the closed loop's 64).
const ACCOUNTS: u64 = 64;
/// Payments per prefill transaction.
const PREFILL_BATCH: u64 = 1_000;

struct Options {
    rate: Option<u64>,
    per_commit: u64,
    spacing: Duration,
    prefill: u64,
    seconds: u64,
    doc_bytes: usize,
    dir: Option<PathBuf>,
    postgres: Option<String>,
    checkout: bool,
}

/// Payments per commit: at a rate, those that arrived since the previous commit began (its own
/// time and the spacing after it, as the gateway's writer waits `store.commit_spacing_us`
/// after each commit), the fraction carried to the next one; at saturation, a set number.
enum Arrivals {
    Rate { per_second: f64, owed: f64 },
    Fixed(u64),
}

impl Arrivals {
    fn of(o: &Options) -> Self {
        match o.rate {
            Some(rate) => Arrivals::Rate {
                per_second: rate as f64,
                owed: 0.0,
            },
            None => Arrivals::Fixed(o.per_commit),
        }
    }

    /// The payments of the next commit, `elapsed` after the previous one began.
    fn take(&mut self, elapsed: Duration) -> u64 {
        match self {
            Arrivals::Rate { per_second, owed } => {
                *owed += *per_second * elapsed.as_secs_f64();
                let n = owed.floor();
                *owed -= n;
                n as u64
            }
            Arrivals::Fixed(n) => *n,
        }
    }
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        rate: Some(1_000),
        per_commit: 16,
        spacing: Duration::from_millis(5),
        prefill: 60_000,
        seconds: 10,
        doc_bytes: 300,
        dir: None,
        postgres: None,
        checkout: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--saturate" {
            o.rate = None;
            continue;
        }
        if flag == "--checkout" {
            o.checkout = true;
            continue;
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--rate" => o.rate = Some(number()?.max(1)),
            "--per-commit" => o.per_commit = number()?.max(1),
            "--spacing-ms" => o.spacing = Duration::from_millis(number()?.max(1)),
            "--prefill" => o.prefill = number()?,
            "--seconds" => o.seconds = number()?.max(1),
            "--doc-bytes" => o.doc_bytes = usize::try_from(number()?).unwrap_or(300),
            "--dir" => o.dir = Some(PathBuf::from(value)),
            "--postgres" => o.postgres = Some(value),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(o)
}

/// Unix time in ms: ids and keys differ from one run to the next on the same database.
fn now_ms() -> Result<i64, Box<dyn std::error::Error>> {
    Ok(i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?)
}

/// CPU time of the calling thread (user + system), nanoseconds.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// xorshift64: keys as random as clients' (idempotency keys, order ids), reproducible.
struct Keys(u64);

impl Keys {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// 36 characters, as a UUID-shaped key.
    fn key(&mut self) -> String {
        format!(
            "{:016x}{:016x}{:04x}",
            self.next(),
            self.next(),
            self.next() & 0xffff
        )
    }
}

struct Writer {
    keys: Keys,
    doc: String,
    /// Each account's last sequence; a run starts them at its start time in ms, so runs on one
    /// database never hand out the same one (a run adds far fewer per account than 10 000).
    seqs: Vec<i64>,
    written: u64,
    /// Checkouts whose intent the previous commit held: this one settles them.
    in_flight: Vec<(String, usize)>,
}

impl Writer {
    /// Keys seeded and account sequences started from `epoch_ms`, the run's start.
    fn new(o: &Options, epoch_ms: i64) -> Self {
        let accounts = usize::try_from(ACCOUNTS).unwrap_or(64);
        Writer {
            keys: Keys(0x9e37_79b9_7f4a_7c15 ^ epoch_ms.unsigned_abs()),
            doc: "x".repeat(o.doc_bytes),
            seqs: vec![epoch_ms; accounts],
            written: 0,
            in_flight: Vec::new(),
        }
    }

    /// The next payment: its id (time-sorted, as the gateway's), a random account of the
    /// `ACCOUNTS`, and a random idempotency key and order id.
    fn draw(&mut self, now_ms: i64) -> Drawn {
        let id = format!("pay_{now_ms:012x}{:08x}", self.written);
        self.written += 1;
        let account = usize::try_from(self.keys.next() % ACCOUNTS).unwrap_or(0);
        let account_id = format!("lt-{account:03}");
        Drawn {
            id,
            account,
            scope: format!("m_alpha/{account_id}"),
            account_id,
            key: self.keys.key(),
            order: self.keys.key(),
        }
    }

    /// One balance payment's rows: the payment (succeeded, its key and order id) and its
    /// capture transfer (the account's next sequence).
    fn payment(&mut self, conn: &Connection, now_ms: i64) -> rusqlite::Result<()> {
        let d = self.draw(now_ms);
        self.seqs[d.account] += 1;
        conn.prepare_cached(
            "INSERT INTO payments (id, merchant_id, account_id, scope_tag, merchant_order_id, \
             amount_minor, currency, method, purpose, status, held_minor, created_at_ms, \
             expires_at_ms, updated_at_ms, doc, idempotency_key, request_hash) VALUES \
             (?1, 'm_alpha', ?2, ?3, ?4, 100, 'CNY', 'balance', 'payment', 'succeeded', 0, ?5, \
             ?5, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            d.id,
            d.account_id,
            d.scope,
            d.order,
            now_ms,
            self.doc,
            d.key,
            HASH
        ])?;
        conn.prepare_cached(
            "INSERT INTO transfers (payment_id, kind, sequence, debit_ledger, credit_ledger, \
             amount_minor, currency, merchant_id, account_id, account_seq, fee_minor, \
             settled_at_ms, content_hash) VALUES \
             (?1, 'capture', 1, ?2, 'sales', 100, 'CNY', 'm_alpha', ?3, ?4, 0, ?5, ?6)",
        )?
        .execute(params![
            d.id,
            format!("account:{}", d.scope),
            d.account_id,
            self.seqs[d.account],
            now_ms,
            HASH
        ])?;
        Ok(())
    }

    /// A checkout's intent with its first attempt: the payment pending with its hold and its
    /// next status check, the attempt sent to the supplier channel.
    fn intent(&mut self, conn: &Connection, now_ms: i64) -> rusqlite::Result<()> {
        let d = self.draw(now_ms);
        conn.prepare_cached(
            "INSERT INTO payments (id, merchant_id, account_id, scope_tag, merchant_order_id, \
             amount_minor, currency, method, purpose, status, held_minor, hold_expires_at_ms, \
             created_at_ms, expires_at_ms, updated_at_ms, doc, next_check_at_ms, \
             idempotency_key, request_hash) VALUES \
             (?1, 'm_alpha', ?2, ?3, ?4, 100, 'CNY', 'supplier', 'payment', 'pending', 100, \
             ?5 + 900000, ?5, ?5 + 900000, ?5, ?6, ?5 + 5000, ?7, ?8)",
        )?
        .execute(params![
            d.id,
            d.account_id,
            d.scope,
            d.order,
            now_ms,
            self.doc,
            d.key,
            HASH
        ])?;
        conn.prepare_cached(
            "INSERT INTO attempts (payment_id, attempt, channel_id, channel_order_id, outcome, \
             created_at_ms, updated_at_ms) VALUES (?1, 1, 'supplier-main', ?1, 'sent', ?2, ?2)",
        )?
        .execute(params![d.id, now_ms])?;
        self.in_flight.push((d.id, d.account));
        Ok(())
    }

    /// A checkout the channel accepted and then paid: the attempt accepted, then succeeded with
    /// the channel's transaction id, the payment succeeded (its hold and check gone), the
    /// capture transfer with the account's next sequence.
    fn settle(
        &mut self,
        conn: &Connection,
        id: &str,
        account: usize,
        now_ms: i64,
    ) -> rusqlite::Result<()> {
        self.seqs[account] += 1;
        let account_id = format!("lt-{account:03}");
        conn.prepare_cached(
            "UPDATE attempts SET outcome = ?2, channel_txn_id = ?3, updated_at_ms = ?4 \
             WHERE payment_id = ?1 AND attempt = 1",
        )?
        .execute(params![id, "accepted", Option::<&str>::None, now_ms])?;
        conn.prepare_cached(
            "UPDATE payments SET status = 'succeeded', held_minor = 0, \
             hold_expires_at_ms = NULL, next_check_at_ms = NULL, updated_at_ms = ?2 WHERE id = ?1",
        )?
        .execute(params![id, now_ms])?;
        conn.prepare_cached(
            "UPDATE attempts SET outcome = ?2, channel_txn_id = ?3, updated_at_ms = ?4 \
             WHERE payment_id = ?1 AND attempt = 1",
        )?
        .execute(params![id, "succeeded", id, now_ms])?;
        conn.prepare_cached(
            "INSERT INTO transfers (payment_id, kind, sequence, debit_ledger, credit_ledger, \
             amount_minor, currency, merchant_id, account_id, account_seq, channel_id, \
             channel_txn_id, fee_minor, settled_at_ms, content_hash) VALUES \
             (?1, 'capture', 1, ?2, 'sales', 100, 'CNY', 'm_alpha', ?3, ?4, 'supplier-main', \
             ?1, 0, ?5, ?6)",
        )?
        .execute(params![
            id,
            format!("account:m_alpha/{account_id}"),
            account_id,
            self.seqs[account],
            now_ms,
            HASH
        ])?;
        Ok(())
    }

    /// One commit of checkouts in their steady state: the settlements of the previous commit's
    /// intents (the channel answered and called back meanwhile) and `n` new intents.
    fn commit_checkouts(&mut self, conn: &Connection, n: u64, now_ms: i64) -> rusqlite::Result<()> {
        conn.execute_batch("BEGIN")?;
        for (id, account) in std::mem::take(&mut self.in_flight) {
            self.settle(conn, &id, account, now_ms)?;
        }
        for _ in 0..n {
            self.intent(conn, now_ms)?;
        }
        conn.execute_batch("COMMIT")
    }

    fn commit(&mut self, conn: &Connection, n: u64, now_ms: i64) -> rusqlite::Result<()> {
        conn.execute_batch("BEGIN")?;
        for _ in 0..n {
            self.payment(conn, now_ms)?;
        }
        conn.execute_batch("COMMIT")
    }
}

/// One payment's identity as [`Writer::draw`] picks it.
struct Drawn {
    id: String,
    /// Index into the writer's sequences.
    account: usize,
    account_id: String,
    scope: String,
    key: String,
    order: String,
}

/// A SHA-256 in hex, as the request hash and the content hash are.
const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("store_floor: {e} (see the doc comment in benches/src/bin/store_floor.rs)");
            std::process::exit(2);
        }
    };
    let result = match o.postgres.clone() {
        Some(_) if o.checkout => Err("--checkout is SQLite only".into()),
        Some(url) => run_postgres(&o, &url),
        None => run(&o),
    };
    if let Err(e) = result {
        // tokio-postgres says "db error" and keeps PostgreSQL's message in the source.
        let source = e.source().map(|s| format!(": {s}")).unwrap_or_default();
        eprintln!("store_floor: {e}{source}");
        std::process::exit(1);
    }
}

fn run(o: &Options) -> Result<(), Box<dyn std::error::Error>> {
    let temp = tempfile::tempdir_in(o.dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let path = temp.path().join("floor.sqlite3");
    // The gateway's schema, by its own migrations; its connection thread ends with the drop.
    let store = SqliteStore::open(&path)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(store.migrate())?;
    drop(store);
    let conn = Connection::open(&path)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
         PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES};"
    ))?;
    let epoch_ms = now_ms()?;
    let mut w = Writer::new(o, epoch_ms);
    let mut filled = 0;
    while filled < o.prefill {
        let n = PREFILL_BATCH.min(o.prefill - filled);
        w.commit(&conn, n, epoch_ms + i64::try_from(filled)?)?;
        filled += n;
    }
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;

    let mut arrivals = Arrivals::of(o);
    let (start, cpu0, paid0) = (Instant::now(), thread_cpu_ns(), w.written);
    let mut commits = 0u64;
    let mut began = start;
    while start.elapsed() < Duration::from_secs(o.seconds) {
        if o.rate.is_some() {
            std::thread::sleep(o.spacing);
        }
        let now = Instant::now();
        let n = arrivals.take(now - began);
        began = now;
        let now_ms =
            epoch_ms + i64::try_from(o.prefill)? + i64::try_from(start.elapsed().as_millis())?;
        if o.checkout {
            w.commit_checkouts(&conn, n, now_ms)?;
        } else {
            w.commit(&conn, n, now_ms)?;
        }
        commits += 1;
    }
    let (cpu, paid) = (thread_cpu_ns() - cpu0, w.written - paid0);
    let wall = start.elapsed().as_secs_f64();
    let unit = if o.checkout { "checkout" } else { "payment" };
    let per_commit = paid as f64 / commits.max(1) as f64;
    println!(
        "{paid} {unit}s in {commits} commits ({per_commit:.1} per commit, {:.0}/s): {:.1} µs of CPU \
         per {unit}",
        paid as f64 / wall,
        cpu as f64 / 1_000.0 / paid as f64
    );
    Ok(())
}

/// CPU ticks (user + system) of the processes `pids`, from `/proc/<pid>/stat`.
fn ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // The fields after the command's closing parenthesis; utime and stime are 14 and 15.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// The postmaster of backend `backend` and every child of it alive now.
fn postgres_processes(backend: u32) -> Vec<u32> {
    let parent_of = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let Some(postmaster) = parent_of(backend) else {
        return Vec::new();
    };
    let mut pids = vec![postmaster];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            {
                if parent_of(pid) == Some(postmaster) {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}

/// One commit's rows as the arrays the two `UNNEST` statements take.
#[derive(Default)]
struct Batch {
    ids: Vec<String>,
    accounts: Vec<String>,
    scopes: Vec<String>,
    orders: Vec<String>,
    keys: Vec<String>,
    ledgers: Vec<String>,
    seqs: Vec<i64>,
}

const PG_INSERT_PAYMENTS: &str = "INSERT INTO payments (id, merchant_id, account_id, scope_tag, \
     merchant_order_id, amount_minor, currency, method, purpose, status, held_minor, \
     created_at_ms, expires_at_ms, updated_at_ms, doc, idempotency_key, request_hash) \
     SELECT i.id, 'm_alpha', i.account, i.scope, i.ord, 100, 'CNY', 'balance', 'payment', \
     'succeeded', 0, $6, $6, $6, $7, i.k, $8 \
     FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[]) \
     AS i(id, account, scope, ord, k)";

const PG_INSERT_TRANSFERS: &str = "INSERT INTO transfers (payment_id, kind, sequence, \
     debit_ledger, credit_ledger, amount_minor, currency, merchant_id, account_id, \
     account_seq, fee_minor, settled_at_ms, content_hash) \
     SELECT i.id, 'capture', 1, i.ledger, 'sales', 100, 'CNY', 'm_alpha', i.account, i.seq, \
     0, $5, $6 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[]) \
     AS i(id, ledger, account, seq)";

impl Writer {
    fn batch(&mut self, n: u64, now_ms: i64) -> Batch {
        let mut b = Batch::default();
        for _ in 0..n {
            let d = self.draw(now_ms);
            self.seqs[d.account] += 1;
            b.ids.push(d.id);
            b.ledgers.push(format!("account:{}", d.scope));
            b.scopes.push(d.scope);
            b.accounts.push(d.account_id);
            b.orders.push(d.order);
            b.keys.push(d.key);
            b.seqs.push(self.seqs[d.account]);
        }
        b
    }
}

async fn commit_postgres(
    client: &tokio_postgres::Client,
    statements: &(tokio_postgres::Statement, tokio_postgres::Statement),
    w: &mut Writer,
    n: u64,
    now_ms: i64,
) -> Result<(), tokio_postgres::Error> {
    let b = w.batch(n, now_ms);
    let doc = w.doc.as_str();
    let payment_params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
        &b.ids,
        &b.accounts,
        &b.scopes,
        &b.orders,
        &b.keys,
        &now_ms,
        &doc,
        &HASH,
    ];
    let transfer_params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
        [&b.ids, &b.ledgers, &b.accounts, &b.seqs, &now_ms, &HASH];
    // One round trip: tokio-postgres pipelines the four on the connection.
    let (begin, payments, transfers, commit) = tokio::join!(
        client.batch_execute("BEGIN"),
        client.execute(&statements.0, &payment_params),
        client.execute(&statements.1, &transfer_params),
        client.batch_execute("COMMIT"),
    );
    begin?;
    payments?;
    transfers?;
    commit
}

fn run_postgres(o: &Options, url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = gateway::settlement::postgres::PostgresStore::connect(url, 1, 5_000).await?;
        store.migrate().await?;
        drop(store);
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let statements = (
            client.prepare(PG_INSERT_PAYMENTS).await?,
            client.prepare(PG_INSERT_TRANSFERS).await?,
        );
        let backend: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        let epoch_ms = now_ms()?;
        let mut w = Writer::new(o, epoch_ms);
        let mut filled = 0;
        while filled < o.prefill {
            let n = PREFILL_BATCH.min(o.prefill - filled);
            commit_postgres(
                &client,
                &statements,
                &mut w,
                n,
                epoch_ms + i64::try_from(filled)?,
            )
            .await?;
            filled += n;
        }
        client.batch_execute("CHECKPOINT").await?;

        let mut arrivals = Arrivals::of(o);
        let pids = postgres_processes(u32::try_from(backend)?);
        let (start, pg0, own0, paid0) = (Instant::now(), ticks(&pids), thread_cpu_ns(), w.written);
        let mut commits = 0u64;
        let mut began = start;
        while start.elapsed() < Duration::from_secs(o.seconds) {
            if o.rate.is_some() {
                tokio::time::sleep(o.spacing).await;
            }
            let now = Instant::now();
            let n = arrivals.take(now - began);
            began = now;
            let now_ms =
                epoch_ms + i64::try_from(o.prefill)? + i64::try_from(start.elapsed().as_millis())?;
            commit_postgres(&client, &statements, &mut w, n, now_ms).await?;
            commits += 1;
        }
        let (pg, own, paid) = (
            ticks(&pids) - pg0,
            thread_cpu_ns() - own0,
            w.written - paid0,
        );
        let wall = start.elapsed().as_secs_f64();
        let per_commit = paid as f64 / commits.max(1) as f64;
        // /proc/<pid>/stat counts in clock ticks of 10 ms (USER_HZ = 100 on Linux).
        let pg_us = pg as f64 * 10_000.0 / paid as f64;
        println!(
            "{paid} payments in {commits} commits ({per_commit:.1} per commit, {:.0}/s): PostgreSQL \
             {pg_us:.1} µs of CPU per payment ({} processes), this client {:.1} µs",
            paid as f64 / wall,
            pids.len(),
            own as f64 / 1_000.0 / paid as f64
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::Arrivals;
    use std::time::Duration;

    #[test]
    fn arrivals_are_what_came_since_the_last_commit_fraction_carried() {
        // 500/s, a commit every 5 ms: 2.5 each, taken as 2, 3, 2, 3…
        let mut a = Arrivals::Rate {
            per_second: 500.0,
            owed: 0.0,
        };
        let taken: Vec<u64> = (0..6).map(|_| a.take(Duration::from_millis(5))).collect();
        assert_eq!(taken, vec![2, 3, 2, 3, 2, 3]);
        // A longer gap (the commit's own time beside the spacing) brings more.
        assert_eq!(a.take(Duration::from_micros(6_500)), 3);
        let mut fixed = Arrivals::Fixed(16);
        assert!((0..100).all(|_| fixed.take(Duration::from_millis(5)) == 16));
        // Below one per commit: some commits take none, none is lost.
        let mut slow = Arrivals::Rate {
            per_second: 50.0,
            owed: 0.0,
        };
        let sum: u64 = (0..8).map(|_| slow.take(Duration::from_millis(5))).sum();
        assert_eq!(sum, 2);
    }
}
