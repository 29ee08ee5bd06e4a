-- Park a key behind its dead letter while the lease is this claim's. KEYS[1] lease, KEYS[2] parked hash;
-- ARGV[1] "owner token", ARGV[2] key, ARGV[3] dead letter id. 1 when parked, 0 when the lease was lost.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
