SELECT position FROM protean.positions WHERE subscription = $1
