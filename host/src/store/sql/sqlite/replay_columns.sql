-- Dead letters of event-store subscriptions can be replayed: a replayed one keeps its row, with the
-- build that handled it (its own build_id is the one that failed), and no longer counts as waiting.
-- Run once, when the columns are missing (a file of an older build).
ALTER TABLE dead_letters ADD COLUMN replayed_by TEXT;
ALTER TABLE dead_letters ADD COLUMN replayed_at TEXT;
