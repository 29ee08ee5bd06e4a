UPDATE outbox SET status = 'published', published_at = ?2 WHERE seq = ?1
