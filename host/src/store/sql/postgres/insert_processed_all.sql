-- Every marker or none, as one statement (a transaction of its own): a marker that exists means
-- another consumer committed the message first, and fails the statement whole (unique_violation),
-- the call records it ends ($4, $5: subscriptions and identities) included.
WITH ended AS (
    DELETE FROM protean.calls_in_flight c
    USING unnest($4::text[], $5::text[]) AS e(subscription, identity)
    WHERE c.subscription = e.subscription AND c.identity = e.identity
)
INSERT INTO protean.processed (subscription, message_id, build_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
