"""One ``Idempotency-Key``'s state in Redis: the claim of the request that runs it, its lease,
its takeover by a retry, and the stored response.

The record (``Keys.idempotency``) is a hash. ``state`` ``running``: ``fp`` (the request's
fingerprint), ``owner`` (a random token naming the request that holds the key), ``stream``,
``lease`` (when its lease ends, on Redis's clock, ms) and, from just before its request
queues a job, that job's ``job`` id, ``model`` and ``deadline``. ``state`` ``done``: ``fp``
and ``response`` (the stored response, msgpack), stored only within its API key's budget of
bytes per TTL window (``Keys.idempotency_bytes``, a counter in the records' slot).

**A lapsed lease frees nothing by itself.** The owner's gateway renews the lease every third
of ``idempotency_lease_s``; a lease lapses when that gateway died, but also when only its
connection to Redis stalls, or when Redis itself stopped for longer than a lease (every lease
lapses at once then) — while the owner's job still runs. So a retry that finds the lease
lapsed only notes when (``seen``) and looks again; the claim is *abandoned* once it stayed
lapsed for a further grace (one lease) under looks at most half a grace apart. A gap between
looks (Redis paused, the looking gateway stalled) starts the count again: the owner had no
chance to renew meanwhile, and its renewal, held up by the pause, arrives as soon as Redis is
back, well within the grace.

**A takeover waits for the job.** Of an abandoned claim a retry:

1. publishes its job's cancellation (an engine running it aborts it and acks it; one that
   reads it later skips it);
2. runs :data:`_FENCE` on the job's key (``Keys.job``: alive from the job's submission until
   its ack, at most its deadline): while the key exists the job may run, and the retry keeps
   waiting (and cancelling); once it is gone, the same script sets it to ``FENCED`` until past
   the job's deadline, so a submission of that job id sent late by its owner queues nothing
   (and after its deadline no engine would start it);
3. replaces the claim, in a script that checks it is still abandoned and still names the
   same owner and job.

The owner names each job in its claim before queueing it (:meth:`Claim.bind`, refused once
the claim is not its own), so a job the retry did not see can no longer be queued. A retry's
generation therefore never starts before the first one's job is gone from Redis: finished,
failed, cancelled or past its deadline. A retry takes a dead gateway's key over at most a
lease and a grace after that gateway's last renewal (a grace after the retry's first look, if
later), plus the time its job takes to stop once cancelled (at once when it runs; a job still
queued goes when an engine reads it, at the latest at its deadline). A claim that named no job
yet simply expires a lease and a grace after its last renewal: its owner can no longer name one.
Redis losing data (a restart without persistence, a failover losing writes) loses the claim
and the job key with it: no fencing survives that.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.exceptions import NoScriptError

from engines.contract.keys import FENCED, Keys
from engines.contract.lane import REDIS_ERRORS
from engines.contract.messages import Job
from gateway.errors import ConduitError, Conflict
from gateway.queue import cancel_message

log = logging.getLogger("conduit.gateway")

#: What a claim attempt finds (none: the key was free and is now the caller's).
HELD, LAPSED, ABANDONED, DONE = 1, 2, 3, 4

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# KEYS: the record. ARGV: 1 owner, 2 fingerprint, 3 stream ("1" or ""), 4 lease ms, 5 grace ms,
# 6 owner and 7 job of the abandoned claim to take over ("": none).
# Returns {0} after taking the key, else {what, fingerprint, owner, job, model, deadline, response}.
_CLAIM = _NOW + """
local lease, grace = tonumber(ARGV[4]), tonumber(ARGV[5])
local function take()
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'state', 'running', 'fp', ARGV[2], 'owner', ARGV[1], 'stream', ARGV[3],
             'lease', now + lease)
  redis.call('PEXPIRE', KEYS[1], lease + grace)
  return {0}
