-- Outbox rows keep a checksum of their message's text (`text_checksum`). Run once, when the column
-- is missing (a file of an older build); the rows it wrote have none, and their text is parsed.
ALTER TABLE outbox ADD COLUMN checksum INTEGER;
