DELETE FROM protean.schedules
WHERE key IN (
    SELECT key FROM protean.schedules
    WHERE state <> 'pending' AND settled_ms < $1
    ORDER BY settled_ms
    LIMIT $2
)
