"""Stored responses (``store: true``, OpenAI's default): each API key's responses in Redis, shared by
every gateway replica, for ``response_ttl_s``.

One record per response (``Keys.stored_response``, in its key's hash tag): the ``Response`` as it was
answered (JSON) and the input items the model saw, each with an id (``input_items``). A chained response
(``previous_response_id``) holds its **whole** input: the previous response's input items, then that
response's output items, then its own input. Continuing a conversation is then one read of one record,
whatever the chain's length, and deleting (or expiring) an earlier response breaks no later one. The
price is bytes: a conversation of n turns stores its early turns n times. The alternative, a pointer to
the previous record and a walk at each turn, needs a depth bound, one read per turn of the chain, and
breaks a chain when one of its records is deleted or expires first.

What is stored is bounded three ways. A record is at most ``response_max_record_bytes`` (a larger one
is answered, not stored), so a ``previous_response_id`` loads at most that before its request is
admitted. Each API key holds at most ``response_max_stored_bytes`` and all keys together at most
``response_store_max_bytes``: the records live in the job queue's Redis, which never evicts. Both are
**live-bytes ledgers** (``Keys.stored_response_ledger``: a ZSET id -> expiry, a HASH id -> bytes and
``live``, their sum), kept by one script (``_LEDGER``) that first prunes members past their expiry
(at most ``_PRUNE`` a call, their bytes given back), then counts a record in while ``live`` is under
the cap and refuses it otherwise; saving an id again replaces its size, always (a background response
saved queued, then final, counts once, and its final record is never refused where its queued one
was taken). A deletion gives its bytes back at once (``_FORGET``). The key's ledger and its
records share a slot, so a record is stored and counted in one step; the global ledger is a slot of
its own, so a save is two calls: the global ledger first (member ``<key id>/<response id>``), then the
key's with the record; a key's refusal takes the global member back. A gateway killed between the two
leaves a global over-count that ends with its member's expiry: conservative, never an under-count. A
ledger takes a record while it is under its cap, so it holds at most its cap plus one record, plus
what the records saved again grew by (one record each, at most, of the background responses running).

A key whose store is full learns it at admission (``full``): 400 ``response_store_full``, before any
work, so its client can delete stored responses or send ``store: false``. Storing nothing silently
instead would break every later ``previous_response_id`` of a client that never asked about storage
(the SDK sends no ``store``, and ``true`` is the default). Requests admitted together before the cap
was reached may still be refused at their save (the ledger holds then): they are answered unstored,
logged, and a later retrieval is OpenAI's answer for an id it does not have (404;
400 ``previous_response_not_found``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from typing import Any

import msgspec
from redis.exceptions import NoScriptError

from engines.contract.keys import EVERY_KEY, Keys
from engines.contract.lane import REDIS_ERRORS
from gateway.errors import ConduitError
from gateway.settings import ResponseSettings
from gateway.tenancy.principal import Principal
from gateway.tenancy.usage import UsageLog

log = logging.getLogger("conduit.gateway")

#: What a stored response's id looks like (``resp_`` and the job's hex); any other id is no response.
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{1,64}")

#: Members a ledger call prunes at most (their bytes given back), expired ones first found first.
_PRUNE = 100

# KEYS: 1 the ledger's ZSET (member -> expiry ms), 2 its HASH (member -> bytes, ``live``: their sum),
# 3 (when a record is stored) the record. ARGV: 1 the member ("": prune only, answer {live, pruned}), 2 its bytes, 3 the lifetime ms, 4 the cap
# (-1: none), 5 the members to prune at most, 6 the record. Members past their expiry are pruned first.
# 1: counted (and stored), 0: the ledger holds its cap (nothing changed but the pruning). A member counted
# already is always replaced (a background response's final record after its queued one).
_LEDGER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = tonumber(redis.call('HGET', KEYS[2], 'live') or '0')
local gone = redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[5]))
for _, member in ipairs(gone) do
  live = live - tonumber(redis.call('HGET', KEYS[2], member) or '0')
  redis.call('HDEL', KEYS[2], member)
end
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HSET', KEYS[2], 'live', live)
end
if ARGV[1] == '' then return {live, #gone} end
local size, cap = tonumber(ARGV[2]), tonumber(ARGV[4])
local before = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if cap >= 0 and before == 0 and live >= cap then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], size, 'live', live - before + size)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
for i = 1, 2 do  -- the ledger outlives its last member (a gateway of a shorter TTL never shortens it)
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
if #KEYS == 3 then redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[3]) end
return 1
"""
# KEYS: 1 the ledger's ZSET, 2 its HASH, 3 (optional) the record. ARGV: 1 the member. The record
# deleted and its member's bytes given back: 1 when the record (or, without one, the member) was there.
_FORGET = """
local size = redis.call('HGET', KEYS[2], ARGV[1])
if size then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HINCRBY', KEYS[2], 'live', -tonumber(size))
end
if #KEYS == 3 then return redis.call('DEL', KEYS[3]) end
return size and 1 or 0
"""
_SCRIPTS = {name: (text, hashlib.sha1(text.encode()).hexdigest()) for name, text in
            (("ledger", _LEDGER), ("forget", _FORGET))}


class StoredRecord(msgspec.Struct, array_like=True):
    """One stored response: the ``Response`` (JSON, as answered) and its input items (a JSON list)."""

    response: bytes
    input: bytes


_ENCODER = msgspec.msgpack.Encoder()
_RECORD = msgspec.msgpack.Decoder(StoredRecord)


def store_unavailable() -> ConduitError:
    return ConduitError("Stored responses cannot be read right now; retry the request.", status=503,
                        code="response_store_unavailable")


