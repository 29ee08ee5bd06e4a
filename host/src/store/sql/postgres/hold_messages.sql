-- Only behind a parked key (the caller compares the keys found with those given and rolls the unit back
-- when one is not parked); a message held twice (a worker reading again from its position) is kept once.
-- Returns the keys that are not parked.
WITH held AS (SELECT * FROM unnest($2::text[], $3::bigint[]) AS h (ordering_key, global_position)),
inserted AS (
    INSERT INTO protean.held_messages (subscription, ordering_key, global_position)
    SELECT $1::text, h.ordering_key, h.global_position FROM held h
    WHERE EXISTS (SELECT 1 FROM protean.parked_keys p WHERE p.subscription = $1 AND p.ordering_key = h.ordering_key)
    ON CONFLICT DO NOTHING
)
SELECT DISTINCT h.ordering_key FROM held h
WHERE NOT EXISTS (SELECT 1 FROM protean.parked_keys p WHERE p.subscription = $1 AND p.ordering_key = h.ordering_key)
