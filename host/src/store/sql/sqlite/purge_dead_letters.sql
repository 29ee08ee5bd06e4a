DELETE FROM dead_letters WHERE subscription = ?1 AND replayed_by IS NULL
