"""Fair queueing, both halves: the gateway's submit script (:data:`SUBMIT`) and the engines'
promote script (:data:`PROMOTE`). The keys with jobs waiting for a model are served in turn.

While a model's engines have free slots, the gateway's submit script writes a job straight
into the model's job stream. Otherwise the job waits in its tenant's list
(``Keys.wait``) and the tenant joins the model's ring (``Keys.ring``); engines move jobs from
the lists into the stream as their slots free (:data:`PROMOTE`), taking from the tenants in
weighted round robin. The stream itself stays what it was (one consumer group, reclaiming,
acks), so the delivery guarantees are unchanged, and an engine still reads as many jobs as it
has slots in one read (its batching).

Every key involved carries the model's hash tag: one Redis Cluster slot, one script.
Imports no ML library (both the gateway and the engines use it).
"""

from __future__ import annotations

import hashlib

from engines.contract.backlog import HELD
from engines.contract.keys import ENGINE_GROUP, Keys

# Moves up to ARGV[1] jobs from the wait lists into the job stream, in weighted round robin:
# the ring's head tenant takes up to its weight (Job.priority) jobs per turn, then goes to the
# ring's tail; a tenant whose list emptied leaves the ring. The head's count of jobs taken
# this turn is kept (`turn`), since engines promote a slot or two at a time.
# The lists are named by the ring's tenants, so they cannot be declared in KEYS; they share
# the model's hash tag, hence the slot of the declared keys.
# LPOP (not refused under OOM) comes before XADD: a script that has written may go on under
# maxmemory, so a promotion never stops half done.
# The ring is the truth of whether anything waits: every key here goes when nothing does.
# A tenant's list may also have gone by itself, at the deadline of its last job (see SUBMIT):
# the jobs counted for it (`n:<tenant>`) that were not promoted went with it and stop counting.
# The ring turns in place (LMOVE), so it keeps the expiry SUBMIT gave it.
# Returns the number of jobs still waiting (the engine then looks again soon).
# KEYS: 1 job stream, 2 ring, 3 fair state, 4 weights. ARGV: 1 free slots, 2 wait-list prefix.
PROMOTE = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local waiting = tonumber(redis.call('HGET', KEYS[3], 'waiting') or '0')
local free = tonumber(ARGV[1])
local used = tonumber(redis.call('HGET', KEYS[3], 'turn') or '0')
local moved = 0
local lost = 0
while moved < free do
  local tenant = redis.call('LINDEX', KEYS[2], 0)
  if not tenant then break end
  local list = ARGV[2] .. tenant
  local job = redis.call('LPOP', list)
  if job then
    redis.call('XADD', KEYS[1], '*', 'j', job)
    redis.call('HINCRBY', KEYS[3], 'n:' .. tenant, -1)
    moved = moved + 1
    used = used + 1
  end
  if redis.call('EXISTS', list) == 0 then
    local left = tonumber(redis.call('HGET', KEYS[3], 'n:' .. tenant) or '0') or 0
    if left > 0 then lost = lost + left end
    redis.call('HDEL', KEYS[3], 'n:' .. tenant)
    redis.call('LPOP', KEYS[2])
    redis.call('HDEL', KEYS[4], tenant)
    used = 0
  elseif used >= math.max(tonumber(redis.call('HGET', KEYS[4], tenant) or '1') or 1, 1) then
    redis.call('LMOVE', KEYS[2], KEYS[2], 'LEFT', 'RIGHT')
    used = 0
  end
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[3])  -- nothing waits: no state to keep (and no key left forever)
  return 0
