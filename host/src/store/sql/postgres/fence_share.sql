-- The token recorded for a name, share-locked until the transaction ends: the same owner committing
-- again writes nothing (no new row version per commit), and a takeover's raise of the fence (an
-- UPDATE) waits for this commit, which so lands before the takeover or not at all.
SELECT token FROM protean.fences WHERE name = $1 FOR SHARE
