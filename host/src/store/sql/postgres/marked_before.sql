-- The first of a refused unit's markers that cannot be written: one that another transaction
-- committed, or one the unit holds twice. The unit's own markers, which the statement that found the
-- conflict may have inserted in this transaction, have this transaction as xmin.
SELECT m.message_id
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS m (subscription, message_id, n)
WHERE EXISTS (
    SELECT FROM protean.processed AS p
    WHERE (p.subscription, p.message_id) = (m.subscription, m.message_id)
      AND p.xmin <> pg_current_xact_id()::xid
) OR EXISTS (
    SELECT FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS o (subscription, message_id, n)
    WHERE (o.subscription, o.message_id) = (m.subscription, m.message_id) AND o.n < m.n
)
ORDER BY m.n
LIMIT 1
