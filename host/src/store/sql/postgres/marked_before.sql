-- The first of a refused unit's markers that cannot be written: one that another transaction
-- committed, or one the unit holds twice. Run after the refused statement or transaction ended, so
-- no marker of the unit itself is found.
SELECT m.message_id
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS m (subscription, message_id, n)
WHERE EXISTS (
    SELECT FROM protean.processed AS p
    WHERE (p.subscription, p.message_id) = (m.subscription, m.message_id)
) OR EXISTS (
    SELECT FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS o (subscription, message_id, n)
    WHERE (o.subscription, o.message_id) = (m.subscription, m.message_id) AND o.n < m.n
)
ORDER BY m.n
LIMIT 1