end
waiting = math.max(waiting - moved - lost, 1)
redis.call('HSET', KEYS[3], 'waiting', waiting, 'turn', used)
return waiting
"""

PROMOTE_SHA = hashlib.sha1(PROMOTE.encode()).hexdigest()


def promote_command(keys: Keys, model: str, free: int) -> tuple[object, ...]:
    """The EVALSHA that moves up to ``free`` waiting jobs of ``model`` into its job stream."""
    return ("EVALSHA", PROMOTE_SHA, 4, keys.jobs(model), keys.ring(model), keys.fair_state(model),
            keys.weights(model), free, keys.wait_prefix(model))


# Admission and enqueue in one atomic round trip. Engines delete a job's entry when they
# ack it, so the model's backlog (queued + running) is its stream's length plus the jobs
# waiting in its tenants' lists (below).
# The job key (KEYS[2], same slot) makes a submission idempotent: a resend after a lost
# reply finds it and queues nothing. It lives until the engine acks the job, at most
# until the job's deadline (after which no engine would start the job anyway).
# A tenant (API key) may hold at most ARGV[6] jobs of the backlog (0: no limit, tenant "").
# Its jobs are members of a ZSET scored by deadline rather than a counter: the engine's ack
# removes the member (idempotent, though acks may repeat; allowed under maxmemory), and a
# removal lost in a failover stops counting at the job's deadline.
# The job goes straight into the stream when nothing waits and every entry there is taken
# (XLEN - pending = 0; with no consumer group yet, every entry counts as untaken): an engine
# has a free slot, or will read it next. Otherwise it waits in its tenant's list and the tenant
# joins the ring; engines promote jobs from the lists in turn as their slots free.
# The model's backlog is bounded in bytes too (engines.contract.backlog: the job's encoded size counted
# in here, out by the engine's ack), and so is the tenant's share of it (ARGV[12]).
# SET is the first write: under maxmemory the script is refused with nothing written.
# A waiting job's list expires at the last deadline of the jobs it holds, and the ring, weights
# and state at the last deadline of any waiting job of the model: pushed on by every job that
# waits, so no key outlives the jobs it holds for long and none goes before a job it holds could
# still run (past its deadline an engine answers a job 504 unrun, and its gateway already has).
# KEYS: 1 job stream, 2 job key, 3 tenant's wait list, 4 ring, 5 fair state, 6 weights,
# 7 tenant backlog, 8 queued bytes, 9 queued jobs. ARGV: 1 max backlog, 2 stream cap, 3 job,
# 4 deadline (ms), 5 tenant, 6 tenant's limit, 7 weight, 8 now (ms), 9 job id, 10 consumer
# group, 11 max backlog bytes, 12 tenant's bytes (0: no limit).
# Returns {outcome, n}: QUEUED (n: 0, then the stream entry's id, which the gateway may withdraw
# it by, engines.contract.withdraw; or n: 1, it waits), DUPLICATE, BACKLOG_FULL (n: the backlog),
# SHARE_FULL (n: the tenant's jobs), BYTES_FULL (n: the backlog's bytes) or BYTES_SHARE_FULL (n:
# the tenant's bytes).
SUBMIT = HELD + """
if redis.call('EXISTS', KEYS[2]) == 1 then return {1, 0} end
local waiting = tonumber(redis.call('HGET', KEYS[5], 'waiting') or '0')
local xlen = redis.call('XLEN', KEYS[1])
if xlen + waiting >= tonumber(ARGV[1]) then return {2, xlen + waiting} end
local limit = tonumber(ARGV[6])
if limit > 0 then
  local held = redis.call('ZCOUNT', KEYS[7], '(' .. ARGV[8], '+inf')
  if held >= limit then return {3, held} end
end
local size = #ARGV[3] + (tonumber(ARGV[13]) or 0)  -- and its inputs' bytes in the blob store
local byte_limit = tonumber(ARGV[12])
local total, mine, expired = backlog_bytes(KEYS[8], KEYS[9], ARGV[8], ARGV[5], size, tonumber(ARGV[11]), byte_limit)
if total + size > tonumber(ARGV[11]) or (byte_limit > 0 and mine + size > byte_limit) then
  prune(KEYS[8], KEYS[9], expired)
  if total + size > tonumber(ARGV[11]) then return {4, total} end
  return {5, mine}
end
redis.call('SET', KEYS[2], 'q', 'PXAT', ARGV[4])
count_in(KEYS[8], KEYS[9], expired, ARGV[9] .. ' ' .. size .. ' ' .. ARGV[5], ARGV[4], size, ARGV[5])
if ARGV[5] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', ARGV[8])
  redis.call('ZADD', KEYS[7], ARGV[4], ARGV[9])
  local last = redis.call('ZRANGE', KEYS[7], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[7], last[2])
end
local pending = 0
local summary = redis.pcall('XPENDING', KEYS[1], ARGV[10])
if type(summary) == 'table' and summary.err == nil then pending = summary[1] end
if waiting == 0 and xlen - pending <= 0 then
  return {0, 0, redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'j', ARGV[3])}
end
-- A new list joins the ring, unless its tenant's last one expired while it was still there.
if redis.call('RPUSH', KEYS[3], ARGV[3]) == 1 and not redis.call('LPOS', KEYS[4], ARGV[5]) then
  redis.call('RPUSH', KEYS[4], ARGV[5])
end
redis.call('HSET', KEYS[6], ARGV[5], ARGV[7])
redis.call('HINCRBY', KEYS[5], 'waiting', 1)
redis.call('HINCRBY', KEYS[5], 'n:' .. ARGV[5], 1)
local deadline = tonumber(ARGV[4])
for i = 3, 6 do
  if redis.call('PEXPIRETIME', KEYS[i]) < deadline then redis.call('PEXPIREAT', KEYS[i], deadline) end
end
return {0, 1}
"""
QUEUED, DUPLICATE, BACKLOG_FULL, SHARE_FULL, BYTES_FULL, BYTES_SHARE_FULL = 0, 1, 2, 3, 4, 5
SUBMIT_SHA = hashlib.sha1(SUBMIT.encode()).hexdigest()


def submit_command(keys: Keys, model: str, job_id: str, tenant: str, encoded: bytes, *, deadline_ms: int,
                   max_backlog: int, stream_cap: int, tenant_limit: int, weight: int, now_ms: int,
                   max_bytes: int, tenant_bytes: int, inputs: int = 0) -> tuple[object, ...]:
    """The EVALSHA that queues the encoded job ``job_id`` of ``tenant`` for ``model`` (:data:`SUBMIT`)."""
    return ("EVALSHA", SUBMIT_SHA, 9, keys.jobs(model), keys.job(model, job_id), keys.wait(model, tenant),
            keys.ring(model), keys.fair_state(model), keys.weights(model), keys.tenant_backlog(model, tenant),
            keys.queued_bytes(model), keys.queued_jobs(model), max_backlog, stream_cap, encoded, deadline_ms,
            tenant, tenant_limit, max(weight, 1), now_ms, job_id, ENGINE_GROUP, max_bytes, tenant_bytes, inputs)
