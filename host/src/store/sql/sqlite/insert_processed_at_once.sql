-- A full batch's markers in one statement; `insert_at_once` appends the rows. OR FAIL: a marker that
-- exists stops the statement where it is, and the whole unit is rolled back and applied again with
-- its markers one by one, which names that marker. So the statement needs no journal of its own: with
-- the default (ABORT), SQLite keeps the original of every page the statement changes, to undo it
-- alone, and for a full batch that journal spilled to a temporary file, created, written and unlinked
-- on every commit.
INSERT OR FAIL INTO processed (subscription, global_position, message_id, build_id, processed_at)
VALUES
