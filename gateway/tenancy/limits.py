"""Per-key rate limits, shared by every gateway replica: one Lua script per admission.

**The window.** Requests, tokens and images are counted over a sliding window of the last 60
seconds, in one-second buckets: a hash per dimension, field = the Unix second, value = what
was taken in it. A request admitted in second ``s`` counts until second ``s + 60`` begins.
This is exact (nothing is ever admitted past a limit within any 60 s span measured in whole
seconds), deterministic (a burst of ``rpm`` requests and then nothing more for a minute,
whatever the order of arrival at which replica), and cheap: at most 60 fields per hash, read
whole by the script. A token bucket (GCRA) would refill continuously, so "exactly ``rpm``
admitted out of a burst" would depend on how long the burst took.

**Concurrency.** A ZSET per key holds the requests in flight, member = request id, score =
its expiry (the request's deadline plus a little grace). The script drops expired members
first, so a gateway that dies (kill -9) leaks its slots only until its requests' deadlines.
An idempotent retry waiting for its twin's answer takes a slot too (:meth:`Limiter.hold`): it
holds a connection and a task all the same; it, and a replayed retry, take a request of the
rpm. Every admitted request of a limited key is in the ZSET, concurrency-limited or not: its
presence makes a resent admission (the lane resends once after a broken connection) take
nothing twice, and its removal makes a resent release reconcile once.

**One round trip, all or nothing.** The script checks every limit first and takes from all
of them only if all have room (a refused request takes nothing). All of a key's keys share
the hash tag ``{rl:<key_id>}``: one Redis Cluster slot, so one script sees them all.

**Tokens** are reserved at admission (``gateway.tenancy.cost``: the prompt estimate plus the
most the request may generate) in the admission's bucket, and reconciled by :meth:`release`
with the real usage (the final usage, or for a request that ended without one, what its
engine reported generating so far: a client that hung up pays for what it was sent): the
difference is credited back to (or charged to) that bucket while it is in the window, and an
excess is charged to the current second after. A request that ended before any output keeps
its reservation: conservative. A request refused after admission (the queue's 429, an
engine's 4xx) gets its request, tokens and images back.

``Retry-After``: the time until enough buckets leave the window for the request to fit
(concurrency: 1 s, as no one knows when a running request ends). The ``x-ratelimit-reset-*``
headers give the time until the window is empty again ("resets to its initial state", as
OpenAI documents them), in OpenAI's duration format (``1s``, ``6m0s``, ``59.683s``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.exceptions import NoScriptError

from engines.contract.lane import ScriptLoader
from engines.contract.keys import Keys
from gateway.errors import RateLimited
from gateway.tenancy.cost import Cost
from gateway.tenancy.principal import KeyLimits, Principal
from telemetry.instruments import GatewayMetrics

#: A request's concurrency slot outlives its deadline by this much: its release, sent as it
#: ends at the latest at the deadline, still finds it (and reconciles its tokens).
SLOT_GRACE_MS = 2_000
WINDOW_S = 60

# Each window hash: field <second> -> amount taken in it, plus "sum" (the total of the second
# fields present), "low" (every second before it has been dropped) and "new" (the latest second
# taken in). Keeping the sum makes an admission read a few fields, not 60 buckets; a second
# leaves the window by being subtracted and deleted. A hash unused for 61 s expires whole.
# Dropping: seconds low .. oldest-1 (at most the 62 a live hash can hold below the window;
# more means the clock jumped, and the hash is recounted whole).
_WINDOW_FUNCTIONS = """
local function now_ms(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function window(k, now_s)
  local v = redis.call('HMGET', k, 'sum', 'low', 'new')
  local sum = tonumber(v[1]) or 0
  local oldest = now_s - 59
  local low = tonumber(v[2]) or oldest
  if low < oldest - 62 then
    -- more seconds behind than a live hash can hold (the clock jumped): recount it whole
    local h = redis.call('HGETALL', k)
    sum = 0
    for i = 1, #h, 2 do
      local b = tonumber(h[i])
      if b and b < oldest then redis.call('HDEL', k, h[i]) elseif b then sum = sum + tonumber(h[i + 1]) end
    end
    redis.call('HSET', k, 'sum', sum, 'low', oldest)
  elseif low < oldest then
    local gone = {}
    for b = low, oldest - 1 do gone[#gone + 1] = b end
    local amounts = redis.call('HMGET', k, unpack(gone))
    for i = 1, #gone do sum = sum - (tonumber(amounts[i]) or 0) end
    redis.call('HDEL', k, unpack(gone))
    redis.call('HSET', k, 'sum', sum, 'low', oldest)
  end
  return sum, tonumber(v[3]) or -1
end
local function take(k, s, n)
  redis.call('HINCRBY', k, s, n)
  redis.call('HINCRBY', k, 'sum', n)
  redis.call('HSET', k, 'new', s)
  if not redis.call('HGET', k, 'low') then redis.call('HSET', k, 'low', s - 59) end
  redis.call('PEXPIRE', k, 61000)
end
"""

# KEYS: requests, tokens, images (window hashes), in-flight (ZSET: request id -> expiry ms)
# ARGV: now ms ("": Redis's TIME), request id, slot expiry ms, rpm, tpm, ipm, concurrency (-1: no limit), tokens, images
# Returns {admitted 0/1, retry ms (-1: can never fit), refused dimension (1 requests, 2 tokens,
#          3 images, 4 concurrency), used of it, requests remaining, requests reset ms,
#          tokens remaining, tokens reset ms, bucket second}
_ADMIT = _WINDOW_FUNCTIONS + """
local now = now_ms(ARGV[1])
local sec = math.floor(now / 1000)
local rid = ARGV[2]
local expiry = tonumber(ARGV[3])
local limit = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local conc = tonumber(ARGV[7])
local cost = {1, tonumber(ARGV[8]), tonumber(ARGV[9])}
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local again = redis.call('ZSCORE', KEYS[4], rid)
local used = {0, 0, 0}
local newest = {-1, -1, -1}
for d = 1, 3 do
  if limit[d] >= 0 then used[d], newest[d] = window(KEYS[d], sec) end
end
local refused, retry, refused_used = 0, 0, 0
if not again then
  for d = 1, 3 do
    if limit[d] >= 0 and cost[d] > 0 and used[d] + cost[d] > limit[d] then
      if cost[d] > limit[d] then return {0, -1, d, used[d], 0, 0, 0, 0, sec} end
      -- Refused: find when enough seconds leave the window (oldest first) for it to fit.
      local h = redis.call('HGETALL', KEYS[d])
      local list = {}
      for i = 1, #h, 2 do
        local b = tonumber(h[i])
        if b and b >= sec - 59 then list[#list + 1] = {b, tonumber(h[i + 1])} end
      end
      table.sort(list, function(x, y) return x[1] < y[1] end)
      local left, wait = used[d], 60000
      for _, e in ipairs(list) do
        left = left - e[2]
        if left + cost[d] <= limit[d] then wait = (e[1] + 60) * 1000 - now break end
      end
      if wait > retry then retry, refused, refused_used = wait, d, used[d] end
    end
  end
  if conc >= 0 then
    local n = redis.call('ZCARD', KEYS[4])
    if n >= conc and refused == 0 then refused, retry, refused_used = 4, 1000, n end
  end
  if refused > 0 then
    return {0, retry, refused, refused_used, 0, 0, 0, 0, sec}
  end
  for d = 1, 3 do
    if limit[d] >= 0 and cost[d] > 0 then
      take(KEYS[d], sec, cost[d])
      used[d] = used[d] + cost[d]
      newest[d] = sec
    end
  end
  redis.call('ZADD', KEYS[4], expiry, rid)
  if redis.call('PTTL', KEYS[4]) < expiry - now then redis.call('PEXPIRE', KEYS[4], expiry - now) end
end
local out = {1, 0, 0, 0}
for d = 1, 2 do
  local reset = 0
  if newest[d] >= 0 and used[d] > 0 then reset = (newest[d] + 60) * 1000 - now end
  out[#out + 1] = math.max(limit[d] - used[d], 0)
  out[#out + 1] = reset
end
out[#out + 1] = sec
return out
"""

# KEYS: requests, tokens, images (window hashes), in-flight ZSET. ARGV: now ms ("": TIME), request id,
# admission second, token difference, requests given back, images given back.
# Once per request (the ZREM): a resent release changes nothing. A difference goes to the
# admission's own second while it is in the window (never below 0); an excess after it left the
# window is charged to the current second.
_RELEASE = _WINDOW_FUNCTIONS + """
if redis.call('ZREM', KEYS[4], ARGV[2]) == 0 then return 0 end
local sec = math.floor(now_ms(ARGV[1]) / 1000)
local b = tonumber(ARGV[3])
local function adjust(k, delta)
  if delta == 0 then return end
  window(k, sec)
  if b >= sec - 59 and redis.call('HEXISTS', k, b) == 1 then
    local have = tonumber(redis.call('HGET', k, b))
    local d = math.max(delta, -have)
    redis.call('HINCRBY', k, b, d)
    redis.call('HINCRBY', k, 'sum', d)
  elseif delta > 0 then
    take(k, sec, delta)
  end
end
adjust(KEYS[2], tonumber(ARGV[4]))
adjust(KEYS[1], -tonumber(ARGV[5]))
adjust(KEYS[3], -tonumber(ARGV[6]))
return 1
"""

_DIMENSIONS = {1: ("requests", "requests per minute (RPM)"), 2: ("tokens", "tokens per minute (TPM)"),
               3: ("images", "images per minute (IPM)"), 4: ("concurrency", "concurrent requests")}


@dataclass(slots=True, eq=False)
class Grant:
    """An admitted request's claim on its key's limits, given back by :meth:`Limiter.release`."""

    key_id: str
    rid: str
    #: The second whose buckets hold what admission took.
    second: int
    reserved: int
    #: The key's tokens are limited and the request was reserved tokens: reconcile them.
    metered: bool
    #: What admission took from the request (rpm) and image (ipm) windows: given back if the
    #: request is refused after admission.
    requests: int = 0
    images: int = 0


def has_limits(principal: Principal) -> bool:
    lim = principal.limits
    return bool(principal.key_id) and (lim.rpm is not None or lim.tpm is not None or lim.ipm is not None
                                       or lim.concurrency is not None)


def duration(ms: int) -> str:
    """A duration in OpenAI's (Go's) format: ``250ms``, ``1s``, ``59.683s``, ``6m0s``, ``1h0m0s``."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class Limiter:
    """Admits requests within their key's limits and gives back what they took when they end.

    ``lane``: a :class:`engines.contract.lane.RedisLane` (or ``ClusterLane``) of its own; ``redis``
    loads the scripts when Redis lost them.
    """

    def __init__(self, redis: Any, lane: Any, keys: Keys, metrics: GatewayMetrics | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self._redis = redis
        #: None: the window runs on Redis's clock (``TIME``), one clock for every gateway, so
        #: their clocks' skew cannot shift it. Tests pass one to move time.
        self._clock = clock
        self.lane = lane
        self._keys = keys
        self._metrics = metrics or GatewayMetrics.noop()
        self._scripts = ScriptLoader(redis)
        self._admit_sha = hashlib.sha1(_ADMIT.encode()).hexdigest()
        self._release_sha = hashlib.sha1(_RELEASE.encode()).hexdigest()

    async def _eval(self, script: str, sha: str, keys: tuple[str, ...], *args: Any) -> Any:
        cmd = ("EVALSHA", sha, len(keys), *keys, *args)
        try:
            return await self.lane.execute(*cmd)
        except NoScriptError:
            await self._scripts.load(script)
            return await self.lane.execute(*cmd)

    async def admit(self, principal: Principal, rid: str, cost: Cost, expiry_ms: int,
                    headers: dict[str, str] | None = None) -> Grant | None:
        """Take ``cost`` from ``principal``'s limits for request ``rid`` (its slot lasting until
        ``expiry_ms``), or raise :class:`RateLimited` taking nothing. None: the key has no
        limits (no Redis call at all). ``headers`` gets the ``x-ratelimit-*`` headers."""
        if not has_limits(principal):
            return None
        lim = principal.limits
        tokens = cost.tokens or 0
        metered = lim.tpm is not None and cost.tokens is not None
        now_ms = int(self._clock() * 1000) if self._clock else ""
        r = await self._eval(_ADMIT, self._admit_sha, self._keys.rate_limits(principal.key_id), now_ms, rid,
                             expiry_ms + SLOT_GRACE_MS, _limit(lim.rpm), _limit(lim.tpm), _limit(lim.ipm),
                             _limit(lim.concurrency), tokens if metered else 0, cost.images)
        admitted, retry_ms, refused, used, req_left, req_reset, tok_left, tok_reset, second = (int(x) for x in r)
        if headers is not None:
            if lim.rpm is not None:
                headers["x-ratelimit-limit-requests"] = str(lim.rpm)
                if admitted:
                    headers["x-ratelimit-remaining-requests"] = str(req_left)
                    headers["x-ratelimit-reset-requests"] = duration(req_reset)
            if lim.tpm is not None:
                headers["x-ratelimit-limit-tokens"] = str(lim.tpm)
                if admitted:
                    headers["x-ratelimit-remaining-tokens"] = str(tok_left)
                    headers["x-ratelimit-reset-tokens"] = duration(tok_reset)
        if admitted:
            return Grant(principal.key_id, rid, second, tokens if metered else 0, metered,
                         requests=1 if lim.rpm is not None else 0, images=cost.images if lim.ipm is not None else 0)
        name, what = _DIMENSIONS[refused]
        self._metrics.key_refused(principal.name, name)
        limit = {1: lim.rpm, 2: lim.tpm, 3: lim.ipm, 4: lim.concurrency}[refused]
        asked = {1: 1, 2: tokens, 3: cost.images, 4: 1}[refused]
        if retry_ms < 0:
            raise RateLimited(f"Request too large for {what} on API key `{principal.name}`: limit {limit}, "
                              f"requested {asked}. Ask for fewer (lower `max_tokens` or `n`).", WINDOW_S)
        retry_s = max(1, math.ceil(retry_ms / 1000))
        if headers is not None:
            self._refused_headers(headers, refused, used, retry_ms)
        raise RateLimited(f"Rate limit reached for {what} on API key `{principal.name}`: limit {limit}, used {used}, "
                          f"requested {asked}. Please try again in {retry_s}s.", retry_s)

    async def hold(self, principal: Principal, rid: str, expiry_ms: int,
                   headers: dict[str, str] | None = None) -> Grant | None:
        """Take one request of ``principal``'s rpm and one of its concurrent slots (no token or
        image) for ``rid`` until ``expiry_ms``, or raise :class:`RateLimited` at either limit: for
        a request answered without running (an idempotent retry that waits for another's answer,
        holding a connection and a task, or is replayed). None: the key limits neither.
        :meth:`release` gives the slot back (and with ``refused``, the request)."""
        lim = principal.limits
        alone = msgspec.structs.replace(principal, limits=KeyLimits(rpm=lim.rpm, concurrency=lim.concurrency))
        return await self.admit(alone, rid, Cost(), expiry_ms, headers)

    @staticmethod
    def _refused_headers(headers: dict[str, str], refused: int, used: int, retry_ms: int) -> None:
        # A refused request took nothing; what is known of the refused dimension is reported.
        if refused == 1:
            headers["x-ratelimit-remaining-requests"] = "0"
            headers["x-ratelimit-reset-requests"] = duration(retry_ms)
        elif refused == 2:
            limit = int(headers.get("x-ratelimit-limit-tokens", used))
            headers["x-ratelimit-remaining-tokens"] = str(max(limit - used, 0))
            headers["x-ratelimit-reset-tokens"] = duration(retry_ms)

    def release_command(self, grant: Grant, used_tokens: int | None, refused: bool = False) -> tuple[Any, ...]:
        """The command that ends ``grant``: frees its concurrency slot and reconciles its tokens
        with ``used_tokens`` (None: unknown, the reservation stands); ``refused`` (the request was
        refused after admission) also gives back its request and images."""
        delta = 0 if used_tokens is None or not grant.metered else used_tokens - grant.reserved
        requests, tokens, images, in_flight = self._keys.rate_limits(grant.key_id)
        return ("EVALSHA", self._release_sha, 4, requests, tokens, images, in_flight,
                int(self._clock() * 1000) if self._clock else "", grant.rid, grant.second, delta,
                grant.requests if refused else 0, grant.images if refused else 0)

    async def release(self, grant: Grant, used_tokens: int | None, refused: bool = False) -> None:
        """End ``grant`` (see :meth:`release_command`; safe to repeat)."""
        cmd = self.release_command(grant, used_tokens, refused)
        try:
            await self.lane.execute(*cmd)
        except NoScriptError:
            await self._scripts.load(_RELEASE)
            await self.lane.execute(*cmd)
