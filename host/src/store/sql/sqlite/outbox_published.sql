-- A published row is deleted: the outbox holds what is still to publish, not a history of it (the
-- message stays in the store, the entry in the broker). Marking rows 'published' kept every row ever
-- written, and the UPDATE grew each row, which moved it in its page: 7,250 instructions a row against
-- the DELETE's 4,400 (callgrind). No constraint or trigger can fail here, so the statement needs no
-- journal of its own (a round makes no temporary file: tests/e2e/outbox.rs).
DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2
