-- Several categories in one statement, with their write locks taken shared first (migration 15): no
-- message of them can still commit below what it returns.
FROM protean.read_categories_shared($1::text[], $2, $3, $4)
