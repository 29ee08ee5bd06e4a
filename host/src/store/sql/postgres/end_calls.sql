DELETE FROM protean.calls_in_flight c
USING unnest($1::text[], $2::text[]) AS e(subscription, identity)
WHERE c.subscription = e.subscription AND c.identity = e.identity
