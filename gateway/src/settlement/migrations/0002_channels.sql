-- 0002_channels: channel attempts carry what the channel answered, and pending channel
-- payments carry their resolution schedule (DESIGN.md §6, §7). Portable SQL, one statement per
-- ALTER (SQLite adds one column per ALTER TABLE).

-- The action shown to the customer (the action object's JSON text) and the channel's own
-- transaction id, once the channel gave them.
ALTER TABLE attempts ADD COLUMN action TEXT;
ALTER TABLE attempts ADD COLUMN channel_txn_id TEXT;

-- When the resolution loop should next query or close a pending channel payment (NULL: never,
-- e.g. balance payments), and how many times it already looked.
ALTER TABLE payments ADD COLUMN next_check_at_ms BIGINT;
ALTER TABLE payments ADD COLUMN checks INTEGER NOT NULL DEFAULT 0;

-- The resolution loop's scan: due pending payments, oldest first. Finished payments leave the
-- index, so it stays as small as the set of pending payments.
CREATE INDEX payments_due_check ON payments (next_check_at_ms)
    WHERE status = 'pending';
