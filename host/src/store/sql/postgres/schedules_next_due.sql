SELECT min(due_ms) FROM protean.schedules WHERE state = 'pending'
