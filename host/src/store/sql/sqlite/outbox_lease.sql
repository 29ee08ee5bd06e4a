INSERT INTO outbox_leases (target, worker, until) VALUES (?1, ?2, ?3) ON CONFLICT (target) DO UPDATE SET worker = excluded.worker, until = excluded.until
