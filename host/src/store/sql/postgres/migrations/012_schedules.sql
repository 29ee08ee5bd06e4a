-- Migration 12: scheduled messages, by key (see store::schedules). `id` is the message id the schedule
-- appends when it fires; `state` leaves 'pending' once, for 'fired' or 'cancelled' (at `settled_ms`).
-- `data` and `metadata` are kept as the text written (jsonb would reorder keys and respace it): the
-- message is stored as any other when it fires. Keys sort bytewise ("C"), as in every backend.
-- Settled rows are not in the index, so finding what is due costs the same however many have fired.
CREATE TABLE IF NOT EXISTS protean.schedules (
    key          text COLLATE "C" PRIMARY KEY,
    id           text   NOT NULL,
    due_ms       bigint NOT NULL,
    stream       text   NOT NULL,
    message_type text   NOT NULL,
    data         text   NOT NULL,
    metadata     text   NOT NULL,
    state        text   NOT NULL CHECK (state IN ('pending', 'fired', 'cancelled')),
    settled_ms   bigint
);
CREATE INDEX IF NOT EXISTS schedules_pending ON protean.schedules (due_ms, key)
    WHERE state = 'pending';
-- Settled rows by when they settled: the hourly prune deletes the oldest a chunk at a time, each chunk
-- an index range instead of a scan of every schedule kept.
CREATE INDEX IF NOT EXISTS schedules_settled ON protean.schedules (settled_ms)
    WHERE state <> 'pending';
