-- $2: the identities wanted, or NULL for all of the subscription's.
SELECT identity, attempts FROM protean.calls_in_flight
WHERE subscription = $1 AND ($2::text[] IS NULL OR identity = ANY($2::text[]))
