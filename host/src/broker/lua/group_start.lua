-- Where a new ordered subscription starts reading a stream when group_start = "new": the stream's last
-- entry when it first asked, fixed then for every partition and replica. KEYS[1] start key, KEYS[2] the
-- stream. Returns the id (0-0 for an empty or missing stream).
local start = redis.call('GET', KEYS[1])
if start then
  return start
end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
start = '0-0'
if #last > 0 then
  start = last[1][1]
end
redis.call('SET', KEYS[1], start)
return start
