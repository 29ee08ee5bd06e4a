-- How many entries the streams KEYS[i] hold after the ids ARGV[i] (exclusive), summed. Counted here so
-- that only a number crosses the network.
local total = 0
for i, stream in ipairs(KEYS) do
  total = total + #redis.call('XRANGE', stream, '(' .. ARGV[i], '+')
end
return total
