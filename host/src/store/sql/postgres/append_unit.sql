-- A unit's messages, its locks and its outbox rows in one statement (migration 16).
SELECT * FROM protean.append_unit($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                                  $6::text[], $7::text[], $8::boolean)
