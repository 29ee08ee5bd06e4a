DELETE FROM protean.leases WHERE name = $1 AND owner = $2
