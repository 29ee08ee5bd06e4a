DELETE FROM calls_in_flight WHERE subscription = ?1 AND identity = ?2
