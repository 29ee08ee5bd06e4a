-- Migration 9: handler calls started and not yet settled (see CallRecord). A process that dies in a
-- call (abort, segfault, OOM kill, a supervisor ending a hung call) leaves its rows behind, and the next
-- handler of those messages counts the call as a failed attempt instead of dying on it forever.
CREATE TABLE protean.calls_in_flight (
    subscription text NOT NULL,
    identity     text NOT NULL,
    attempts     integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, identity)
);
