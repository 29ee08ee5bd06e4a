-- The number of partitions of an ordered subscription, fixed by its first replica: a replica with
-- another count would put keys in other partitions than its peers, and two replicas could then hold
-- one key. KEYS[1] count key; ARGV[1] this replica's count. Returns the count in force.
local count = redis.call('GET', KEYS[1])
if not count then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return count
