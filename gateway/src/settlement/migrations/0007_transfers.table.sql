-- 0007_transfers: a money movement becomes one transfer row instead of a settlement row and
-- two posting rows (issue: a lean write path): 3 rows and 5 index entries per movement become
-- 1 row and 2. Stop every instance, `gateway migrate`, start: mixed versions are not
-- supported. The statement below ends per backend (SQLite: WITHOUT ROWID, clustered on its
-- key), then 0007_transfers.copy.sql runs, then, on SQLite, 0007_transfers.sqlite.sql.

-- One row per money movement: a double-entry transfer of `amount_minor` from `debit_ledger` to
-- `credit_ledger` (in the manner of TigerBeetle's transfers). A transfer moves at most one
-- prepaid account (`account_id` with the account's sequence after it: a Redis that rolled back
-- hands a sequence out again, and that transfer is refused instead of counted twice); money
-- between two prepaid accounts is two transfers. Platform ledgers (sales, clearing, suspense,
-- adjustments) may go negative. Every balance rebuilds from these rows alone.
CREATE TABLE transfers (
    payment_id     TEXT    NOT NULL,
    kind           TEXT    NOT NULL,
    sequence       INTEGER NOT NULL,
    debit_ledger   TEXT    NOT NULL,
    credit_ledger  TEXT    NOT NULL CHECK (credit_ledger <> debit_ledger),
    amount_minor   BIGINT  NOT NULL CHECK (amount_minor > 0),
    currency       TEXT    NOT NULL,
    merchant_id    TEXT    NOT NULL,
    account_id     TEXT,
    account_seq    BIGINT,
    channel_id     TEXT,
    channel_txn_id TEXT,
    fee_minor      BIGINT  NOT NULL CHECK (fee_minor >= 0 AND fee_minor <= amount_minor),
    settled_at_ms  BIGINT  NOT NULL,
    content_hash   TEXT    NOT NULL,
    PRIMARY KEY (payment_id, kind, sequence)
)
