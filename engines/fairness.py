"""Fair queueing: the keys with jobs waiting for a model are served in turn.

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

from engines.wire import Keys

# Moves up to ARGV[1] jobs from the wait lists into the job stream, in weighted round robin:
# the ring's head tenant takes up to its weight (Job.priority) jobs per turn, then goes to the
# ring's tail; a tenant whose list emptied leaves the ring. The head's count of jobs taken
# this turn is kept (`turn`), since engines promote a slot or two at a time.
# The lists are named by the ring's tenants, so they cannot be declared in KEYS; they share
# the model's hash tag, hence the slot of the declared keys.
# LPOP (not refused under OOM) comes before XADD: a script that has written may go on under
# maxmemory, so a promotion never stops half done.
# The ring is the truth of whether anything waits: every key here goes when nothing does.
# Returns the number of jobs still waiting (the engine then looks again soon).
# KEYS: 1 job stream, 2 ring, 3 fair state, 4 weights. ARGV: 1 free slots, 2 wait-list prefix.
PROMOTE = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local waiting = tonumber(redis.call('HGET', KEYS[3], 'waiting') or '0')
local free = tonumber(ARGV[1])
local used = tonumber(redis.call('HGET', KEYS[3], 'turn') or '0')
local moved = 0
while moved < free do
  local tenant = redis.call('LINDEX', KEYS[2], 0)
  if not tenant then break end
  local list = ARGV[2] .. tenant
  local job = redis.call('LPOP', list)
  if job then
    redis.call('XADD', KEYS[1], '*', 'j', job)
    moved = moved + 1
    used = used + 1
  end
  if redis.call('EXISTS', list) == 0 then
    redis.call('LPOP', KEYS[2])
    redis.call('HDEL', KEYS[4], tenant)
    used = 0
  elseif used >= math.max(tonumber(redis.call('HGET', KEYS[4], tenant) or '1') or 1, 1) then
    redis.call('RPUSH', KEYS[2], redis.call('LPOP', KEYS[2]))
    used = 0
  end
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[3])  -- nothing waits: no state to keep (and no key left forever)
  return 0
end
waiting = math.max(waiting - moved, 1)
redis.call('HSET', KEYS[3], 'waiting', waiting, 'turn', used)
return waiting
"""

PROMOTE_SHA = hashlib.sha1(PROMOTE.encode()).hexdigest()


def promote_command(keys: Keys, model: str, free: int) -> tuple[object, ...]:
    """The EVALSHA that moves up to ``free`` waiting jobs of ``model`` into its job stream."""
    return ("EVALSHA", PROMOTE_SHA, 4, keys.jobs(model), keys.ring(model), keys.fair_state(model),
            keys.weights(model), free, keys.wait_prefix(model))
