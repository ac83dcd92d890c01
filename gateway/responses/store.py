"""Stored responses (``store: true``, OpenAI's default): each API key's responses in Redis, shared by
every gateway replica, for ``response_ttl_s``.

One record per response (``Keys.stored_response``, in its key's hash tag): the ``Response`` as it was
answered (JSON) and the input items the model saw, each with an id (``input_items``). A chained response
(``previous_response_id``) holds its **whole** input: the previous response's input items, then that
response's output items, then its own input. Continuing a conversation is then one read of one record,
whatever the chain's length, and deleting (or expiring) an earlier response breaks no later one. The
price is bytes: a conversation of n turns stores its early turns n times. That is bounded: a chain's
input is at most ``max_messages`` items (its request is checked as a whole), and every record counts
against its key's budget of ``response_max_stored_bytes`` per window (``Keys.stored_response_bytes``,
a counter in the records' slot, like idempotency's). The alternative, a pointer to the previous record
and a walk at each turn, needs a depth bound, one read per turn of the chain, and breaks a chain when
one of its records is deleted or expires first.

Past the budget a response is answered but not stored: refusing the key's next requests instead would
refuse every Responses request of a client that never asked for storage (the SDK sends no ``store``,
and ``true`` is the default) for up to a whole window. A response not stored is then what OpenAI
answers for any id it does not have: 404 on retrieval, 400 ``previous_response_not_found``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

import msgspec
from redis.exceptions import NoScriptError

from engines.contract.keys import Keys
from engines.contract.lane import REDIS_ERRORS
from gateway.errors import ConduitError
from gateway.settings import ResponseSettings
from gateway.tenancy.principal import Principal
from gateway.tenancy.usage import UsageLog

log = logging.getLogger("conduit.gateway")

#: What a stored response's id looks like (``resp_`` and the job's hex); any other id is no response.
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{1,64}")

# KEYS: the record, its API key's stored-bytes counter (same slot). ARGV: 1 the record, 2 its lifetime
# ms, 3 the key's budget of stored bytes per lifetime (-1: none). 1: stored, 0: over the budget.
_SAVE = """
local size, budget = string.len(ARGV[1]), tonumber(ARGV[3])
if budget >= 0 then
  if tonumber(redis.call('GET', KEYS[2]) or '0') + size > budget then return 0 end
  redis.call('INCRBY', KEYS[2], size)
  if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_SAVE_SHA = hashlib.sha1(_SAVE.encode()).hexdigest()


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
    """Each API key's stored responses: saved within its budget, read and deleted by id."""

    __slots__ = ("redis", "keys", "ttl_ms", "max_stored_bytes", "usage")

    def __init__(self, redis: Any, keys: Keys, settings: ResponseSettings, usage: UsageLog | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = int(settings.response_ttl_s * 1000)
        self.max_stored_bytes = settings.response_max_stored_bytes
        #: Where the bytes each key stored are counted (its usage's ``stored_bytes``, per model and day).
        self.usage = usage

    async def save(self, owner: Principal, model: str, response_id: str, response: bytes, items: bytes) -> int:
        """Store a response of ``model`` and its input items for ``response_ttl_s``, counted in its key's
        usage: its size in bytes, or 0 when its key's budget for the window is spent (nothing stored)."""
        key_id = owner.key_id
        record = _ENCODER.encode(StoredRecord(response, items))
        keys = (self.keys.stored_response(key_id, response_id), self.keys.stored_response_bytes(key_id))
        args = (record, self.ttl_ms, self.max_stored_bytes)
        try:
            stored = await self.redis.execute_command("EVALSHA", _SAVE_SHA, 2, *keys, *args)
        except NoScriptError:  # Redis restarted (or flushed its scripts)
            stored = await self.redis.execute_command("EVAL", _SAVE, 2, *keys, *args)
        if not stored:
            return 0
        if self.usage is not None:
            self.usage.stored(key_id, owner.name, model, len(record))
        return len(record)

    async def load(self, key_id: str, response_id: str) -> StoredRecord | None:
        """``key_id``'s response ``response_id`` (None: unknown, expired, deleted or another key's);
        503 when Redis cannot answer."""
        if RESPONSE_ID.fullmatch(response_id) is None:
            return None
        try:
            raw = await self.redis.get(self.keys.stored_response(key_id, response_id))
        except REDIS_ERRORS as exc:
            log.warning("stored responses unavailable: %s", exc)
            raise store_unavailable() from None
        return None if raw is None else _RECORD.decode(raw)

    async def delete(self, key_id: str, response_id: str) -> bool:
        """Delete ``key_id``'s response ``response_id``; False when there was none. (Its bytes stay
        counted in the window: the budget bounds what a key writes, not what it holds.)"""
        if RESPONSE_ID.fullmatch(response_id) is None:
            return False
        try:
            return bool(await self.redis.delete(self.keys.stored_response(key_id, response_id)))
        except REDIS_ERRORS as exc:
            log.warning("stored responses unavailable: %s", exc)
            raise store_unavailable() from None
