-- Migration 5: rows that older builds gave up on ('abandoned' after outbox.max_attempts) are pending
-- again. Nothing committed is lost: they are published, in order, before the rows behind them.
UPDATE protean.outbox SET status = 'pending', next_attempt_at = 0 WHERE status = 'abandoned';
