-- Release a parked key from the dead-letter admin: put its dead letter (ARGV[3], unless empty: a
-- discard) at the head of its held entries and mark it released, then drop the dead letter. Only when
-- the key is parked behind exactly this dead letter. KEYS[1] parked hash, KEYS[2] held list, KEYS[3]
-- dead-letter stream; ARGV[1] key, ARGV[2] dead letter id. 1 when released, else 0.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
if ARGV[3] ~= '' then
  redis.call('LPUSH', KEYS[2], ARGV[3])
end
redis.call('HSET', KEYS[1], ARGV[1], 'released')
redis.call('XDEL', KEYS[3], ARGV[2])
return 1
