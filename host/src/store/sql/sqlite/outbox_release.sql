DELETE FROM outbox_leases WHERE worker = ?1
