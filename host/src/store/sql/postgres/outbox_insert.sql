INSERT INTO protean.outbox (global_position, target)
SELECT * FROM unnest($1::bigint[], $2::text[])
