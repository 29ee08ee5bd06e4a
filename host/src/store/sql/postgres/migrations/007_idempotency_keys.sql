-- Migration 7: units committed under an idempotency key (a `send` with --idempotency-key). The key is
-- inserted in the unit's transaction, so a second unit with it is refused (and a concurrent one waits
-- for the first to end): a retry after an unknown outcome cannot store its command twice.
CREATE TABLE protean.idempotency_keys (
    key          text PRIMARY KEY,
    message_id   text NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now()
);
