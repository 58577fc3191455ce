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
-- ARGV[7] record count
-- ARGV[8] the records' heads and dead letters, packed (ingest/records.py pack): per record
--   kind (1 byte: "e" event | "d" dead), offset (i64), pv (i64), then five lengths (u32 each,
--   big-endian): l0..l4
--   e: where the event is in ARGV[9]: its line's head "<offset> <pv> " (l0), type (l1),
--      Kafka timestamp ms (l2), match token (l3), envelope JSON (l4); nothing follows in here
--   d: l1 reason, l2 detail, l3 raw value (possibly truncated), l0 = l4 = 0, pv 0: the three
--      follow the head in here
-- ARGV[9] the events' live lines, "\n"-separated, in record order, each line's pv being the
--   one ingest expects (the chain of its own batches; -1 when it cannot know)
-- ARGV[10..14] an event entry's field names (type, ts, match, prev, envelope),
-- ARGV[15..20] a dead letter's (topic, partition, offset, reason, detail, value),
-- ARGV[21..23] the state hash's (applied, last, base):
--   shared/contract.py owns every name, so this script names no field itself.
-- ARGV[24] the publish command: PUBLISH, or SPUBLISH on a Redis Cluster (sharded pub/sub:
--   the message goes to the slot's master and replicas only, not over the whole cluster bus)
--
-- Returns {status, written, duplicates, dead, applied, last}:
--   "ok"          applied; `applied` is the partition's applied offset now, `last` the
--                 position after its last event (the pv of the next one)
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
-- the envelope is one line of JSON. Ingest sends those lines ready (ARGV[9]): while every
-- event of the call is written under the pv its line holds (the usual case), the payload is
-- that argument, or the stretch of it from the first written line, as it stands. A
-- duplicate or a pv ingest could not know (its first batch, a refill) makes the payload out
-- of pieces instead. Building it from pieces every time cost about as much as the XADDs
-- (bench D): Lua's concatenation of thousands of strings, and the garbage it leaves.
local stream, state, dead, channel = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local maxlen, dead_maxlen, topic, partition = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expect, base = tonumber(ARGV[5]), tonumber(ARGV[6])
local n = tonumber(ARGV[7])
local blob, lines = ARGV[8], ARGV[9]
local f_type, f_ts, f_match, f_prev, f_data = ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local f_topic, f_partition, f_offset = ARGV[15], ARGV[16], ARGV[17]
local f_reason, f_detail, f_value = ARGV[18], ARGV[19], ARGV[20]
local s_applied, s_last, s_base = ARGV[21], ARGV[22], ARGV[23]
local publish = ARGV[24]

local current = redis.call('HMGET', state, s_applied, s_last, s_base)
local fresh = current[1] == false
local applied, last
if fresh then
  if expect ~= -1 then
    return {'lost', 0, 0, 0, -1, -1}
  end
  applied, last = -1, base
else
  applied = tonumber(current[1])
  if applied < expect then
    return {'rolled_back', 0, 0, 0, applied, -1}
  end
  last = tonumber(current[2]) or tonumber(current[3]) or 0
end
local started = applied

local written, duplicates, dead_count = 0, 0, 0
local unpack, sub, fmt, find = struct.unpack, string.sub, string.format, string.find
-- The payload is lines[first..stop] while `exact`; once a line is not published as it stands,
-- `parts` takes over: the exact stretch so far, then each written line, its head remade when
-- its pv was not the one Redis has. With records in offset order (as Kafka gives them) the
-- written events are the last ones of the call: once one is written, no later one is at or
-- below `applied` or the stream's top, and only the first written line can need a new head.
local exact, first, stop = true, nil, 0
local parts = {}

local pos, lp = 1, 1
for _ = 1, n do
  local kind, offset, pv, l0, l1, l2, l3, l4, at = unpack('>c1i8i8I4I4I4I4I4', blob, pos)
  if kind == 'e' then
    pos = at
    local line = lp
    local t = line + l0
    local ts = t + l1 + 1
    local m = ts + l2 + 1
    local e = m + l3 + 1
    lp = e + l4 + 1
    local written_here, pv_here = false, last
    if offset > applied then
      local added = redis.pcall('XADD', stream, fmt('%d-0', offset + 1),
        f_type, sub(lines, t, ts - 2), f_ts, sub(lines, ts, m - 2),
        f_match, sub(lines, m, e - 2), f_prev, fmt('%d', last), f_data, sub(lines, e, lp - 2))
      if type(added) == 'table' and added.err then
        -- Only Redis's refusal of an id at or below the stream's top is a duplicate (the
        -- stream kept it while the state was lost). Anything else (WRONGTYPE, OOM, ...)
        -- fails the call before the state moves, so the batch is held and retried rather
        -- than its events counted as applied and lost.
        if not find(added.err, 'equal or smaller than the target stream top item', 1, true) then
          return redis.error_reply(added.err)
        end
        duplicates = duplicates + 1
      else
        written = written + 1
        written_here = true
      end
      last = offset + 1
      applied = offset
    else
      duplicates = duplicates + 1
    end
    local as_it_stands = written_here and pv == pv_here
    if exact and not as_it_stands and (written_here or first) then
      -- This line cannot join the stretch: a head to remake, or (only with records out of
      -- offset order, never from Kafka) a line left out after written ones. The stretch so
      -- far becomes the first piece.
      if first then parts[1] = sub(lines, first, line - 1) end
      exact = false
    end
    if as_it_stands and exact then
      first = first or line
      stop = lp - 2
    elseif as_it_stands then
      parts[#parts + 1] = sub(lines, line, lp - 1)
    elseif written_here then
      parts[#parts + 1] = fmt('%d %d ', offset, pv_here)
      parts[#parts + 1] = sub(lines, t, lp - 1)
    end
  else
    local e2 = at + l1 + l2
    local e3 = e2 + l3
    pos = e3
    if offset > applied then
      redis.call('XADD', dead, 'MAXLEN', '~', dead_maxlen, '*',
        f_topic, topic, f_partition, partition, f_offset, fmt('%d', offset),
        f_reason, sub(blob, at, at + l1 - 1), f_detail, sub(blob, at + l1, e2 - 1),
        f_value, sub(blob, e2, e3 - 1))
      dead_count = dead_count + 1
      applied = offset
    else
      duplicates = duplicates + 1
    end
  end
end

if fresh then
  redis.call('HSET', state, s_applied, fmt('%d', applied), s_last, fmt('%d', last),
    s_base, fmt('%d', base))
elseif applied ~= started then
  redis.call('HSET', state, s_applied, fmt('%d', applied), s_last, fmt('%d', last))
end
if written > 0 then
  -- One trim per call rather than one per XADD: the same approximate cap, checked once.
  -- LIMIT 0 lifts the default bound on what one approximate trim removes (100 nodes' worth),
  -- which a call writing more than that would otherwise leave behind every time.
  redis.call('XTRIM', stream, 'MAXLEN', '~', maxlen, 'LIMIT', 0)
  local payload
  if exact then
    if first == 1 and stop == #lines then
      payload = lines
    else
      payload = sub(lines, first, stop)
    end
  else
    payload = table.concat(parts)
    if sub(payload, -1) == '\n' then
      payload = sub(payload, 1, -2)
    end
  end
  redis.call(publish, channel, payload)
end
return {'ok', written, duplicates, dead_count, applied, last}
