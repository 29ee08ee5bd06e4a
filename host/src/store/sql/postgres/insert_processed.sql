-- A marker that exists means another consumer committed the message first: the caller compares the
-- rows inserted with the markers given and rolls the unit back when they differ. The call records the
-- unit ends ($4, $5: subscriptions and identities, maybe none) go in the same statement, a round trip
-- fewer on every unit that settles handled messages; the rollback takes them back too.
WITH ended AS (
    DELETE FROM protean.calls_in_flight c
    USING unnest($4::text[], $5::text[]) AS e(subscription, identity)
    WHERE c.subscription = e.subscription AND c.identity = e.identity
)
INSERT INTO protean.processed (subscription, message_id, build_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT DO NOTHING
