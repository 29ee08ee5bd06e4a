-- Migration 18: a published outbox row is deleted, not marked 'published' and kept for ever. The rows
-- older builds kept go now; nothing reads them. (A server of an older build still running marks the
-- rows it publishes meanwhile, which stay: they are never claimed, and `status` shows only pending
-- rows.)
DELETE FROM protean.outbox WHERE status = 'published';
