-- 0004_refunds: refunds (DESIGN.md §7). A refund is recorded here, pending, before its channel
-- is called; its number (`refund_id`, the channel's `out_request_no`/`out_refund_no`/
-- `refund_id`) is reused on every retry so the channel refunds once. It ends `succeeded` in the
-- same transaction as its settlement, or `failed`.
CREATE TABLE refunds (
    refund_id        TEXT    PRIMARY KEY,
    payment_id       TEXT    NOT NULL,
    number           INTEGER NOT NULL,
    amount_minor     BIGINT  NOT NULL CHECK (amount_minor > 0),
    currency         TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    channel_id       TEXT,
    channel_order_id TEXT,
    reason           TEXT,
    created_at_ms    BIGINT  NOT NULL,
    updated_at_ms    BIGINT  NOT NULL,
    UNIQUE (payment_id, number)
);
CREATE INDEX refunds_pending ON refunds (updated_at_ms) WHERE status = 'pending';
