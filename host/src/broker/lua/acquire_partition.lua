-- Take a free partition with a new fencing token. KEYS[1] lease, KEYS[2] token counter;
-- ARGV[1] owner, ARGV[2] ttl ms. The lease's value is "owner token"; nil when someone holds it.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token, 'PX', ARGV[2])
return token
