-- The applied migrations; an empty answer when the store was never set up (no error to tell apart).
SELECT v.version FROM protean.schema_version v ORDER BY v.version
