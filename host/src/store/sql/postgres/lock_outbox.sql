-- Outbox claims are serialised across processors (in every replica), as SQLite's write lock does.
SELECT pg_advisory_xact_lock(7362836200114529282)
