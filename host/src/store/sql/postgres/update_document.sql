-- Replace the version the handler read, or change nothing (a conflict). A concurrent writer's row
-- makes this wait for its transaction, then check the version of the row it committed.
UPDATE protean.documents SET data = $3, version = nextval('protean.document_versions')
WHERE collection = $1 AND id = $2 AND version = $4
