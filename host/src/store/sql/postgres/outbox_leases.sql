SELECT target, worker, until FROM protean.outbox_leases
