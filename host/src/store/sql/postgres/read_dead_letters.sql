SELECT subscription, handler, message_id, stream, global_position, type, data, metadata, error, attempts, build_id, failed_at
FROM protean.dead_letters WHERE ($1::text IS NULL OR subscription = $1) AND replayed_by IS NULL ORDER BY seq
