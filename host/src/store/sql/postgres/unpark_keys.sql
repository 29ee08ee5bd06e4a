-- Released, and nothing it holds is left (a held row whose message is gone from the store holds nothing);
-- such rows go with the key.
WITH unparked AS (
    DELETE FROM protean.parked_keys p
    WHERE p.subscription = $1 AND p.ordering_key = ANY($2::text[]) AND p.released
      AND NOT EXISTS (
          SELECT 1 FROM protean.held_messages h JOIN message_store.messages m USING (global_position)
          WHERE h.subscription = p.subscription AND h.ordering_key = p.ordering_key
      )
    RETURNING p.ordering_key
)
DELETE FROM protean.held_messages h USING unparked u
WHERE h.subscription = $1 AND h.ordering_key = u.ordering_key
