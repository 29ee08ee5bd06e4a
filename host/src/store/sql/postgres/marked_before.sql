-- The first of a refused unit's markers that another transaction committed. Its own markers, which
-- the statement that found the conflict inserted in this transaction, have this transaction as xmin.
SELECT m.message_id
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS m (subscription, message_id, n)
JOIN protean.processed p USING (subscription, message_id)
WHERE p.xmin <> pg_current_xact_id()::xid
ORDER BY m.n
LIMIT 1
