//! The settlement writer's store side: rows committed per second and fsyncs per row, one row
//! per commit versus group commits, on SQLite (WAL, synchronous=FULL) and on PostgreSQL
//! (fsync and synchronous_commit on) started by the bench on a random loopback port. One
//! commit is one transaction and one fsync, so fsyncs per row = 1 / batch size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gateway::money::Currency;
use gateway::settlement::postgres::PostgresStore;
use gateway::settlement::sqlite::SqliteStore;
use gateway::settlement::{ledger, Posting, Settlement, SettlementKind, SettlementStore};

#[path = "../../gateway/tests/api/harness/postgres_server.rs"]
#[allow(dead_code)] // the tests use the rest of the harness
mod postgres_server;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn capture() -> Settlement {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Settlement {
        payment_id: format!("pay_bench_{n}"),
        kind: SettlementKind::Capture,
        sequence: 0,
        merchant_id: "alpha".into(),
        account_id: Some("acc".into()),
        channel_id: None,
        channel_txn_id: None,
        amount_minor: 100,
        currency: Currency::Cny,
        channel_fee_minor: 0,
        commission_minor: 0,
        merchant_net_minor: 100,
        account_seq: Some(n + 1),
        settled_at_ms: 1,
        postings: vec![
            Posting {
                ledger: ledger::account("alpha", "acc"),
                amount_minor: -100,
            },
            Posting {
                ledger: ledger::merchant_sales("alpha"),
                amount_minor: 100,
            },
        ],
        payment: None,
        adjustment: None,
    }
}

fn bench_backend(
    c: &mut Criterion,
    name: &str,
    rt: &tokio::runtime::Runtime,
    store: Arc<dyn SettlementStore>,
) {
    let mut group = c.benchmark_group(format!("settlement_commit/{name}"));
    for batch in [1usize, 16, 256] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.to_async(rt).iter(|| {
                let store = store.clone();
                async move {
                    let rows: Vec<Settlement> = (0..batch).map(|_| capture()).collect();
                    store.commit(&rows).await.unwrap();
                }
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sqlite: Arc<dyn SettlementStore> =
        Arc::new(SqliteStore::open(&dir.path().join("bench.sqlite3")).unwrap());
    rt.block_on(sqlite.migrate()).unwrap();
    bench_backend(c, "sqlite", &rt, sqlite);

    let server = rt.block_on(postgres_server::PostgresServer::start());
    let postgres: Arc<dyn SettlementStore> = Arc::new(
        rt.block_on(PostgresStore::connect(&server.url(), 4, 2_000))
            .unwrap(),
    );
    rt.block_on(postgres.migrate()).unwrap();
    bench_backend(c, "postgres", &rt, postgres);
    drop(server);
}

criterion_group! {
    name = settlement;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(settlement);
