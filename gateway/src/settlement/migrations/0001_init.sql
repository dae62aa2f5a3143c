-- 0001_init: the system of record. Portable SQL: the same text runs on SQLite and PostgreSQL.
-- Amounts are integer minor units (BIGINT); timestamps are unix milliseconds.

-- An account survives a restart even before any money moved.
CREATE TABLE accounts (
    merchant_id        TEXT    NOT NULL,
    account_id         TEXT    NOT NULL,
    currency           TEXT    NOT NULL,
    credit_limit_minor BIGINT  NOT NULL CHECK (credit_limit_minor >= 0),
    created_at_ms      BIGINT  NOT NULL,
    updated_at_ms      BIGINT  NOT NULL,
    PRIMARY KEY (merchant_id, account_id)
);

-- Every payment from intent on. `doc` is the fixed JSON document the API renders.
CREATE TABLE payments (
    id                 TEXT    PRIMARY KEY,
    merchant_id        TEXT    NOT NULL,
    account_id         TEXT,
    scope_tag          TEXT    NOT NULL,
    merchant_order_id  TEXT    NOT NULL,
    amount_minor       BIGINT  NOT NULL CHECK (amount_minor > 0),
    currency           TEXT    NOT NULL,
    method             TEXT    NOT NULL,
    purpose            TEXT    NOT NULL,
    status             TEXT    NOT NULL,
    held_minor         BIGINT  NOT NULL CHECK (held_minor >= 0),
    hold_expires_at_ms BIGINT,
    created_at_ms      BIGINT  NOT NULL,
    expires_at_ms      BIGINT  NOT NULL,
    updated_at_ms      BIGINT  NOT NULL,
    doc                TEXT    NOT NULL
);

-- At most one live payment per scoped merchant order id (DESIGN.md §3), as in Redis.
CREATE UNIQUE INDEX payments_live_order ON payments (scope_tag, merchant_order_id)
    WHERE status IN ('pending', 'succeeded', 'partially_refunded', 'refunded');
-- Pending payments by account: rebuilding one account's holds is a point query.
CREATE INDEX payments_account_pending ON payments (merchant_id, account_id)
    WHERE status = 'pending';

-- Each status a payment reached, and when (idempotent: re-driving a change adds nothing).
CREATE TABLE payment_events (
    payment_id  TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    at_ms       BIGINT  NOT NULL,
    PRIMARY KEY (payment_id, status)
);

-- Channel attempts (the channels issue writes them): one per channel order id.
CREATE TABLE attempts (
    payment_id        TEXT    NOT NULL,
    attempt           INTEGER NOT NULL,
    channel_id        TEXT    NOT NULL,
    channel_order_id  TEXT    NOT NULL UNIQUE,
    outcome           TEXT    NOT NULL,
    latency_ms        BIGINT,
    created_at_ms     BIGINT  NOT NULL,
    updated_at_ms     BIGINT  NOT NULL,
    PRIMARY KEY (payment_id, attempt)
);

-- One row per money movement.
CREATE TABLE settlements (
    payment_id         TEXT    NOT NULL,
    kind               TEXT    NOT NULL,
    sequence           INTEGER NOT NULL,
    merchant_id        TEXT    NOT NULL,
    account_id         TEXT,
    channel_id         TEXT,
    channel_txn_id     TEXT,
    amount_minor       BIGINT  NOT NULL,
    currency           TEXT    NOT NULL,
    channel_fee_minor  BIGINT  NOT NULL,
    commission_minor   BIGINT  NOT NULL,
    merchant_net_minor BIGINT  NOT NULL,
    account_seq        BIGINT,
    settled_at_ms      BIGINT  NOT NULL,
    content_hash       TEXT    NOT NULL,
    PRIMARY KEY (payment_id, kind, sequence)
);
-- An account's sequence numbers are unique: a Redis that rolled back (failover, restore) hands
-- out a sequence number again, and that settlement is refused instead of double-counted.
CREATE UNIQUE INDEX settlements_account_seq ON settlements (merchant_id, account_id, account_seq)
    WHERE account_seq IS NOT NULL;

-- Balanced double-entry postings: per (payment_id, kind, sequence) they sum to zero.
CREATE TABLE postings (
    payment_id   TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    sequence     INTEGER NOT NULL,
    line         INTEGER NOT NULL,
    ledger       TEXT    NOT NULL,
    amount_minor BIGINT  NOT NULL,
    currency     TEXT    NOT NULL,
    PRIMARY KEY (payment_id, kind, sequence, line)
);
CREATE INDEX postings_ledger ON postings (ledger);

-- Things a human must look at: content conflicts now; late money and overdrafts later.
CREATE TABLE flagged (
    kind          TEXT    NOT NULL,
    payment_id    TEXT    NOT NULL,
    detail        TEXT    NOT NULL,
    created_at_ms BIGINT  NOT NULL,
    PRIMARY KEY (kind, payment_id)
);
