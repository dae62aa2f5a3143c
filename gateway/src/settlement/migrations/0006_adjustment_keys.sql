-- 0006_adjustment_keys: an admin adjustment's Idempotency-Key kept with its movement, in the
-- same commit (DESIGN.md §3, "the store decides"), so a retry the balance store forgot (a
-- flushed or rolled-back Redis, a restarted sandbox) replays the first adjustment instead of
-- moving the money twice. Portable SQL.

CREATE TABLE adjustments (
    adjustment_id   TEXT    NOT NULL PRIMARY KEY,
    scope_tag       TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    request_hash    TEXT    NOT NULL,
    -- The adjustment as first answered (JSON): what a replay answers.
    doc             TEXT    NOT NULL,
    created_at_ms   BIGINT  NOT NULL
);

-- One adjustment per (scope, Idempotency-Key), as for payments.
CREATE UNIQUE INDEX adjustments_idempotency ON adjustments (scope_tag, idempotency_key);