end
local r = redis.call('HMGET', KEYS[1], 'state', 'fp', 'owner', 'job', 'model', 'deadline', 'lease', 'seen', 'checked')
if not r[1] then return take() end
if r[1] == 'done' then return {4, r[2], '', '', '', '', redis.call('HGET', KEYS[1], 'response')} end
local what = 1
if now > tonumber(r[7]) then
  local seen, checked = tonumber(r[8]) or 0, tonumber(r[9]) or 0
  if now - checked > grace / 2 then seen = now end
  redis.call('HSET', KEYS[1], 'seen', seen, 'checked', now)
  what = 2
  if now - seen >= grace then
    if ARGV[6] ~= '' and ARGV[6] == r[3] and ARGV[7] == (r[4] or '') then return take() end
    what = 3
  end
end
return {what, r[2], r[3], r[4] or '', r[5] or '', r[6] or '', ''}
"""
# The owner's own updates, refused (0) once the record is not its own. ARGV[1]: the owner.
# Renew: ARGV 2 lease ms, 3 grace ms. The record lives at least a lease and a grace more.
_RENEW = _NOW + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local lease, grace = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease', now + lease)
redis.call('HDEL', KEYS[1], 'seen', 'checked')
if redis.call('PTTL', KEYS[1]) < lease + grace then redis.call('PEXPIRE', KEYS[1], lease + grace) end
return 1
"""
# Bind (and renew): ARGV 2 job id, 3 model, 4 its deadline (ms, the gateway's clock, as the job
# key's expiry), 5 lease ms, 6 grace ms. The record outlives the job key: a takeover reads the job here.
_BIND = _NOW + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local lease, grace = tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('HSET', KEYS[1], 'job', ARGV[2], 'model', ARGV[3], 'deadline', ARGV[4], 'lease', now + lease)
redis.call('HDEL', KEYS[1], 'seen', 'checked')
redis.call('PEXPIREAT', KEYS[1], math.max(tonumber(ARGV[4]), now) + lease + grace)
return 1
"""
# Finish. KEYS: the record, its API key's stored-bytes counter (``Keys.idempotency_bytes``, same
# slot). ARGV 2 the stored response ("": release the key), 3 its lifetime ms, 4 the fingerprint,
# 5 the key's budget of stored bytes per lifetime (-1: none). 1: done, 2: released, over the budget.
_FINISH = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] == '' then return 1 end
local size, budget = string.len(ARGV[2]), tonumber(ARGV[5])
if budget >= 0 then
  if tonumber(redis.call('GET', KEYS[2]) or '0') + size > budget then return 2 end
  redis.call('INCRBY', KEYS[2], size)
  if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
end
redis.call('HSET', KEYS[1], 'state', 'done', 'fp', ARGV[4], 'response', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# KEYS: a job's key. ARGV: 1 until (ms), 2 the fenced value. 1: the job may still run.
_FENCE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[1])
return 0
"""


