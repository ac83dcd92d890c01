"""The bytes a model's backlog holds in Redis, per model and per API key.

A model's backlog is bounded by count (``max_backlog``) and by bytes (``max_backlog_bytes``):
one key may otherwise fill Redis with jobs at the body limit, and under ``noeviction`` a full
Redis stops admission, limits and usage for every tenant. The gateway's submit script
(``gateway.queue``) counts each job in when it queues it; the engine's ack counts it out with
:data:`RELEASE` (this module), so both sides of the queue share one definition of the keys:

* ``Keys.queued_bytes(model)``: HASH ``total`` (bytes of every job queued or running),
  ``t:<tenant>`` (an API key's), ``s:<job id>`` (one job's size and tenant);
* ``Keys.queued_jobs(model)``: ZSET job id -> deadline (ms). A job Redis never sees acked (its
  ack lost in a failover, an engine of an older version) stops counting at its deadline: the
  submit script leaves expired members out and drops them as it counts its job in.

Both keys carry the model's hash tag (one Redis Cluster slot with its job stream), go when
nothing is left in them, and expire at their last job's deadline whatever becomes of the acks. Imports no ML library (both the gateway and the engines use it).
"""

from __future__ import annotations

from engines.wire import Keys

# Counts a job out (idempotent: an ack may be sent twice). The ZREM comes first: a script that
# has written may go on under maxmemory, so an ack's release is never refused for memory.
# KEYS: 1 queued bytes, 2 queued jobs. ARGV: 1 job id.
RELEASE = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local entry = redis.call('HGET', KEYS[1], 's:' .. ARGV[1])
redis.call('HDEL', KEYS[1], 's:' .. ARGV[1])
if entry then
  local size, tenant = string.match(entry, '^(%d+) (.*)$')
  size = tonumber(size)
  if redis.call('HINCRBY', KEYS[1], 'total', -size) <= 0 or redis.call('ZCARD', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[1], KEYS[2])
    return 1
  end
  if tenant ~= '' and redis.call('HINCRBY', KEYS[1], 't:' .. tenant, -size) <= 0 then
    redis.call('HDEL', KEYS[1], 't:' .. tenant)
  end
end
return 1
"""

# The part of the gateway's submit script that reads what the model and the tenant hold
# (``gateway.queue``), less the jobs whose deadline passed without an ack, and then counts a job
# in. Reading writes nothing (the submit script's first write must be the one refused under
# maxmemory); ``count_in`` drops those expired jobs' counts as it adds the new job's.
# ``backlog_bytes(bytes_key, jobs_key, now_ms, tenant)`` -> total, tenant's, expired jobs (at most
# 256 of them); ``count_in(bytes_key, jobs_key, expired, job, deadline, size, tenant)``;
# ``prune(bytes_key, jobs_key, expired)``: drops them alone (a refused submission does, so that
# expired counts never hold a backlog shut; deleting is allowed under maxmemory).
HELD = """
local function parse(entry)
  local size, owner = string.match(entry, '^(%d+) (.*)$')
  return tonumber(size), owner
end
local function backlog_bytes(bytes_key, jobs_key, now, tenant)
  local v = redis.call('HMGET', bytes_key, 'total', 't:' .. tenant)
  local total, mine = tonumber(v[1] or '0'), tonumber(v[2] or '0')
  local expired = redis.call('ZRANGEBYSCORE', jobs_key, '-inf', now, 'LIMIT', 0, 256)
  for _, job in ipairs(expired) do
    local entry = redis.call('HGET', bytes_key, 's:' .. job)
    if entry then
      local size, owner = parse(entry)
      total = total - size
      if owner == tenant then mine = mine - size end
    end
  end
  return total, mine, expired
end
local function prune(bytes_key, jobs_key, expired)
  for _, old in ipairs(expired) do
    redis.call('ZREM', jobs_key, old)
    local entry = redis.call('HGET', bytes_key, 's:' .. old)
    if entry then
      local n, owner = parse(entry)
      redis.call('HDEL', bytes_key, 's:' .. old)
      redis.call('HINCRBY', bytes_key, 'total', -n)
      if owner ~= '' and redis.call('HINCRBY', bytes_key, 't:' .. owner, -n) <= 0 then
        redis.call('HDEL', bytes_key, 't:' .. owner)
      end
    end
  end
end
local function count_in(bytes_key, jobs_key, expired, job, deadline, size, tenant)
  prune(bytes_key, jobs_key, expired)
  redis.call('ZADD', jobs_key, deadline, job)
  redis.call('HINCRBY', bytes_key, 'total', size)
  if tenant ~= '' then redis.call('HINCRBY', bytes_key, 't:' .. tenant, size) end
  redis.call('HSET', bytes_key, 's:' .. job, size .. ' ' .. tenant)
  -- Both go by the last deadline at the latest, whatever happens to the acks.
  local last = redis.call('ZRANGE', jobs_key, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', bytes_key, last[2])
  redis.call('PEXPIREAT', jobs_key, last[2])
end
"""


def release_command(keys: Keys, model: str, job_id: str) -> tuple[object, ...]:
    """The command (part of a job's ack) that counts the job's bytes out of its model's backlog."""
    return ("EVAL", RELEASE, 2, keys.queued_bytes(model), keys.queued_jobs(model), job_id)
