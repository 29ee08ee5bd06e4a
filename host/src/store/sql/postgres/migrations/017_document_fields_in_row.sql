-- Migration 17: a document's field index entries live in its own row (`fields`, under a GIN index)
-- instead of a table of their own. The table made every document write three more statements and a
-- dozen row inserts (a heap row and two btree entries each): the largest share of the database's CPU
-- in the sample flow. An update now writes the entries with the data, in the same statement.
--
-- An entry is `<bytes of the collection>:<collection><field>=<value as canonical JSON>` (the length
-- first, so that no two (collection, field, value) make one entry whatever the collection's name); an
-- entry longer than 512 bytes is `#` and the SHA-256 of it in hex, as an index entry is limited to a
-- third of a page (the old table's primary key had the same limit, and refused such documents).
--
-- Servers of older builds write the old table: it is dropped, so that their document writes fail (an
-- error, retried, nothing written) rather than leave documents the index does not know. `db setup`
-- refuses to apply this migration while such a server is connected.
ALTER TABLE protean.documents ADD COLUMN fields text[] NOT NULL DEFAULT '{}';

UPDATE protean.documents AS d
SET fields = f.fields
FROM (
    SELECT collection, id,
        array_agg(CASE WHEN octet_length(entry) > 512
            THEN '#' || encode(sha256(convert_to(entry, 'UTF8')), 'hex')
            ELSE entry END) AS fields
    FROM (
        SELECT collection, id, octet_length(collection) || ':' || collection || field || '=' || value AS entry
        FROM protean.document_fields
    ) AS e
    GROUP BY collection, id
) AS f
WHERE d.collection = f.collection AND d.id = f.id;

-- Without fastupdate, an entry goes straight into the index: with it, every find would scan the
-- pending list of recent entries as well.
CREATE INDEX documents_by_field ON protean.documents USING gin (fields) WITH (fastupdate = off);

DROP TABLE protean.document_fields;
