UPDATE parked_keys SET released = 1 WHERE subscription = ?1
