-- 0007_transfers (SQLite only), after the table and the copy: the tables written per payment
-- are clustered on their keys (WITHOUT ROWID): a rowid table with a text key is two B-trees,
-- its rows and its key's index. A balance payment's commit then touches 2 rows and 6 B-tree
-- entries (payments 4: the row, live order id, idempotency key, keyed-by-age; transfers 2:
-- the row, the account's sequence) instead of 6 rows and about 17 entries.

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
