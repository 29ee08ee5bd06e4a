-- How the group ARGV[1] stands on each stream KEYS[i], from facts that cannot drift: five numbers per
-- stream, `exists` (0/1), `unread` (the entries after the group's last-delivered-id, counted up to
-- ARGV[2]), `pending` (XPENDING), `consumers`, and Redis' own `lag` (-1 when it has none), which is
-- used only past the count's cap. Redis' lag is entries-added minus entries-read, counters that
-- Redis 7.0 can leave wrong after an AOF rewrite, so that a drained group shows a lag forever.
local group, cap = ARGV[1], tonumber(ARGV[2])

-- Entries after `last` (exclusive), in pages, stopping at the cap. Nothing is unread exactly when
-- last-delivered-id is the stream's last-generated-id: then the first page is empty.
local function unread(stream, last)
  local count, from = 0, '(' .. last
  while count < cap do
    local page = redis.call('XRANGE', stream, from, '+', 'COUNT', math.min(1000, cap - count))
    if #page == 0 then break end
    count = count + #page
    from = '(' .. page[#page][1]
  end
  return count
end

local out = {}
for _, stream in ipairs(KEYS) do
  local figures = {0, 0, 0, 0, -1}
  if redis.call('EXISTS', stream) == 1 then
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local info = {}
      for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
      if info['name'] == group then
        local lag = info['lag']
        figures = {
          1,
          unread(stream, info['last-delivered-id']),
          redis.call('XPENDING', stream, group)[1],
          info['consumers'],
          type(lag) == 'number' and lag or -1,
        }
      end
    end
  end
  for _, n in ipairs(figures) do table.insert(out, n) end
end
return out
