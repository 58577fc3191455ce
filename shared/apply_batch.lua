-- Apply one ingest batch atomically: dedupe by Kafka offset, XADD valid events to the
-- capped stream, XADD dead letters to the dead stream, PUBLISH the applied events in
-- one message, and record the highest applied offset per partition.
--
-- KEYS[1] stream  KEYS[2] dead stream  KEYS[3] offsets hash  KEYS[4] genesis
-- ARGV[1] stream maxlen  ARGV[2] dead maxlen  ARGV[3] topic  ARGV[4] channel
-- ARGV[5] record count, then 7 values per record:
--   partition, offset, kind ("e" event | "d" dead), f1, f2, f3, f4
--   e: f1 type, f2 kafka timestamp ms, f3 envelope JSON, f4 match token
--   d: f1 reason, f2 detail, f3 raw value (possibly truncated), f4 unused
-- Returns {written, duplicates, dead, last stream id or ""}.
--
-- Published payload: one line per event, "<id> <type> <ts> <match> <envelope>"; ids, types,
-- timestamps and match tokens hold no spaces, and the envelope is one line of JSON.
local stream, dead, offsets, genesis = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local maxlen, dead_maxlen, topic, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local n = tonumber(ARGV[5])

local applied = {}
local highest = {}
local lines = {}
local written, duplicates, dead_count = 0, 0, 0
local last_id = ""
local fresh = redis.call('EXISTS', stream) == 0

for i = 0, n - 1 do
  local base = 6 + i * 7
  local partition = ARGV[base]
  local offset = tonumber(ARGV[base + 1])
  local kind = ARGV[base + 2]
  local field = topic .. ':' .. partition
  local done = applied[field]
  if done == nil then
    done = tonumber(redis.call('HGET', offsets, field) or '-1')
    applied[field] = done
  end
  if offset <= done then
    duplicates = duplicates + 1
  else
    if kind == 'e' then
      local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
        't', ARGV[base + 3], 'ts', ARGV[base + 4], 'm', ARGV[base + 6], 'd', ARGV[base + 5])
      if fresh then
        redis.call('SET', genesis, id)
        fresh = false
      end
      lines[#lines + 1] = id .. ' ' .. ARGV[base + 3] .. ' ' .. ARGV[base + 4] .. ' '
        .. ARGV[base + 6] .. ' ' .. ARGV[base + 5]
      last_id = id
      written = written + 1
    else
      redis.call('XADD', dead, 'MAXLEN', '~', dead_maxlen, '*',
        'topic', topic, 'partition', partition, 'offset', ARGV[base + 1],
        'reason', ARGV[base + 3], 'detail', ARGV[base + 4], 'value', ARGV[base + 5])
      dead_count = dead_count + 1
    end
    applied[field] = offset
    highest[field] = offset
  end
end

for field, offset in pairs(highest) do
  redis.call('HSET', offsets, field, string.format('%d', offset))
end
if #lines > 0 then
  redis.call('PUBLISH', channel, table.concat(lines, '\n'))
end
return {written, duplicates, dead_count, last_id}
