SELECT count(*), count(*) FILTER (WHERE due_ms < $1) FROM protean.schedules WHERE state = 'pending'
