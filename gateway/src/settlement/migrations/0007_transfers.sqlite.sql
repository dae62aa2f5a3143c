-- 0007_transfers (SQLite): a money movement becomes one transfer row instead of a settlement
-- row and two posting rows (issue: a lean write path), and the tables written per payment are
-- clustered on their key (WITHOUT ROWID): a rowid table with a text key is two B-trees, its
-- rows and its key's index. A balance payment's commit then touches 2 rows and 6 B-tree
-- entries (payments 4: the row, live order id, idempotency key, keyed-by-age; transfers 2:
-- the row, the account's sequence) instead of 6 rows and about 17 entries. Stop every
-- instance, `gateway migrate`, start: mixed versions are not supported.

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
 WITHOUT ROWID;
-- An account's sequence numbers are unique (NULLs, movements of no account, are distinct).
-- Also the index an account's balance is summed through.
CREATE UNIQUE INDEX transfers_account_seq ON transfers (merchant_id, account_id, account_seq);

-- Copies every movement: its debit is the posting that took money (negative), its credit the
-- one that gave it (positive); every settlement had exactly these two. Amounts, sequences and
-- content hashes are kept, so a re-driven old movement is still recognized as the same.
INSERT INTO transfers (payment_id, kind, sequence, debit_ledger, credit_ledger, amount_minor,
    currency, merchant_id, account_id, account_seq, channel_id, channel_txn_id, fee_minor,
    settled_at_ms, content_hash)
SELECT s.payment_id, s.kind, s.sequence, d.ledger, c.ledger, s.amount_minor, s.currency,
    s.merchant_id, s.account_id, s.account_seq, s.channel_id, s.channel_txn_id,
    s.channel_fee_minor, s.settled_at_ms, s.content_hash
FROM settlements s
JOIN postings d ON d.payment_id = s.payment_id AND d.kind = s.kind
    AND d.sequence = s.sequence AND d.amount_minor < 0
JOIN postings c ON c.payment_id = s.payment_id AND c.kind = s.kind
    AND c.sequence = s.sequence AND c.amount_minor > 0;

DROP TABLE postings;
DROP TABLE settlements;

-- payments, clustered on its id (payment ids sort by creation time: new rows append).
CREATE TABLE payments_v7 (
    id                 TEXT    NOT NULL PRIMARY KEY,
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
    doc                TEXT    NOT NULL,
    next_check_at_ms   BIGINT,
    checks             INTEGER NOT NULL DEFAULT 0,
    idempotency_key    TEXT,
    request_hash       TEXT
) WITHOUT ROWID;
INSERT INTO payments_v7 (id, merchant_id, account_id, scope_tag, merchant_order_id,
    amount_minor, currency, method, purpose, status, held_minor, hold_expires_at_ms,
    created_at_ms, expires_at_ms, updated_at_ms, doc, next_check_at_ms, checks,
    idempotency_key, request_hash)
SELECT id, merchant_id, account_id, scope_tag, merchant_order_id, amount_minor, currency,
    method, purpose, status, held_minor, hold_expires_at_ms, created_at_ms, expires_at_ms,
    updated_at_ms, doc, next_check_at_ms, checks, idempotency_key, request_hash
FROM payments;
DROP TABLE payments;
ALTER TABLE payments_v7 RENAME TO payments;
-- Its indexes as 0001, 0002 and 0005 made them.
CREATE UNIQUE INDEX payments_live_order ON payments (scope_tag, merchant_order_id)
    WHERE status IN ('pending', 'succeeded', 'partially_refunded', 'refunded');
CREATE INDEX payments_account_pending ON payments (merchant_id, account_id)
    WHERE status = 'pending';
CREATE INDEX payments_due_check ON payments (next_check_at_ms)
    WHERE status = 'pending';
CREATE UNIQUE INDEX payments_idempotency ON payments (scope_tag, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX payments_keyed_created ON payments (created_at_ms)
    WHERE idempotency_key IS NOT NULL;
