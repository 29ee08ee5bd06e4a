-- One `db setup` at a time, until its transaction ends.
SELECT pg_advisory_xact_lock(7362836200114529280)
