-- Migration 10: ordered event-store subscriptions park a key after a dead letter. `dead_letter` is the
-- global position of the dead letter the key waits behind; `released` is set when it was replayed
-- (and handled) or purged. The messages held behind a key stay in message_store.messages: a row here
-- names one by its global position until it is handled, in order, and the key is unparked.
CREATE TABLE IF NOT EXISTS protean.parked_keys (
    subscription text        NOT NULL,
    ordering_key text        NOT NULL,
    dead_letter  bigint      NOT NULL,
    released     boolean     NOT NULL DEFAULT false,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, ordering_key)
);
CREATE TABLE IF NOT EXISTS protean.held_messages (
    subscription    text   NOT NULL,
    ordering_key    text   NOT NULL,
    global_position bigint NOT NULL,
    PRIMARY KEY (subscription, ordering_key, global_position)
);
