-- Draw ?1 document versions at once; the last of them is returned, the others are the ?1 - 1 before
-- it. In the unit's write transaction, so they are the versions ?1 draws of one would have given.
UPDATE protean_counters SET value = value + ?1 WHERE name = 'document_version' RETURNING value
