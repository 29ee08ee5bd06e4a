-- Move entries behind a parked key while the lease is this claim's. KEYS[1] lease, KEYS[2] held list;
-- ARGV[1] "owner token", ARGV[2..] entries. 1 when held, 0 when the lease was lost.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('RPUSH', KEYS[2], unpack(ARGV, 2))
return 1
