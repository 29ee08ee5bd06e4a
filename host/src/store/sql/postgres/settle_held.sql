DELETE FROM protean.held_messages h
USING unnest($2::text[], $3::bigint[]) AS s (ordering_key, global_position)
WHERE h.subscription = $1 AND h.ordering_key = s.ordering_key AND h.global_position = s.global_position
