-- The held rows of a key just unparked: only rows whose message is gone can be left.
DELETE FROM held_messages WHERE subscription = ?1 AND ordering_key = ?2
