-- Migration 2: the host's own tables, in their own schema so that message_store stays MessageDB's.
CREATE SCHEMA IF NOT EXISTS protean;

CREATE TABLE protean.positions (
    subscription text PRIMARY KEY,
    position     bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE protean.documents (
    collection text NOT NULL,
    id         text NOT NULL,
    data       text NOT NULL,
    PRIMARY KEY (collection, id)
);

-- One row per top-level scalar field of a document, so find-by-field is an index lookup.
CREATE TABLE protean.document_fields (
    collection text NOT NULL,
    field      text NOT NULL,
    value      text NOT NULL,
    id         text NOT NULL,
    PRIMARY KEY (collection, field, value, id)
);
CREATE INDEX document_fields_by_id ON protean.document_fields (collection, id);

CREATE TABLE protean.processed (
    subscription text NOT NULL,
    message_id   text NOT NULL,
    build_id     text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, message_id)
);

CREATE TABLE protean.dead_letters (
    seq             bigserial PRIMARY KEY,
    subscription    text   NOT NULL,
    handler         text   NOT NULL,
    message_id      text   NOT NULL,
    stream          text   NOT NULL,
    global_position bigint NOT NULL,
    type            text   NOT NULL,
    data            text   NOT NULL,
    metadata        text   NOT NULL,
    error           text   NOT NULL,
    attempts        bigint NOT NULL,
    build_id        text   NOT NULL,
    failed_at       text   NOT NULL
);
CREATE INDEX dead_letters_subscription ON protean.dead_letters (subscription, seq);

-- Messages waiting to be published to the broker (written in the same transaction as the message).
CREATE TABLE protean.outbox (
    seq             bigserial PRIMARY KEY,
    global_position bigint NOT NULL,
    target          text   NOT NULL,
    status          text   NOT NULL DEFAULT 'pending',
    attempts        bigint NOT NULL DEFAULT 0,
    next_attempt_at bigint NOT NULL DEFAULT 0,
    last_error      text,
    published_at    timestamptz
);
CREATE INDEX outbox_pending ON protean.outbox (seq) WHERE status = 'pending';

-- Which outbox processor publishes to a target stream now, so that a stream's order is kept.
CREATE TABLE protean.outbox_leases (
    target text   PRIMARY KEY,
    worker text   NOT NULL,
    until  bigint NOT NULL
);

-- Which replica runs an event-store subscription, until when (the database's clock: replicas' clocks
-- may disagree, the database's is one).
CREATE TABLE protean.leases (
    name       text PRIMARY KEY,
    owner      text NOT NULL,
    expires_at timestamptz NOT NULL
);
