-- Drop the first ARGV[2] held entries of a key (settled), and unpark it when none are left and it was
-- released. KEYS[1] lease, KEYS[2] held list, KEYS[3] parked hash; ARGV[1] "owner token", ARGV[2] count,
-- ARGV[3] key. -1 when the lease was lost, 1 when the key was unparked, else 0.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
if redis.call('LLEN', KEYS[2]) == 0 and redis.call('HGET', KEYS[3], ARGV[3]) == 'released' then
  redis.call('HDEL', KEYS[3], ARGV[3])
  return 1
end
return 0
