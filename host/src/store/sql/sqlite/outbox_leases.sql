SELECT target, worker, until FROM outbox_leases
