INSERT INTO protean.outbox_leases (target, worker, until) SELECT t, $2, $3 FROM unnest($1::text[]) AS t
ON CONFLICT (target) DO UPDATE SET worker = excluded.worker, until = excluded.until
