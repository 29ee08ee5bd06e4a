SELECT token FROM protean.fences WHERE name = $1
