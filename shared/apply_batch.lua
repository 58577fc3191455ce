-- Apply one ingest batch atomically: dedupe by Kafka offset, XADD valid events to the
-- capped stream, XADD dead letters to the dead stream, PUBLISH the applied events in
-- one message, and record the highest applied offset per partition.
--
-- KEYS[1] stream  KEYS[2] dead stream  KEYS[3] offsets hash  KEYS[4] genesis
-- ARGV[1] stream maxlen  ARGV[2] dead maxlen  ARGV[3] topic  ARGV[4] channel
-- ARGV[5] record count  ARGV[6] the records, packed (ingest/records.py pack): per record
--   kind (1 byte: "e" event | "d" dead), partition (u32), offset (i64), the lengths of
--   f1..f4 (u32 each, big-endian), then f1..f4
--   e: f1 type, f2 kafka timestamp ms, f3 envelope JSON, f4 match token
--   d: f1 reason, f2 detail, f3 raw value (possibly truncated), f4 unused
-- ARGV[7..10] the field names of an event entry (type, ts, match, envelope) and
-- ARGV[11..16] those of a dead letter (topic, partition, offset, reason, detail, value):
--   shared/contract.py owns them, so this script names no field itself.
-- Returns {written, duplicates, dead, last stream id or ""}.
--
-- Published payload (shared/contract.py, encode_live_line): one line per event,
-- "<id> <type> <ts> <match> <envelope>"; ids, types, timestamps and match tokens hold no
-- spaces, and the envelope is one line of JSON.
local stream, dead, offsets, genesis = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local maxlen, dead_maxlen, topic, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local n = tonumber(ARGV[5])
local blob = ARGV[6]
local f_type, f_ts, f_match, f_data = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local f_topic, f_partition, f_offset = ARGV[11], ARGV[12], ARGV[13]
local f_reason, f_detail, f_value = ARGV[14], ARGV[15], ARGV[16]

local applied = {}
local highest = {}
local parts = {}
local written, duplicates, dead_count = 0, 0, 0
local last_id = ""
local fresh = redis.call('EXISTS', stream) == 0
local unpack, sub = struct.unpack, string.sub

local pos = 1
for _ = 1, n do
  local kind, partition, offset, l1, l2, l3, l4, at = unpack('>c1I4i8I4I4I4I4', blob, pos)
  local e2 = at + l1 + l2
  local e3 = e2 + l3
  pos = e3 + l4
  local field = topic .. ':' .. partition
  local done = applied[field]
  if done == nil then
    done = tonumber(redis.call('HGET', offsets, field) or '-1')
    applied[field] = done
  end
  if offset <= done then
    duplicates = duplicates + 1
  else
    local f1, f2, f3, f4 = sub(blob, at, at + l1 - 1), sub(blob, at + l1, e2 - 1),
      sub(blob, e2, e3 - 1), sub(blob, e3, pos - 1)
    if kind == 'e' then
      local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
        f_type, f1, f_ts, f2, f_match, f4, f_data, f3)
      if fresh then
        redis.call('SET', genesis, id)
        fresh = false
      end
      -- The pieces, not a concatenated line: every new long string is interned (hashed
      -- and compared with look-alikes), so one concat for the whole batch is far cheaper.
      local k = #parts
      parts[k + 1], parts[k + 2], parts[k + 3], parts[k + 4], parts[k + 5] = id, ' ', f1, ' ', f2
      parts[k + 6], parts[k + 7], parts[k + 8], parts[k + 9], parts[k + 10] = ' ', f4, ' ', f3, '\n'
      last_id = id
      written = written + 1
    else
      redis.call('XADD', dead, 'MAXLEN', '~', dead_maxlen, '*',
        f_topic, topic, f_partition, partition, f_offset, string.format('%d', offset),
        f_reason, f1, f_detail, f2, f_value, f3)
      dead_count = dead_count + 1
    end
    applied[field] = offset
    highest[field] = offset
  end
end

for field, offset in pairs(highest) do
  redis.call('HSET', offsets, field, string.format('%d', offset))
end
if #parts > 0 then
  redis.call('PUBLISH', channel, table.concat(parts, '', 1, #parts - 1))
end
return {written, duplicates, dead_count, last_id}
