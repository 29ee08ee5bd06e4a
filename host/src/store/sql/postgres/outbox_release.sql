DELETE FROM protean.outbox_leases WHERE worker = $1
