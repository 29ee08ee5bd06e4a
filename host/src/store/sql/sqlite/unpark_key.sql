-- Released, and nothing it holds is left (a held row whose message is gone from the store holds nothing).
DELETE FROM parked_keys
WHERE subscription = ?1 AND ordering_key = ?2 AND released = 1
  AND NOT EXISTS (
      SELECT 1 FROM held_messages h JOIN messages m ON m.global_position = h.global_position
      WHERE h.subscription = ?1 AND h.ordering_key = ?2
  )
