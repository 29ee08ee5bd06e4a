-- The handler saw no document: insert, or change nothing when one exists (the caller reads no row as a
-- conflict). A concurrent insert not yet committed makes this wait for it, then change nothing.
INSERT INTO protean.documents (collection, id, data) VALUES ($1, $2, $3)
ON CONFLICT (collection, id) DO NOTHING
