DELETE FROM schedules
WHERE key IN (
    SELECT key FROM schedules
    WHERE state <> 'pending' AND settled_ms < ?1
    ORDER BY settled_ms
    LIMIT ?2
)
