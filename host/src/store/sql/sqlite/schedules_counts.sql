SELECT count(*), count(*) FILTER (WHERE due_ms < ?1) FROM schedules WHERE state = 'pending'
