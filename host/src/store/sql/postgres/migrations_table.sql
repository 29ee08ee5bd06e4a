CREATE SCHEMA IF NOT EXISTS protean;
CREATE TABLE IF NOT EXISTS protean.schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
