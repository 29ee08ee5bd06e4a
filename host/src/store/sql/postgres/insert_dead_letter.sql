INSERT INTO protean.dead_letters (subscription, handler, message_id, stream, global_position, type, data, metadata, error, attempts, build_id, failed_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
