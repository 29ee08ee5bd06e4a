-- Removes the consumers of group ARGV[1] on stream KEYS[1] that hold no pending entry and have been idle
-- for more than ARGV[2] ms, except ARGV[3] (the caller). One script, so atomic: XGROUP DELCONSUMER drops
-- a consumer's pending entries with it, and a stalled consumer that woke up and read a batch between a
-- separate look and the removal would lose that batch for good (its entries past the group's
-- last-delivered id, in nobody's pending list). Returns how many consumers it removed.
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local fields = {}
    for i = 1, #consumer, 2 do
        fields[consumer[i]] = consumer[i + 1]
    end
    if fields['name'] ~= ARGV[3] and tonumber(fields['pending']) == 0
        and tonumber(fields['idle']) > tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], fields['name'])
        removed = removed + 1
    end
end
return removed
