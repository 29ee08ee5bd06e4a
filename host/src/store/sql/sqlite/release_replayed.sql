-- The key parked behind the dead letter at ?2 is released once no dead letter of that message waits.
UPDATE parked_keys SET released = 1
WHERE subscription = ?1 AND dead_letter = ?2
  AND NOT EXISTS (
      SELECT 1 FROM dead_letters WHERE subscription = ?1 AND global_position = ?2 AND replayed_by IS NULL
  )
