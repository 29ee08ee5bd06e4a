-- Resets the idle time of every entry pending on consumer ARGV[2] of group ARGV[1] on stream KEYS[1],
-- without counting a delivery (JUSTID), so that the entries of a live consumer (in a long call, or
-- waiting for a retry) are not taken over as if their consumer were gone. One script, so atomic: an
-- entry another consumer took over a moment ago is no longer listed here and is never taken back.
-- Returns how many entries it touched.
if redis.call('EXISTS', KEYS[1]) == 0 then
    return 0
end
local touched = 0
local from = '-'
while true do
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], from, '+', 1000, ARGV[2])
    if #pending == 0 then
        break
    end
    -- One table: unpack() spreads its values only as the last argument of a call.
    local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
    for _, entry in ipairs(pending) do
        args[#args + 1] = entry[1]
    end
    args[#args + 1] = 'JUSTID'
    redis.call(unpack(args))
    touched = touched + #pending
    if #pending < 1000 then
        break
    end
    from = '(' .. pending[#pending][1]
end
return touched
