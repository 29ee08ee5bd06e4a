-- Serialises the host's appends store-wide, as SQLite's write lock does: global positions then become
-- visible in order, so a subscription that has read past a position never misses a message committed
-- later with a smaller one. (MessageDB clients serialise only per category; see docs/architecture.md.)
SELECT pg_advisory_xact_lock(7362836200114529281)
