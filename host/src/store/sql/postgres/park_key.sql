-- Parked (again): waiting behind this dead letter, not released.
INSERT INTO protean.parked_keys (subscription, ordering_key, dead_letter)
SELECT $1::text, * FROM unnest($2::text[], $3::bigint[])
ON CONFLICT (subscription, ordering_key)
DO UPDATE SET dead_letter = excluded.dead_letter, released = false, parked_at = now()
