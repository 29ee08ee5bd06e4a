-- A batch's markers (see schema.sql): those under the global positions in ?2 (the caller keeps the
-- rows whose identity is its message's), and those under 0 of the identities in ?3 (messages without
-- a global position). Primary-key lookups only.
SELECT global_position, message_id FROM processed
WHERE subscription = ?1 AND global_position IN (SELECT value FROM json_each(?2))
UNION ALL
SELECT 0, message_id FROM processed
WHERE subscription = ?1 AND global_position = 0 AND message_id IN (SELECT value FROM json_each(?3))
