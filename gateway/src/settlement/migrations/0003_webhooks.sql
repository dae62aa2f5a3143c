-- 0003_webhooks: the merchant webhook outbox (docs/webhooks.md). Events are inserted in the
-- same transaction that writes the payment's final state (a settlement's commit, or a final
-- status without money), so an event exists if and only if that state is on disk. Portable SQL.

CREATE TABLE webhook_events (
    -- `evt_` + 26 base62 characters: the event id merchants deduplicate on (X-Webhook-Id).
    id                 TEXT    PRIMARY KEY,
    merchant_id        TEXT    NOT NULL,
    payment_id         TEXT    NOT NULL,
    -- payment.succeeded, payment.failed, payment.canceled, payment.expired,
    -- payment.late_money, refund.succeeded, ...
    type               TEXT    NOT NULL,
    -- Tells apart several events of one type for one payment: the settlement's sequence (the
    -- refund number, the attempt of late money); 0 for a final status.
    sequence           INTEGER NOT NULL,
    -- The exact JSON body POSTed (and signed).
    payload            TEXT    NOT NULL,
    -- The payment's notify_url; NULL: the merchant's configured webhook_url at delivery time.
    url                TEXT,
    status             TEXT    NOT NULL
        CHECK (status IN ('pending', 'delivered', 'failed', 'skipped')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    -- When a pending event is due (or, while a worker holds it, when its lease ends).
    next_attempt_at_ms BIGINT,
    last_status        INTEGER,
    last_error         TEXT,
    created_at_ms      BIGINT  NOT NULL,
    updated_at_ms      BIGINT  NOT NULL
);

-- A re-driven commit (recovery after a crash) or a repeated final status never enqueues twice.
-- Its index also serves look-ups by payment (the payment's delivery status), payment_id being
-- its first column.
CREATE UNIQUE INDEX webhook_events_once ON webhook_events (payment_id, type, sequence);

-- The delivery worker's scan: due pending events, oldest first. Finished events leave the
-- index, so it stays as small as the backlog.
CREATE INDEX webhook_events_due ON webhook_events (next_attempt_at_ms)
    WHERE status = 'pending';
