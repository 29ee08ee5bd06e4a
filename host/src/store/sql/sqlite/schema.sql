-- The SQLite store's schema (its version is `SCHEMA_VERSION` in sqlite.rs, kept in user_version).
-- Applied in one transaction at every open; every statement is idempotent, and none may scan a table
-- that grows with use (markers, messages): an open would cost more with every message handled. What
-- upgrades a file once is run by `upgrade` in sqlite.rs, only when user_version says the file needs it.
CREATE TABLE IF NOT EXISTS messages (
    global_position INTEGER PRIMARY KEY AUTOINCREMENT,
    position        INTEGER NOT NULL,
    time            TEXT    NOT NULL,
    stream_name     TEXT    NOT NULL,
    category        TEXT    NOT NULL,
    type            TEXT    NOT NULL,
    data            TEXT    NOT NULL,
    metadata        TEXT    NOT NULL,
    id              TEXT    NOT NULL UNIQUE
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_stream ON messages (stream_name, position);
CREATE INDEX IF NOT EXISTS messages_category ON messages (category, global_position);

CREATE TABLE IF NOT EXISTS positions (
    subscription TEXT PRIMARY KEY,
    position     INTEGER NOT NULL,
    updated_at   TEXT    NOT NULL
) WITHOUT ROWID;

-- `version` changes with every write (drawn from protean_counters, never reused), so a write can be
-- made conditional on the version its handler read. Files made before it had the column get it from
-- `add_document_versions.sql`.
CREATE TABLE IF NOT EXISTS documents (
    collection TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    data       TEXT    NOT NULL,
    version    INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (collection, id)
) WITHOUT ROWID;

-- Store-wide counters: `document_version` is the last document version drawn. It starts at 1, the
-- version of every document that existed before versions did, so a drawn version is always newer.
CREATE TABLE IF NOT EXISTS protean_counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO protean_counters (name, value) VALUES ('document_version', 1);

-- One row per top-level scalar field of a document, so find-by-field is an index lookup.
CREATE TABLE IF NOT EXISTS document_fields (
    collection TEXT NOT NULL,
    field      TEXT NOT NULL,
    value      TEXT NOT NULL,
    id         TEXT NOT NULL,
    PRIMARY KEY (collection, field, value, id)
) WITHOUT ROWID;
-- Rewriting a document first removes its old field rows, by id.
CREATE INDEX IF NOT EXISTS document_fields_by_id ON document_fields (collection, id);

-- Processed markers, keyed by the message's global position before its identity, so that a batch's
-- markers land side by side at the end of their subscription's keys (keyed by identity alone, they
-- landed all over the B-tree, each commit of a batch rewriting dozens of pages). A message without a
-- global position (0: a broker entry published without positions) is found by its identity under 0.
-- Markers an older build wrote are rekeyed once (markers_by_position.sql).
CREATE TABLE IF NOT EXISTS processed (
    subscription    TEXT    NOT NULL,
    global_position INTEGER NOT NULL,
    message_id      TEXT    NOT NULL,
    build_id        TEXT    NOT NULL,
    processed_at    TEXT    NOT NULL,
    PRIMARY KEY (subscription, global_position, message_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS dead_letters (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    subscription    TEXT    NOT NULL,
    handler         TEXT    NOT NULL,
    message_id      TEXT    NOT NULL,
    stream          TEXT    NOT NULL,
    global_position INTEGER NOT NULL,
    type            TEXT    NOT NULL,
    data            TEXT    NOT NULL,
    metadata        TEXT    NOT NULL,
    error           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL,
    build_id        TEXT    NOT NULL,
    failed_at       TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_subscription ON dead_letters (subscription, seq);

-- Messages waiting to be published to the broker (written in the same transaction as the message).
CREATE TABLE IF NOT EXISTS outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    global_position INTEGER NOT NULL,
    target          TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    published_at    TEXT,
    checksum        INTEGER
);
-- `checksum`: of the message's text as committed (`text_checksum`); text that still has it is known to
-- be JSON. NULL on rows of older builds.
-- `status` is 'pending' for every row this build keeps (a published row is deleted, see below), and
-- `published_at` is no longer written: both stay for the files of older builds.
-- Pending rows only: the claim and the counts read them through it, whatever else the table holds.
DROP INDEX IF EXISTS outbox_status;
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS outbox_abandoned ON outbox (seq) WHERE status = 'abandoned';
-- Rows that older builds gave up on ('abandoned' after outbox.max_attempts) are pending again: nothing
-- committed is lost. Cheap on every open (the index above finds none).
UPDATE outbox SET status = 'pending', next_attempt_at = 0 WHERE status = 'abandoned';
-- A published row is deleted (`outbox_published.sql`). Older builds marked it 'published' and kept it
-- for ever: such rows go here, found through this index (it holds none after the first open).
CREATE INDEX IF NOT EXISTS outbox_published ON outbox (seq) WHERE status = 'published';
DELETE FROM outbox INDEXED BY outbox_published WHERE status = 'published';

-- Which outbox processor publishes to a target stream now, so that a stream's order is kept.
CREATE TABLE IF NOT EXISTS outbox_leases (
    target TEXT    PRIMARY KEY,
    worker TEXT    NOT NULL,
    until  INTEGER NOT NULL
) WITHOUT ROWID;

-- The highest fencing token committed per owned name (a partition of keys): a commit with a lower one
-- comes from an owner that lost its lease and is refused.
CREATE TABLE IF NOT EXISTS protean_fences (
    name  TEXT    PRIMARY KEY,
    token INTEGER NOT NULL
) WITHOUT ROWID;

-- Units committed under an idempotency key (a `send` with --idempotency-key): a second unit with the
-- same key is refused, so a retry after an unknown outcome cannot store its command twice.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key          TEXT PRIMARY KEY,
    message_id   TEXT NOT NULL,
    committed_at TEXT NOT NULL
) WITHOUT ROWID;

-- Handler calls started and not yet settled (see CallRecord): a process that dies in a call leaves its
-- rows, and the next handler of those messages counts the call as a failed attempt.
CREATE TABLE IF NOT EXISTS calls_in_flight (
    subscription TEXT    NOT NULL,
    identity     TEXT    NOT NULL,
    attempts     INTEGER NOT NULL,
    PRIMARY KEY (subscription, identity)
) WITHOUT ROWID;

-- Since version 4: keys of ordered event-store subscriptions parked behind a dead letter (`dead_letter`:
-- its global position; `released` once it was replayed or purged), and the messages held behind them,
-- by global position, until they are handled in order and the key is unparked.
CREATE TABLE IF NOT EXISTS parked_keys (
    subscription TEXT    NOT NULL,
    ordering_key TEXT    NOT NULL,
    dead_letter  INTEGER NOT NULL,
    released     INTEGER NOT NULL DEFAULT 0,
    parked_at    TEXT    NOT NULL,
    PRIMARY KEY (subscription, ordering_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS held_messages (
    subscription    TEXT    NOT NULL,
    ordering_key    TEXT    NOT NULL,
    global_position INTEGER NOT NULL,
    PRIMARY KEY (subscription, ordering_key, global_position)
) WITHOUT ROWID;

-- Since version 5: scheduled messages, by key (see store::schedules). `id` is the message id the schedule
-- appends when it fires; `state` leaves 'pending' once, for 'fired' or 'cancelled' (at `settled_ms`).
-- Settled rows are not in the index, so finding what is due costs the same however many have fired.
CREATE TABLE IF NOT EXISTS schedules (
    key          TEXT    PRIMARY KEY,
    id           TEXT    NOT NULL,
    due_ms       INTEGER NOT NULL,
    stream       TEXT    NOT NULL,
    message_type TEXT    NOT NULL,
    data         TEXT    NOT NULL,
    metadata     TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('pending', 'fired', 'cancelled')),
    settled_ms   INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS schedules_pending ON schedules (due_ms, key) WHERE state = 'pending';
-- Settled rows by when they settled: the hourly prune deletes the oldest a chunk at a time.
CREATE INDEX IF NOT EXISTS schedules_settled ON schedules (settled_ms) WHERE state <> 'pending';
