INSERT INTO protean.calls_in_flight (subscription, identity, attempts)
SELECT * FROM unnest($1::text[], $2::text[], $3::int[])
ON CONFLICT (subscription, identity) DO UPDATE SET attempts = excluded.attempts, started_at = now()
