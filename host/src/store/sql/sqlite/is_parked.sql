SELECT count(*) FROM parked_keys WHERE subscription = ?1 AND ordering_key = ?2
