"""Taking a queued job back before any engine runs it: the gateway's :data:`WITHDRAW` script.

A gateway answers a request for a *cold* model (declared, no live engine) 503 once its
cold-start deadline passes; its job must then never run, however late an engine starts. An
engine that starts later never heard the cancel channel, and it reads whatever the job stream
and the wait lists hold, so the job is removed from where engines find it, in one script
(the model's hash tag: one Redis Cluster slot):

* waiting in its key's list (fair queueing): removed from the list, the fair-queueing counts
  mended as the promote script would (``engines.contract.fairness``);
* in the job stream, never delivered (no consumer group yet, or past the group's last delivered
  entry): deleted;
* delivered but held by no live engine (pending and idle for :data:`HELD_IDLE_MS`: a live engine
  re-claims every job it holds at each heartbeat, so only a dead engine's jobs age): acked and
  deleted, so no reclaimer retries it;
* anything else (pending on a live engine, acked, gone) is not withdrawn: the engine that holds
  it answers it.

A withdrawn job's bytes and its key's share of the backlog are counted out as an ack counts them
(``engines.contract.backlog``), and its job key becomes ``FENCED`` until the job's deadline: the
job id can never be queued again, and a resent withdrawal (a lost reply) finds it withdrawn.
Imports no ML library (both the gateway and the engines use it).
"""

from __future__ import annotations

import hashlib

from engines.contract.backlog import member
from engines.contract.keys import ENGINE_GROUP, Keys

#: A pending job idle this long is held by no live engine (engines re-claim theirs every beat, each
#: second; an engine whose beats stop for its ``engine_ttl_s``, 5 s, is gone from the registry).
HELD_IDLE_MS = 5000

# KEYS: 1 job stream, 2 job key, 3 tenant's wait list, 4 ring, 5 fair state, 6 weights,
# 7 tenant backlog, 8 queued bytes, 9 queued jobs.
# ARGV: 1 encoded job, 2 job id, 3 consumer group, 4 stream entry id where the submit script put it
# ("" if it waited), 5 held idle (ms), 6 tenant, 7 backlog member, 8 size, 9 deadline (ms),
# 10 most stream entries to look through.
# Returns WITHDRAWN (0), TAKEN (1: an engine has it or had it) or GONE (2: no job key, acked or lost).
WITHDRAW = """
local state = redis.call('GET', KEYS[2])
if not state then return 2 end
if state == 'f' then return 0 end
local function id_after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end
local function withdrawn()
  redis.call('ZREM', KEYS[7], ARGV[2])
  if redis.call('ZREM', KEYS[9], ARGV[7]) == 1 then
    local size = tonumber(ARGV[8])
    redis.call('HINCRBY', KEYS[8], 'total', -size)
    if ARGV[6] ~= '' and redis.call('HINCRBY', KEYS[8], 't:' .. ARGV[6], -size) <= 0 then
      redis.call('HDEL', KEYS[8], 't:' .. ARGV[6])
    end
  end
  redis.call('SET', KEYS[2], 'f', 'PXAT', ARGV[9])
  return 0
end
if redis.call('LREM', KEYS[3], 1, ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[5], 'waiting', -1)
  redis.call('HINCRBY', KEYS[5], 'n:' .. ARGV[6], -1)
  if redis.call('EXISTS', KEYS[3]) == 0 then
    if redis.call('LINDEX', KEYS[4], 0) == ARGV[6] then redis.call('HSET', KEYS[5], 'turn', 0) end
    redis.call('LREM', KEYS[4], 0, ARGV[6])
    redis.call('HDEL', KEYS[6], ARGV[6])
    redis.call('HDEL', KEYS[5], 'n:' .. ARGV[6])
    if redis.call('EXISTS', KEYS[4]) == 0 then redis.call('DEL', KEYS[5]) end
  end
  return withdrawn()
end
local entry = nil
if ARGV[4] ~= '' then
  local found = redis.call('XRANGE', KEYS[1], ARGV[4], ARGV[4])
  if found[1] and found[1][2][2] == ARGV[1] then entry = ARGV[4] end
end
if not entry then  -- promoted from a wait list by an engine: look for it, within bounds
  local from, left = '-', tonumber(ARGV[10])
  while not entry and left > 0 do
    local batch = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', math.min(left, 256))
    if #batch == 0 then break end
    for _, e in ipairs(batch) do
      if e[2][2] == ARGV[1] then entry = e[1] break end
    end
    left = left - #batch
    from = '(' .. batch[#batch][1]
  end
end
if not entry then return 1 end
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
local delivered = '0-0'
if type(groups) == 'table' and groups.err == nil then
  for _, g in ipairs(groups) do
    for i = 1, #g, 2 do
      if g[i] == 'name' and g[i + 1] ~= ARGV[3] then break end
      if g[i] == 'last-delivered-id' then delivered = g[i + 1] end
    end
  end
end
if id_after(entry, delivered) then
  redis.call('XDEL', KEYS[1], entry)
  return withdrawn()
end
local pending = redis.call('XPENDING', KEYS[1], ARGV[3], 'IDLE', ARGV[5], entry, entry, 1)
if #pending == 0 then return 1 end
redis.call('XACK', KEYS[1], ARGV[3], entry)
redis.call('XDEL', KEYS[1], entry)
return withdrawn()
"""
WITHDRAWN, TAKEN, GONE = 0, 1, 2
WITHDRAW_SHA = hashlib.sha1(WITHDRAW.encode()).hexdigest()


def withdraw_command(keys: Keys, model: str, job_id: str, tenant: str, encoded: bytes, *, entry: bytes | str,
                     deadline_ms: int, scan: int, inputs: int = 0) -> tuple[object, ...]:
    """The EVALSHA that takes the encoded job ``job_id`` of ``tenant`` back from ``model``'s queue
    (:data:`WITHDRAW`); ``entry``: its stream entry id if it went straight into the stream;
    ``scan``: the most stream entries to look through for one an engine promoted (from a wait list,
    so with an id nobody told its gateway) and then died holding."""
    return ("EVALSHA", WITHDRAW_SHA, 9, keys.jobs(model), keys.job(model, job_id), keys.wait(model, tenant),
            keys.ring(model), keys.fair_state(model), keys.weights(model), keys.tenant_backlog(model, tenant),
            keys.queued_bytes(model), keys.queued_jobs(model), encoded, job_id, ENGINE_GROUP, entry, HELD_IDLE_MS,
            tenant, member(job_id, len(encoded) + inputs, tenant), len(encoded) + inputs, deadline_ms, scan)
