UPDATE protean.outbox SET status = 'published', published_at = now() WHERE seq = ANY($1::bigint[])
