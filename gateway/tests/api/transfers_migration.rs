//! Migration 0007 (a movement as one transfer row) from data written by the release before it
//! (schema 6: a `settlements` row and two `postings` rows per movement), on both backends:
//! every balance and sequence is the same before and after, every old movement is recognized
//! as the same when re-driven (its content hash is kept), and an outbox record in the old
//! format, still in Redis when the gateway stopped, settles after the migration.

use std::sync::Arc;

use gateway::money::Currency;
use gateway::settlement::sqlite::SqliteStore;
use gateway::settlement::{
    ledger, CommitOutcome, PendingRecord, Posting, Settlement, SettlementKind, SettlementStore,
    MIGRATIONS,
};

/// Movements as schema 6 stored them. The adjustment credits its account first (its postings'
/// order: account +, adjustments −), the others debit first: both orders must survive.
fn old_movements() -> Vec<Settlement> {
    let movement = |payment: &str,
                    kind: SettlementKind,
                    sequence: u32,
                    account: Option<&str>,
                    seq: Option<u64>,
                    amount: i64,
                    postings: [(String, i64); 2]| Settlement {
        payment_id: payment.into(),
        kind,
        sequence,
        merchant_id: "alpha".into(),
        account_id: account.map(str::to_owned),
        channel_id: None,
        channel_txn_id: None,
        amount_minor: amount,
        currency: Currency::Cny,
        channel_fee_minor: 0,
        commission_minor: 0,
        merchant_net_minor: amount,
        account_seq: seq,
        settled_at_ms: 1_000 + u64::from(sequence),
        postings: postings
            .into_iter()
            .map(|(ledger, amount_minor)| Posting {
                ledger,
                amount_minor,
            })
            .collect(),
        payment: None,
        adjustment: None,
    };
    let a = || ledger::account("alpha", "a");
    let b = || ledger::account("alpha", "b");
    let sales = || ledger::merchant_sales("alpha");
    let adjustments = || ledger::adjustments("alpha");
    vec![
        movement(
            "adj_1",
            SettlementKind::Adjustment,
            0,
            Some("a"),
            Some(1),
            10_000,
            [(a(), 10_000), (adjustments(), -10_000)],
        ),
        movement(
            "adj_2",
            SettlementKind::Adjustment,
            0,
            Some("b"),
            Some(1),
            500,
            [(b(), 500), (adjustments(), -500)],
        ),
        movement(
            "pay_1",
            SettlementKind::Capture,
            0,
            Some("a"),
            Some(2),
            2_500,
            [(a(), -2_500), (sales(), 2_500)],
        ),
        movement(
            "pay_1",
            SettlementKind::Refund,
            1,
            Some("a"),
            Some(3),
            700,
            [(sales(), -700), (a(), 700)],
        ),
        movement(
            "pay_2",
            SettlementKind::Capture,
            0,
            Some("b"),
            Some(2),
            300,
            [(b(), -300), (sales(), 300)],
        ),
        // Late money of a channel payment: no account.
        movement(
            "pay_3",
            SettlementKind::Suspense,
            1,
            None,
            None,
            900,
            [
                (ledger::channel_clearing("alipay"), -900),
                (ledger::suspense("alpha"), 900),
            ],
        ),
    ]
}

/// The statements schema 6 ran for these movements (accounts, settlement rows, posting lines).
fn version_6_data() -> Vec<String> {
    let text = |v: Option<&str>| v.map_or("NULL".to_owned(), |v| format!("'{v}'"));
    let mut out: Vec<String> = (1..=6)
        .map(|v| format!("INSERT INTO schema_migrations (version, applied_at_ms) VALUES ({v}, 0)"))
        .collect();
    for account in ["a", "b"] {
        out.push(format!(
            "INSERT INTO accounts (merchant_id, account_id, currency, credit_limit_minor, \
             created_at_ms, updated_at_ms) VALUES ('alpha', '{account}', 'CNY', 0, 1, 1)"
        ));
    }
    for s in old_movements() {
        out.push(format!(
            "INSERT INTO settlements (payment_id, kind, sequence, merchant_id, account_id, \
             channel_id, channel_txn_id, amount_minor, currency, channel_fee_minor, \
             commission_minor, merchant_net_minor, account_seq, settled_at_ms, content_hash) \
             VALUES ('{}', '{}', {}, 'alpha', {}, NULL, NULL, {}, 'CNY', 0, 0, {}, {}, {}, '{}')",
            s.payment_id,
            s.kind.as_str(),
            s.sequence,
            text(s.account_id.as_deref()),
            s.amount_minor,
            s.merchant_net_minor,
            s.account_seq.map_or("NULL".to_owned(), |q| q.to_string()),
            s.settled_at_ms,
            s.content_hash()
        ));
        for (line, p) in s.postings.iter().enumerate() {
            out.push(format!(
                "INSERT INTO postings (payment_id, kind, sequence, line, ledger, amount_minor, \
                 currency) VALUES ('{}', '{}', {}, {line}, '{}', {}, 'CNY')",
                s.payment_id,
                s.kind.as_str(),
                s.sequence,
                p.ledger,
                p.amount_minor
            ));
        }
    }
    out
}

