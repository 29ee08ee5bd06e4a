-- Processed markers of a file an older build made (keyed by subscription and identity) rekeyed by
-- global position (see schema.sql). Run once, inside the schema transaction, when the column is
-- missing. A marker names its message's identity, `{stream}@{position}` (digits after the last `@`):
-- a marker of a message of this store gets its global position. Any other (a broker entry this store
-- does not hold, the id of an entry without positions) is kept by identity alone in
-- processed_before_positions, where every lookup and insert also looks while it has rows.
CREATE TABLE processed_by_position (
    subscription    TEXT    NOT NULL,
    global_position INTEGER NOT NULL,
    message_id      TEXT    NOT NULL,
    build_id        TEXT    NOT NULL,
    processed_at    TEXT    NOT NULL,
    PRIMARY KEY (subscription, global_position, message_id)
) WITHOUT ROWID;
CREATE TABLE processed_before_positions (
    subscription TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    build_id     TEXT NOT NULL,
    processed_at TEXT NOT NULL,
    PRIMARY KEY (subscription, message_id)
) WITHOUT ROWID;
CREATE TEMP TABLE resolved AS
SELECT p.subscription, m.global_position, p.message_id, p.build_id, p.processed_at
FROM processed AS p
LEFT JOIN messages AS m
    ON length(rtrim(p.message_id, '0123456789')) < length(p.message_id)
   AND substr(rtrim(p.message_id, '0123456789'), -1) = '@'
   AND m.stream_name = substr(p.message_id, 1, length(rtrim(p.message_id, '0123456789')) - 1)
   AND m.position = CAST(substr(p.message_id, length(rtrim(p.message_id, '0123456789')) + 1) AS INTEGER);
INSERT INTO processed_by_position
SELECT * FROM resolved WHERE global_position IS NOT NULL;
INSERT INTO processed_before_positions
SELECT subscription, message_id, build_id, processed_at FROM resolved WHERE global_position IS NULL;
DROP TABLE resolved;
DROP TABLE processed;
ALTER TABLE processed_by_position RENAME TO processed;