class StoredResponse(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """A ``done`` record's response, replayed byte for byte."""

    status: int
    headers: list[tuple[bytes, bytes]] = []
    #: The first request's ``x-request-id``.
    request_id: bytes = b""
    body: bytes = b""


_ENCODER = msgspec.msgpack.Encoder()
_RESPONSE = msgspec.msgpack.Decoder(StoredResponse)


@dataclass(frozen=True, slots=True)
class Found:
    """The key as a claim attempt found it: ``what`` (:data:`HELD`, :data:`LAPSED`,
    :data:`ABANDONED`, :data:`DONE`) and the holder's fingerprint, owner and job, or the response."""

    what: int
    fingerprint: bytes
    owner: str
    job: str
    model: str
    deadline_ms: int
    response: StoredResponse | None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ClaimStore:
    """The scripts on idempotency records (and the fence on a job's key), run by SHA."""

    def __init__(self, keys: Keys, *, lease_s: float, ttl_s: float, max_stored_bytes: int = -1) -> None:
        self.keys = keys
        self.max_stored_bytes = max_stored_bytes
        self.lease_ms = max(int(lease_s * 1000), 100)
        #: How long a lapsed lease must stay lapsed, watched, before its claim is abandoned.
        self.grace_ms = self.lease_ms
        self.ttl_ms = int(ttl_s * 1000)
        self._src = {"claim": _CLAIM, "renew": _RENEW, "bind": _BIND, "finish": _FINISH, "fence": _FENCE}
        self._sha = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in self._src.items()}

    async def _run(self, redis: Any, name: str, key: str | tuple[str, str], *args: Any) -> Any:
        keys = (key,) if isinstance(key, str) else key
        try:
            return await redis.execute_command("EVALSHA", self._sha[name], len(keys), *keys, *args)
        except NoScriptError:  # Redis restarted (or flushed its scripts)
            return await redis.execute_command("EVAL", self._src[name], len(keys), *keys, *args)

    async def claim(self, redis: Any, key: str, owner: str, fingerprint: bytes, stream: bool,
                    takeover: Found | None = None) -> Found | None:
        """Take ``key`` for ``owner`` (None), or say how it is held. ``takeover``: an abandoned
        claim found before, whose job can no longer run (:meth:`fence`), to replace if it is
        still that one and still abandoned."""
        r = await self._run(redis, "claim", key, owner, fingerprint, "1" if stream else "", self.lease_ms,
                            self.grace_ms, takeover.owner if takeover else "", takeover.job if takeover else "")
        if r[0] == 0:
            return None
        return Found(int(r[0]), r[1], _text(r[2]), _text(r[3]), _text(r[4]), int(r[5] or 0),
                     _RESPONSE.decode(r[6]) if r[0] == DONE else None)

    async def renew(self, redis: Any, key: str, owner: str) -> bool:
        """Renew ``owner``'s lease; False once the key is not its own."""
        return bool(await self._run(redis, "renew", key, owner, self.lease_ms, self.grace_ms))

    async def bind(self, redis: Any, key: str, owner: str, job: Job) -> bool:
        """Name ``job`` in ``owner``'s claim (renewing it) before the job is queued; False once
        the key is not its own (the job must not be queued then)."""
        return bool(await self._run(redis, "bind", key, owner, job.id, job.model, job.deadline_ms, self.lease_ms,
                                    self.grace_ms))

    async def finish(self, redis: Any, key: str, owner: str, fingerprint: bytes,
                     response: StoredResponse | None, key_id: str = "") -> int:
        """Store ``owner``'s response (None: free the key) within API key ``key_id``'s budget of
        stored bytes: 1 done, 2 freed instead (over the budget), 0 the key is not its own.

        The budget counter starts at the first store of a window and expires a TTL later, never
        decremented: a stored response is never deleted before its TTL (only a ``running`` claim
        is ever replaced), and each one lives at most a TTL past its window's end, so a key holds
        at most twice its budget at any time."""
        stored = _ENCODER.encode(response) if response is not None else b""
        return int(await self._run(redis, "finish", (key, self.keys.idempotency_bytes(key_id)), owner, stored,
                                   self.ttl_ms, fingerprint, self.max_stored_bytes))

    async def fence(self, redis: Any, found: Found, *, cancel: bool) -> bool:
        """Whether an abandoned claim's job can no longer run: its key is gone, and is now set so
        that its submission queues nothing. ``cancel``: tell the engines to drop it first."""
        if not found.job:
            return True  # its owner queued nothing, and can no longer (its binding would be refused)
        if cancel:
            await redis.publish(self.keys.cancel_channel, cancel_message(found.job, found.deadline_ms))
        until = max(found.deadline_ms, int(time.time() * 1000)) + self.lease_ms + self.grace_ms
        return not await self._run(redis, "fence", self.keys.job(found.model, found.job), until, FENCED)


@dataclass(slots=True, eq=False)
class Claim:
    """A running request's hold on its ``Idempotency-Key``, as its job's submissions see it
    (``RequestContext.claim``; ``Dispatcher`` binds each job before queueing it)."""

    store: ClaimStore
    redis: Any
    key: str
    owner: str

    async def bind(self, job: Job) -> None:
        """Name ``job`` in the claim before it is queued; raise when the claim was taken over (a
        409 the SDK retries: the retry then gets the new holder's answer)."""
        try:
            bound = await self.store.bind(self.redis, self.key, self.owner, job)
        except REDIS_ERRORS as exc:
            log.warning("idempotency state unavailable: %s", exc)
            raise ConduitError("The request could not be checked for idempotency; retry it.", status=503,
                               code="idempotency_unavailable") from None
        if not bound:
            raise Conflict("Another request with this Idempotency-Key took it over while this one was cut off "
                           "from its state; retry to get its response.", code="idempotency_key_in_use")
