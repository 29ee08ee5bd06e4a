-- ?2: a JSON array of the identities wanted, or NULL for all of the subscription's.
SELECT identity, attempts FROM calls_in_flight
WHERE subscription = ?1 AND (?2 IS NULL OR identity IN (SELECT value FROM json_each(?2)))
