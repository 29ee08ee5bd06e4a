WHERE key = $1
