SELECT position FROM positions WHERE subscription = ?1
