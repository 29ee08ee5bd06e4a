-- Raise the fence of a name to this token, or change nothing when a newer owner's is higher: the caller
-- reads no affected row as a refusal. An equal token is the same owner committing again. The row stays
-- locked until the transaction ends, so a takeover's fence waits for an old owner's commit in flight:
-- that commit either lands before the takeover or fails.
INSERT INTO protean.fences AS fences (name, token) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET token = excluded.token WHERE excluded.token >= fences.token
