-- 0005_idempotency: the store as the arbiter of idempotency (DESIGN.md §3, "the store
-- decides"). A payment row carries the Idempotency-Key it was created under and the hash of
-- the normalized request, so a retried request is recognized in the same commit as the money
-- even when the balance store (Redis, or the sandbox's in-process store) forgot its record.
-- Rows written before this migration have neither (NULL: no key to enforce). Portable SQL.

ALTER TABLE payments ADD COLUMN idempotency_key TEXT;
ALTER TABLE payments ADD COLUMN request_hash TEXT;

-- One payment per (scope, Idempotency-Key): the key's first outcome is this row. The index
-- holds a key for as long as its row keeps it (the balance store forgets it after the
-- configured retention): a later request under that key is replayed or refused, never charged
-- twice.
CREATE UNIQUE INDEX payments_idempotency ON payments (scope_tag, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- A refund carries the Idempotency-Key of the request that made it, so the store can tell the
-- same refund recorded again (a re-drive, or a retry Redis forgot: replayed) from another one
-- under the same number (Redis lost the payment's refund numbering: refused and flagged).
ALTER TABLE refunds ADD COLUMN idempotency_key TEXT;

-- What the payment logic refused under a key (402 insufficient_funds), written with the next
-- group commit (not waited for), so a rebuild puts the key back and the retry replays the
-- refusal — not a payment made once the account could afford it. Same scope as payments' keys.
CREATE TABLE refusals (
    scope_tag       TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    request_hash    TEXT    NOT NULL,
    -- The answer as the balance store encodes it: 'E:insufficient_funds:<available>:<shortfall>'.
    outcome         TEXT    NOT NULL,
    created_at_ms   BIGINT  NOT NULL,
    PRIMARY KEY (scope_tag, idempotency_key)
);
CREATE INDEX refusals_created ON refusals (created_at_ms);

-- The purge's scan: keyed payments by age. A purged row leaves the index (its key is NULL).
CREATE INDEX payments_keyed_created ON payments (created_at_ms)
    WHERE idempotency_key IS NOT NULL;

-- Leases of periodic jobs that one instance at a time runs (the key purge): the holder until
-- `until_ms`; a lease that ran out is anyone's.
CREATE TABLE leases (
    name     TEXT    PRIMARY KEY,
    holder   TEXT    NOT NULL,
    until_ms BIGINT  NOT NULL
);