class ResponseStore:
    """Each API key's stored responses: saved within their ledgers' caps, read and deleted by id."""

    __slots__ = ("redis", "keys", "ttl_ms", "max_stored_bytes", "max_total_bytes", "max_record_bytes", "usage",
                 "_undecodable_logged")

    def __init__(self, redis: Any, keys: Keys, settings: ResponseSettings, usage: UsageLog | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = int(settings.response_ttl_s * 1000)
        self.max_stored_bytes = settings.response_max_stored_bytes
        self.max_total_bytes = settings.response_store_max_bytes
        self.max_record_bytes = settings.response_max_record_bytes
        #: Where the bytes each key stored are counted (its usage's ``stored_bytes``, per model and day).
        self.usage = usage
        self._undecodable_logged = False

    async def _run(self, script: str, keys: tuple[str, ...], *args: Any) -> Any:
        text, sha = _SCRIPTS[script]
        try:
            return await self.redis.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:  # Redis restarted (or flushed its scripts)
            return await self.redis.execute_command("EVAL", text, len(keys), *keys, *args)

    async def save(self, owner: Principal, model: str, response_id: str, response: bytes, items: bytes) -> int:
        """Store a response of ``model`` and its input items for ``response_ttl_s``, counted in its key's
        usage: its size in bytes, or 0 when it was not stored (larger than ``response_max_record_bytes``,
        or its key's or the gateway-wide ledger holds its cap: each logged). Saving an id again replaces
        its record and its size."""
        key_id = owner.key_id
        record = _ENCODER.encode(StoredRecord(response, items))
        size = len(record)
        if size > self.max_record_bytes:
            log.warning("a response was not stored: its record (%d bytes) is over response_max_record_bytes (%d)",
                        size, self.max_record_bytes)
            return 0
        every = self.keys.stored_response_ledger(EVERY_KEY)
        member = f"{key_id}/{response_id}"
        if not await self._run("ledger", every, member, size, self.ttl_ms, self.max_total_bytes, _PRUNE):
            log.warning("a response was not stored: the gateway-wide response_store_max_bytes (%d) is held",
                        self.max_total_bytes)
            return 0
        own = (*self.keys.stored_response_ledger(key_id), self.keys.stored_response(key_id, response_id))
        stored = 0
        try:
            stored = await self._run("ledger", own, response_id, size, self.ttl_ms, self.max_stored_bytes, _PRUNE,
                                     record)
        finally:  # refused, or unknown (an error): the global member taken back (else it expires)
            if not stored:
                await self._run("forget", every, member)
        if not stored:
            log.warning("a response was not stored: its API key holds its response_max_stored_bytes (%d)",
                        self.max_stored_bytes)
            return 0
        if self.usage is not None:
            self.usage.stored(key_id, owner.name, model, size)
        return size

    async def full(self, owner: Principal) -> bool:
        """Whether a response of ``owner`` would not be stored now: its key's ledger or the gateway-wide
        one holds its cap (after giving back what expired). Two reads, and a pruning call only for a
        ledger found full; 503 when Redis cannot answer. (On every request that stores: both reads in
        one wait.)"""
        ledgers = [(k, cap) for k, cap in ((owner.key_id, self.max_stored_bytes), (EVERY_KEY, self.max_total_bytes))
                   if cap >= 0]
        try:
            lives = await asyncio.gather(*(self._live(k) for k, _ in ledgers))
            for (key_id, cap), live in zip(ledgers, lives, strict=True):
                if live >= cap and await self._pruned(key_id) >= cap:
                    return True
        except REDIS_ERRORS as exc:
            log.warning("stored responses unavailable: %s", exc)
            raise store_unavailable() from None
        return False

    async def _live(self, key_id: str) -> int:
        return int(await self.redis.hget(self.keys.stored_response_ledger(key_id)[1], "live") or 0)

    async def _pruned(self, key_id: str) -> int:
        """``key_id``'s live bytes once its expired members are given back (``_PRUNE`` a call, until none
        is left or 64 calls): a key refused at admission saves nothing, so no save would prune it."""
        ledger = self.keys.stored_response_ledger(key_id)
        for _ in range(64):
            live, pruned = await self._run("ledger", ledger, "", 0, 0, -1, _PRUNE)
            if pruned < _PRUNE:
                return int(live)
        return await self._live(key_id)

    async def load(self, key_id: str, response_id: str) -> StoredRecord | None:
        """``key_id``'s response ``response_id`` (None: unknown, expired, deleted, another key's, or a record
        of a shape this version cannot read, logged once); 503 when Redis cannot answer."""
        if RESPONSE_ID.fullmatch(response_id) is None:
            return None
        try:
            raw = await self.redis.get(self.keys.stored_response(key_id, response_id))
        except REDIS_ERRORS as exc:
            log.warning("stored responses unavailable: %s", exc)
            raise store_unavailable() from None
        if raw is None:
            return None
        try:
            return _RECORD.decode(raw)
        except msgspec.DecodeError as exc:
            if not self._undecodable_logged:
                self._undecodable_logged = True
                log.warning("a stored response cannot be read (answered as missing; logged once): %s", exc)
            return None

    async def delete(self, key_id: str, response_id: str) -> bool:
        """Delete ``key_id``'s response ``response_id``, its bytes given back to its key's ledger and the
        gateway-wide one; False when there was none."""
        if RESPONSE_ID.fullmatch(response_id) is None:
            return False
        own = (*self.keys.stored_response_ledger(key_id), self.keys.stored_response(key_id, response_id))
        try:
            deleted = await self._run("forget", own, response_id)
            await self._run("forget", self.keys.stored_response_ledger(EVERY_KEY), f"{key_id}/{response_id}")
        except REDIS_ERRORS as exc:
            log.warning("stored responses unavailable: %s", exc)
            raise store_unavailable() from None
        return bool(deleted)
