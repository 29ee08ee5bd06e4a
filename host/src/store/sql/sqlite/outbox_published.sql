UPDATE outbox SET status = 'published', published_at = ?3 WHERE seq BETWEEN ?1 AND ?2
