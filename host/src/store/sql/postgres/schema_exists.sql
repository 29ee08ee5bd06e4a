SELECT to_regclass('protean.schema_version') IS NOT NULL
