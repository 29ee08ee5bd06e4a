SELECT token FROM protean_fences WHERE name = ?1
