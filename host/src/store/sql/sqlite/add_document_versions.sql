-- A store file made before documents had versions: every existing document gets version 1.
ALTER TABLE documents ADD COLUMN version INTEGER NOT NULL DEFAULT 1
