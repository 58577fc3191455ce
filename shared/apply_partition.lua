-- Apply one partition's share of an ingest batch atomically: check that Redis still holds
-- what ingest believes it holds, XADD each new event under the id its Kafka offset gives,
-- XADD dead letters to the partition's dead stream, record the applied offset, and publish
-- the written events in one message on the partition's channel.
--
-- KEYS[1] stream  KEYS[2] state hash  KEYS[3] dead stream  KEYS[4] live channel
--   (all four share the partition's hash tag: one Cluster slot)
-- ARGV[1] stream maxlen  ARGV[2] dead maxlen  ARGV[3] topic  ARGV[4] partition
-- ARGV[5] expect: the applied offset ingest believes this Redis has; -1 = a fresh fill
-- ARGV[6] base: the position the fill started from (used only when the state is created)
-- ARGV[7] record count  ARGV[8] the records, packed (ingest/records.py pack): per record
--   kind (1 byte: "e" event | "d" dead), offset (i64), the lengths of f1..f4 (u32 each,
--   big-endian), then f1..f4
--   e: f1 type, f2 kafka timestamp ms, f3 envelope JSON, f4 match token
--   d: f1 reason, f2 detail, f3 raw value (possibly truncated), f4 unused
-- ARGV[9..13] an event entry's field names (type, ts, match, prev, envelope),
-- ARGV[14..19] a dead letter's (topic, partition, offset, reason, detail, value),
-- ARGV[20..22] the state hash's (applied, last, base):
--   shared/contract.py owns every name, so this script names no field itself.
-- ARGV[23] the publish command: PUBLISH, or SPUBLISH on a Redis Cluster (sharded pub/sub:
--   the message goes to the slot's master and replicas only, not over the whole cluster bus)
--
-- Returns {status, written, duplicates, dead, applied}:
--   "ok"          applied; `applied` is the partition's applied offset now
--   "lost"        no state although ingest expected one (Redis wiped or restarted empty):
--                 nothing written, ingest refills the partition from Kafka
--   "rolled_back" the state is older than expected (failover to a replica that missed
--                 writes): nothing written, `applied` is what this Redis has
--
-- Entry id of the record at offset o: "<o+1>-0", so a refill reproduces the same ids and
-- Redis itself refuses an id at or below the stream's top; that refusal (and only that
-- one) is a duplicate, not an error. `pv` of an entry is the position right after the previous event entry of
-- this incarnation (state `last`), or `base` for the first one; dead letters do not move it.
--
-- Published payload (shared/contract.py, encode_live_line): one line per written event,
-- "<offset> <pv> <type> <ts> <match> <envelope>"; none of the first five holds a space and
-- the envelope is one line of JSON.
local stream, state, dead, channel = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local maxlen, dead_maxlen, topic, partition = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expect, base = tonumber(ARGV[5]), tonumber(ARGV[6])
local n = tonumber(ARGV[7])
local blob = ARGV[8]
local f_type, f_ts, f_match, f_prev, f_data = ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13]
local f_topic, f_partition, f_offset = ARGV[14], ARGV[15], ARGV[16]
local f_reason, f_detail, f_value = ARGV[17], ARGV[18], ARGV[19]
local s_applied, s_last, s_base = ARGV[20], ARGV[21], ARGV[22]
local publish = ARGV[23]

local current = redis.call('HMGET', state, s_applied, s_last, s_base)
local fresh = current[1] == false
local applied, last
if fresh then
  if expect ~= -1 then
    return {'lost', 0, 0, 0, -1}
  end
  applied, last = -1, base
else
  applied = tonumber(current[1])
  if applied < expect then
    return {'rolled_back', 0, 0, 0, applied}
  end
  last = tonumber(current[2]) or tonumber(current[3]) or 0
end
local started = applied

local parts = {}
local written, duplicates, dead_count = 0, 0, 0
local unpack, sub, fmt = struct.unpack, string.sub, string.format

local pos = 1
for _ = 1, n do
  local kind, offset, l1, l2, l3, l4, at = unpack('>c1i8I4I4I4I4', blob, pos)
  local e2 = at + l1 + l2
  local e3 = e2 + l3
  pos = e3 + l4
  if offset <= applied then
    duplicates = duplicates + 1
  else
    local f1, f2, f3, f4 = sub(blob, at, at + l1 - 1), sub(blob, at + l1, e2 - 1),
      sub(blob, e2, e3 - 1), sub(blob, e3, pos - 1)
    local offset_s = fmt('%d', offset)
    if kind == 'e' then
      local prev_s = fmt('%d', last)
      local added = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, fmt('%d-0', offset + 1),
        f_type, f1, f_ts, f2, f_match, f4, f_prev, prev_s, f_data, f3)
      if type(added) == 'table' and added.err then
        -- Only Redis's refusal of an id at or below the stream's top is a duplicate (the
        -- stream kept it while the state was lost). Anything else (WRONGTYPE, OOM, ...)
        -- fails the call before the state moves, so the batch is held and retried rather
        -- than its events counted as applied and lost.
        if not string.find(added.err, 'equal or smaller than the target stream top item', 1, true) then
          return redis.error_reply(added.err)
        end
        duplicates = duplicates + 1
      else
        -- The pieces, not a concatenated line: every new long string is interned (hashed
        -- and compared with look-alikes), so one concat for the whole call is far cheaper.
        local k = #parts
        parts[k + 1], parts[k + 2], parts[k + 3], parts[k + 4] = offset_s, ' ', prev_s, ' '
        parts[k + 5], parts[k + 6], parts[k + 7], parts[k + 8] = f1, ' ', f2, ' '
        parts[k + 9], parts[k + 10], parts[k + 11], parts[k + 12] = f4, ' ', f3, '\n'
        written = written + 1
      end
      last = offset + 1
    else
      redis.call('XADD', dead, 'MAXLEN', '~', dead_maxlen, '*',
        f_topic, topic, f_partition, partition, f_offset, offset_s,
        f_reason, f1, f_detail, f2, f_value, f3)
      dead_count = dead_count + 1
    end
    applied = offset
  end
end

if fresh then
  redis.call('HSET', state, s_applied, fmt('%d', applied), s_last, fmt('%d', last),
    s_base, fmt('%d', base))
elseif applied ~= started then
  redis.call('HSET', state, s_applied, fmt('%d', applied), s_last, fmt('%d', last))
end
if #parts > 0 then
  redis.call(publish, channel, table.concat(parts, '', 1, #parts - 1))
end
return {'ok', written, duplicates, dead_count, applied}
