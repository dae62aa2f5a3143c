-- 0007_transfers, both backends, after the table.
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
