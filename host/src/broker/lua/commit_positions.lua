-- Store a partition's positions only while its lease is this claim's. KEYS[1] lease, KEYS[2] positions
-- hash; ARGV[1] "owner token", ARGV[2..] field, id pairs. 1 when stored, 0 when the lease was lost.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 1
