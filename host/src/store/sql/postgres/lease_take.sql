-- Take the lease when it is free or expired, or renew it when this owner holds it; a row comes back
-- only when the caller holds the lease afterwards.
INSERT INTO protean.leases (name, owner, expires_at)
VALUES ($1, $2, clock_timestamp() + $3::bigint * interval '1 millisecond')
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
WHERE protean.leases.owner = excluded.owner OR protean.leases.expires_at < clock_timestamp()
RETURNING owner
