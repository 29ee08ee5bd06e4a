-- Migration 8: processed markers name the message's identity (`{stream}@{position}`), not its
-- metadata.headers.id, which Protean 0.18 gives every command of an aggregate alike (so the host took
-- the second command of an aggregate for a redelivery of the first).
-- A marker an older build wrote names a headers.id: it becomes the identity of the first stored message
-- with that id, the one that build handled (it read in store order and took the later ones for
-- redeliveries). Markers of broker entries not stored here keep their id, which is still the identity
-- of such an entry when it carries no positions.
UPDATE protean.processed p
SET message_id = m.identity
FROM (
    SELECT DISTINCT ON (headers_id) headers_id, identity
    FROM (
        SELECT coalesce(metadata #>> '{headers,id}', id::text) AS headers_id,
               stream_name || '@' || position AS identity,
               global_position
        FROM message_store.messages
    ) ids
    WHERE headers_id IN (SELECT message_id FROM protean.processed)
    ORDER BY headers_id, global_position
) m
WHERE p.message_id = m.headers_id;

-- Dead letters of event-store subscriptions can be replayed: a replayed one keeps its row, with the
-- build that handled it (its own build_id is the one that failed), and no longer counts as waiting.
ALTER TABLE protean.dead_letters
    ADD COLUMN IF NOT EXISTS replayed_by text, ADD COLUMN IF NOT EXISTS replayed_at timestamptz;
