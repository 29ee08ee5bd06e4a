-- Fire a schedule only if it is still pending with the id read: 0 rows changed refuses the unit.
UPDATE schedules SET state = 'fired', settled_ms = ?3 WHERE key = ?1 AND id = ?2 AND state = 'pending'
