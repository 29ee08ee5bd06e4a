-- Raise the fence of a name to this token, or change nothing when a newer owner's is higher: the caller
-- reads no changed row as a refusal. An equal token is the same owner committing again.
INSERT INTO protean_fences (name, token) VALUES (?1, ?2)
ON CONFLICT (name) DO UPDATE SET token = excluded.token WHERE excluded.token >= protean_fences.token
