SELECT min(due_ms) FROM schedules WHERE state = 'pending'
