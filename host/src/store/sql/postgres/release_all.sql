UPDATE protean.parked_keys SET released = true WHERE subscription = $1
