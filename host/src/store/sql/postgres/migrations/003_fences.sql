-- Migration 3: the highest fencing token committed per owned name (a partition of keys), so that a
-- replica that lost its lease (it stalled past it) cannot commit any more.
CREATE TABLE protean.fences (
    name  text   PRIMARY KEY,
    token bigint NOT NULL
);
