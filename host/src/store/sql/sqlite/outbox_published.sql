-- OR FAIL: no constraint of these columns can fail, and any error rolls the whole unit back, so the
-- statement needs no journal of its own. With the default (ABORT), SQLite keeps the original of every
-- page a multi-row update changes in a statement journal, which a round of 500 rows spilled to a
-- temporary file (created, written and unlinked every round).
UPDATE OR FAIL outbox SET status = 'published', published_at = ?3 WHERE seq BETWEEN ?1 AND ?2
