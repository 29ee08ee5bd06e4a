-- Take a lease when free, or renew it when this owner holds it: its fencing token, nil when another
-- owner holds it. A new owner draws a new token from a counter that outlives the lease, so tokens only
-- grow. KEYS[1] lease (value: owner), KEYS[2] token counter; ARGV[1] owner, ARGV[2] ttl ms.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
if holder then
  return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return token
