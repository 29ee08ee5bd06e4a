-- A published row is deleted: the outbox holds what is still to publish (see the SQLite store's).
DELETE FROM protean.outbox WHERE seq = ANY($1::bigint[])
