-- Version 2: processed markers name the message's identity (`{stream}@{position}`), not its
-- metadata.headers.id (Protean 0.18 gives every command of an aggregate that aggregate's id). A marker
-- an older build wrote names a headers.id, unique in this table of messages: it becomes that message's
-- identity. Markers of broker entries that are not stored here keep their id, which is still the
-- identity of such an entry when it carries no positions. Run once, on a file below version 2 (it
-- reads every marker).
UPDATE OR IGNORE processed
SET message_id = (
    SELECT m.stream_name || '@' || m.position FROM messages m WHERE m.id = processed.message_id
)
WHERE message_id IN (SELECT id FROM messages);