/// Balances and sequences as schema 6 computes them (from the posting lines), by account.
const VERSION_6_BALANCES: &str = "SELECT a.account_id, \
    CAST((SELECT COALESCE(SUM(p.amount_minor), 0) FROM postings p \
      WHERE p.ledger = 'account:' || a.merchant_id || ':' || a.account_id) AS BIGINT), \
    CAST((SELECT COALESCE(MAX(s.account_seq), 0) FROM settlements s \
      WHERE s.merchant_id = a.merchant_id AND s.account_id = a.account_id) AS BIGINT) \
    FROM accounts a ORDER BY a.account_id";

/// An outbox record as the release before wrote it to Redis (a top-up credit of account `b`,
/// its sequence 3, not yet committed when the gateway stopped).
const OLD_OUTBOX_RECORD: &str = r#"{"settlement":{"payment_id":"pay_4","kind":"credit","sequence":0,"merchant_id":"alpha","account_id":"b","channel_id":"alipay","channel_txn_id":"2026120722001","amount_minor":1200,"currency":"CNY","channel_fee_minor":7,"commission_minor":0,"merchant_net_minor":1193,"account_seq":3,"settled_at_ms":2000,"postings":[{"ledger":"channel:alipay:clearing","amount_minor":-1200},{"ledger":"account:alpha:b","amount_minor":1200}],"payment":null}}"#;

/// After `migrate`: the same balances and sequences, old movements re-driven are the same,
/// the old-format record settles, the old tables are gone.
async fn migrates_keeping_every_balance(
    store: Arc<dyn SettlementStore>,
    before: Vec<(String, i64, i64)>,
) {
    assert_eq!(
        before,
        vec![("a".to_owned(), 8_200, 3), ("b".to_owned(), 200, 2)],
        "the data schema 6 holds"
    );
    assert_eq!(store.schema_version().await.unwrap(), Some(6));
    assert_eq!(store.migrate().await.unwrap(), 7);
    let after: Vec<(String, i64, i64)> = store
        .balances(None)
        .await
        .unwrap()
        .into_iter()
        .map(|b| (b.account.account_id, b.balance_minor, b.seq as i64))
        .collect();
    assert_eq!(after, before, "every balance and sequence is kept");

    // A re-driven old movement is the same movement; a changed one is a conflict.
    let old = old_movements();
    assert_eq!(
        store.commit(&old).await.unwrap(),
        vec![CommitOutcome::AlreadyCommitted; old.len()]
    );
    let mut changed = old[2].clone();
    changed.settled_at_ms += 1; // not part of the hash: still the same movement
    changed.channel_txn_id = Some("other".into()); // part of it: another one
    assert!(matches!(
        store.commit(&[changed]).await.unwrap()[..],
        [CommitOutcome::Conflict { .. }]
    ));

    // The record the old release left in Redis settles.
    let PendingRecord::Settlement(record) = serde_json::from_str(OLD_OUTBOX_RECORD).unwrap() else {
        panic!("an old settlement record reads as a settlement");
    };
    assert_eq!(
        store.commit(&[record]).await.unwrap(),
        vec![CommitOutcome::Inserted]
    );
    let b = store.balances(Some(("alpha", "b"))).await.unwrap();
    assert_eq!((b[0].balance_minor, b[0].seq), (1_400, 3));
    assert_eq!(
        store.committed_success("pay_4").await.unwrap(),
        Some((Some("alipay".into()), Some("2026120722001".into())))
    );
}

#[tokio::test]
async fn sqlite_a_version_6_store_migrates_to_transfers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.sqlite3");
    let before = {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, \
             applied_at_ms BIGINT NOT NULL)",
        )
        .unwrap();
        for m in MIGRATIONS.iter().filter(|m| m.version <= 6) {
            conn.execute_batch(m.sqlite).unwrap();
        }
        for statement in version_6_data() {
            conn.execute_batch(&statement).unwrap();
        }
        let mut stmt = conn.prepare(VERSION_6_BALANCES).unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    };
    migrates_keeping_every_balance(Arc::new(SqliteStore::open(&path).unwrap()), before).await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' \
             AND name IN ('settlements', 'postings', 'transfers', 'payments') ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(tables, ["payments", "transfers"]);
    // Clustered on their keys: no rowid B-tree beside the key's.
    for table in ["payments", "transfers"] {
        let sql: String = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = ?1",
                [table],
                |r| r.get(0),
            )
            .unwrap();
        assert!(sql.ends_with("WITHOUT ROWID"), "{table}: {sql}");
    }
}

#[tokio::test]
async fn postgres_a_version_6_store_migrates_to_transfers() {
    let server = crate::postgres_server::PostgresServer::start().await;
    let before = {
        let client = server.client().await;
        client
            .batch_execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, \
                 applied_at_ms BIGINT NOT NULL)",
            )
            .await
            .unwrap();
        for m in MIGRATIONS.iter().filter(|m| m.version <= 6) {
            client.batch_execute(m.postgres).await.unwrap();
        }
        for statement in version_6_data() {
            client.batch_execute(&statement).await.unwrap();
        }
        client
            .query(VERSION_6_BALANCES, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, i64>(1),
                    r.get::<_, i64>(2),
                )
            })
            .collect::<Vec<_>>()
    };
    let store = gateway::settlement::postgres::PostgresStore::connect(&server.url(), 4, 2_000)
        .await
        .expect("connect to the test PostgreSQL");
    migrates_keeping_every_balance(Arc::new(store), before).await;
    let client = server.client().await;
    let row = client
        .query_one(
            "SELECT to_regclass('settlements') IS NULL, to_regclass('postings') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, bool>(0), row.get::<_, bool>(1)), (true, true));
}
