-- The fence of a leased subscription's commit: the lease must still be this owner's. Expiry alone does
-- not fail it (a slow batch whose lease nobody took over may commit; the next renewal extends it); a
-- takeover does. The row lock (FOR SHARE) keeps a takeover waiting until this transaction ends, so either
-- the commit lands before the takeover or it fails.
SELECT 1 FROM protean.leases WHERE name = $1 AND owner = $2 FOR SHARE
