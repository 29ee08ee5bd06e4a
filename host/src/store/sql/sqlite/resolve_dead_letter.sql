-- The oldest waiting dead letter of the message: a replay that fails again adds a newer one.
UPDATE dead_letters SET replayed_by = ?3, replayed_at = ?4
WHERE seq = (
    SELECT min(seq) FROM dead_letters
    WHERE subscription = ?1 AND global_position = ?2 AND replayed_by IS NULL
)
