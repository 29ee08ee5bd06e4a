-- The fence of a leased subscription's commit: the row lock (FOR SHARE) keeps a takeover waiting until
-- this transaction ends, so either the commit lands while the lease is held or it fails.
SELECT 1 FROM protean.leases WHERE name = $1 AND owner = $2 AND expires_at > clock_timestamp() FOR SHARE
