-- A marker that exists means another consumer committed the message first: the insert fails
-- (unique_violation on processed_pkey) and the caller rolls the unit back. A plain insert, not
-- ON CONFLICT DO NOTHING: that probes the key before each row's insert, which probes it again, and
-- cost 4 µs more a marker (pgbench, 100 markers a statement). Two more writes of a
-- unit that settles handled messages go in the same statement, a round trip each fewer; the rollback
-- takes them back too: the call records it ends ($4, $5: subscriptions and identities, maybe none)
-- and the subscription's new position ($6, $7: none when NULL; as upsert_position.sql).
WITH ended AS (
    DELETE FROM protean.calls_in_flight c
    USING unnest($4::text[], $5::text[]) AS e(subscription, identity)
    WHERE c.subscription = e.subscription AND c.identity = e.identity
), moved AS (
    INSERT INTO protean.positions (subscription, position)
    SELECT $6::text, $7::bigint WHERE $6::text IS NOT NULL
    ON CONFLICT (subscription) DO UPDATE SET position = excluded.position, updated_at = now()
)
INSERT INTO protean.processed (subscription, message_id, build_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
