-- Take the lease when it is free or expired, or renew it when this owner holds it; a row (its fencing
-- token) comes back only when the caller holds the lease afterwards. A new owner's token is above the
-- row's and the recorded fence's; a renewal keeps its own.
INSERT INTO protean.leases AS leases (name, owner, expires_at, token)
VALUES ($1, $2, clock_timestamp() + $3::bigint * interval '1 millisecond',
        COALESCE((SELECT token FROM protean.fences WHERE name = $1), 0) + 1)
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at,
    token = CASE WHEN leases.owner = excluded.owner THEN leases.token
                 ELSE GREATEST(leases.token + 1, excluded.token) END
WHERE leases.owner = excluded.owner OR leases.expires_at < clock_timestamp()
RETURNING token
