-- Migration 6: a version per document, so a write can be made conditional on the version its handler
-- read (optimistic concurrency). Versions come from one sequence and are never reused, not even by a
-- document deleted and written again. Existing documents get a version each (the table is rewritten).
CREATE SEQUENCE protean.document_versions;
ALTER TABLE protean.documents
    ADD COLUMN version bigint NOT NULL DEFAULT nextval('protean.document_versions');
ALTER SEQUENCE protean.document_versions OWNED BY protean.documents.version;
