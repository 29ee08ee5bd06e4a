-- Migration 11: a fencing token per subscription lease, raised with every new owner, so that the
-- commits of a replica that lost its subscription's lease are refused by the same fences as a
-- partition's (protean.fences), and no commit has to name its lease.
ALTER TABLE protean.leases ADD COLUMN token bigint NOT NULL DEFAULT 0;
