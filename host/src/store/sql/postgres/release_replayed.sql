-- The key parked behind the dead letter at $2 is released once no dead letter of that message waits.
UPDATE protean.parked_keys SET released = true
WHERE subscription = $1 AND dead_letter = $2
  AND NOT EXISTS (
      SELECT 1 FROM protean.dead_letters
      WHERE subscription = $1 AND global_position = $2 AND replayed_by IS NULL
  )
