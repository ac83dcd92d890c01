"""The bytes a model's backlog holds in Redis, per model and per API key.

A model's backlog is bounded by count (``max_backlog``) and by bytes (``max_backlog_bytes``):
one key may otherwise fill Redis with jobs at the body limit, and under ``noeviction`` a full
Redis stops admission, limits and usage for every tenant. The gateway's submit script
(``gateway.queue``) counts each job in when it queues it; the engine's ack counts it out with
:data:`RELEASE` (this module), so both sides of the queue share one definition of the keys:

* ``Keys.queued_bytes(model)``: HASH ``total`` (bytes of every job queued or running) and
  ``t:<tenant>`` (an API key's);
* ``Keys.queued_jobs(model)``: ZSET of :func:`member` (``<job id> <size> <tenant>``) -> deadline
  (ms). The engine names a job's member from the job itself (its id, its tenant, and its encoded
  size: the stream entry's length), so counting it out needs no other record. A job Redis never
  sees acked (its ack lost in a failover, an engine of an older version) stops counting at its
  deadline: the submit script leaves expired members out and drops them as it goes.

Both keys carry the model's hash tag (one Redis Cluster slot with its job stream) and expire
within a minute after their last job's deadline (an empty backlog keeps them that long, so that a
model served one request at a time does not make and drop them each time).
Imports no ML library (both the gateway and the engines use it).
"""

from __future__ import annotations

import hashlib

from engines.contract.keys import Keys
from engines.contract.messages import Job

# Counts a job out (idempotent: an ack may be sent twice). The ZREM comes first: a script that
# has written may go on under maxmemory, so an ack's release is never refused for memory.
# KEYS: 1 queued bytes, 2 queued jobs. ARGV: 1 member, 2 size, 3 tenant.
RELEASE = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local size = tonumber(ARGV[2])
redis.call('HINCRBY', KEYS[1], 'total', -size)
if ARGV[3] ~= '' and redis.call('HINCRBY', KEYS[1], 't:' .. ARGV[3], -size) <= 0 then
  redis.call('HDEL', KEYS[1], 't:' .. ARGV[3])
end
return 1
"""
RELEASE_SHA = hashlib.sha1(RELEASE.encode()).hexdigest()

# The part of the gateway's submit script that reads what the model and the tenant hold
# (``gateway.queue``), less the jobs whose deadline passed without an ack, and then counts a job
# in. Reading writes nothing (the submit script's first write must be the one refused under
# maxmemory).
# ``backlog_bytes(bytes_key, jobs_key, now_ms, tenant, size, limit, tenant_limit)`` -> total,
# tenant's, expired members (at most 256; looked for only when a job of ``size`` would not fit
# otherwise); ``prune(bytes_key, jobs_key, expired)`` drops them (a refused submission does too, so
# that expired counts never hold a backlog shut; deleting is allowed under maxmemory);
# ``count_in(bytes_key, jobs_key, expired, member, deadline, size, tenant)``.
HELD = """
local function parse(member)
  local size, owner = string.match(member, '^%S+ (%d+) (.*)$')
  return tonumber(size) or 0, owner or ''
end
local function backlog_bytes(bytes_key, jobs_key, now, tenant, size, limit, tenant_limit)
  local v = redis.call('HMGET', bytes_key, 'total', 't:' .. tenant)
  local total, mine = tonumber(v[1] or '0'), tonumber(v[2] or '0')
  if total + size <= limit and (tenant_limit <= 0 or mine + size <= tenant_limit) then
    return total, mine, {}  -- it fits: expired jobs are left for a submission they would make room for
  end
  local expired = redis.call('ZRANGEBYSCORE', jobs_key, '-inf', now, 'LIMIT', 0, 256)
  for _, m in ipairs(expired) do
    local n, owner = parse(m)
    total = total - n
    if owner == tenant then mine = mine - n end
  end
  return total, mine, expired
end
local function prune(bytes_key, jobs_key, expired)
  if #expired == 0 then return end
  redis.call('ZREM', jobs_key, unpack(expired))
  for _, m in ipairs(expired) do
    local size, owner = parse(m)
    redis.call('HINCRBY', bytes_key, 'total', -size)
    if owner ~= '' and redis.call('HINCRBY', bytes_key, 't:' .. owner, -size) <= 0 then
      redis.call('HDEL', bytes_key, 't:' .. owner)
    end
  end
end
local function count_in(bytes_key, jobs_key, expired, member, deadline, size, tenant)
  prune(bytes_key, jobs_key, expired)
  redis.call('ZADD', jobs_key, deadline, member)
  redis.call('HINCRBY', bytes_key, 'total', size)
  if tenant ~= '' then redis.call('HINCRBY', bytes_key, 't:' .. tenant, size) end
  -- Both go by the last deadline at the latest (rounded up to a minute: one read most times),
  -- whatever becomes of the acks.
  if redis.call('PEXPIRETIME', jobs_key) < tonumber(deadline) then
    local at = (math.floor(tonumber(deadline) / 60000) + 1) * 60000
    redis.call('PEXPIREAT', bytes_key, at)
    redis.call('PEXPIREAT', jobs_key, at)
  end
end
"""


def backlog_size(encoded_length: int, job: Job) -> int:
    """What a job counts in its model's backlog: its encoded bytes, and its inputs' in the blob store
    (an edit's pictures: ``JobOptions.inputs``), which it holds in Redis as long as it is queued."""
    options = job.options
    return encoded_length + (sum(blob.size for blob in options.inputs) if options is not None else 0)


def member(job_id: str, size: int, tenant: str) -> str:
    """A job's member in ``Keys.queued_jobs``: its id, its encoded size (bytes), its tenant."""
    return f"{job_id} {size} {tenant}"


def release_command(keys: Keys, model: str, job_id: str, size: int, tenant: str) -> tuple[object, ...]:
    """The command (part of a job's ack) that counts the job's bytes out of its model's backlog
    (``EVALSHA``: the worker loads :data:`RELEASE` when Redis says it lacks it)."""
    return ("EVALSHA", RELEASE_SHA, 2, keys.queued_bytes(model), keys.queued_jobs(model),
            member(job_id, size, tenant), size, tenant)
