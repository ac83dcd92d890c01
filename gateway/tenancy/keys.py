"""API keys: their text, their records in Redis, and the store that creates and changes them.

A key reads ``cdt-<id>-<secret>``: ``id`` is 12 lowercase hex characters, public, and names
the record (``Keys.api_key(id)``) so a key is found without a scan; ``secret`` is 32 bytes from
the CSPRNG in base64url (43 characters). The key text is shown once, when it is made; Redis
holds only an argon2id hash of the secret.

Every change INCRs ``Keys.keys_version`` (and publishes the new version on
``Keys.keys_changed``) in the same script as the change, so a gateway that sees the version
move drops what it cached about keys (``gateway.tenancy.auth``).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import Annotated, Any

import msgspec
from argon2 import PasswordHasher

from engines.contract.keys import Keys
from gateway.tenancy.principal import MAX_COUNT, MAX_PRIORITY, KeyLimits, Principal

#: The first part of every key's text (tells a Conduit key from others in a leaked-secret scan).
KEY_PREFIX = "cdt"
_KEY_RE = re.compile(r"cdt-([0-9a-f]{12})-([A-Za-z0-9_-]{43})")
_ID_RE = re.compile(r"[0-9a-f]{12}")

#: argon2id with OWASP's minimum parameters (19 MiB, 2 passes, 1 lane): ~15 ms a verification
#: on one core. A key's secret is 256 random bits, so the hash is defence in depth against a
#: stolen Redis dump, not what stops guessing; spending more would only make the first request
#: of each key (and each gateway start) slower, and a flood of wrong keys costlier to absorb.
#: Hashes carry their own parameters, so these can be raised later without breaking old keys.
HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16)

_MAX_NAME = 128
_MAX_EXPIRY = 2**63 - 1


class KeyRecord(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=False):
    """One API key as stored in Redis (msgpack). ``hash`` is argon2id of the secret; never the secret."""

    id: str
    #: A label for people, logs and metric labels (never the key itself).
    name: str
    #: argon2id encoded hash of the key's secret.
    hash: str
    #: Who the key belongs to (free text: a team, an e-mail, a customer id).
    owner: str = ""
    created_ms: int = 0
    #: Epoch milliseconds after which the key no longer works; None: never.
    expires_ms: int | None = None
    #: Models the key may use; None: all.
    models: list[str] | None = None
    limits: KeyLimits = msgspec.field(default_factory=KeyLimits)
    disabled: bool = False

    def principal(self) -> Principal:
        """The identity requests made with this key run as."""
        return Principal(key_id=self.id, name=self.name,
                         models=None if self.models is None else frozenset(self.models), limits=self.limits)

    def expired(self, now_ms: int | None = None) -> bool:
        return self.expires_ms is not None and (now_ms if now_ms is not None else _now_ms()) >= self.expires_ms

    def info(self) -> KeyInfo:
        """Everything about the key that may be shown (all but the hash)."""
        return KeyInfo(id=self.id, name=self.name, owner=self.owner, created_ms=self.created_ms,
                       expires_ms=self.expires_ms, models=self.models, limits=self.limits, disabled=self.disabled,
                       expired=self.expired())


class KeyInfo(msgspec.Struct, kw_only=True):
    """What ``conduit keys list|show`` and ``/admin/keys`` show of a key: no hash, no secret."""

    id: str
    name: str
    owner: str
    created_ms: int
    expires_ms: int | None
    models: list[str] | None
    limits: KeyLimits
    disabled: bool
    expired: bool


#: What the admin API accepts for a key's name, owner and model names (``validate`` also wants
#: printable text); in the OpenAPI document.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_NAME)]
Owner = Annotated[str, msgspec.Meta(max_length=_MAX_NAME)]
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
#: An expiry in epoch milliseconds (a record holds it as a 64-bit integer) ...
Expiry = Annotated[int, msgspec.Meta(ge=0, le=_MAX_EXPIRY)]
#: ... or a lifetime in days from now (at most a century).
Lifetime = Annotated[float, msgspec.Meta(gt=0, le=36_525)]


class KeyChanges(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Fields of a key to change (``KeyStore.update``, ``PATCH /admin/keys/{id}``); UNSET: keep."""

    name: Name | msgspec.UnsetType = msgspec.UNSET
    owner: Owner | msgspec.UnsetType = msgspec.UNSET
    #: None: all models.
    models: list[ModelName] | None | msgspec.UnsetType = msgspec.UNSET
    limits: KeyLimits | msgspec.UnsetType = msgspec.UNSET
    #: None: never expires.
    expires_ms: Expiry | None | msgspec.UnsetType = msgspec.UNSET
    disabled: bool | msgspec.UnsetType = msgspec.UNSET


class InvalidKeyField(ValueError):
    """A key field the store refuses (bad name, limits, models); the message says which."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _now_ms() -> int:
    return int(time.time() * 1000)


def new_key_text() -> tuple[str, str, str]:
    """A fresh key: (id, secret, text)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{KEY_PREFIX}-{key_id}-{secret}"


def parse_key(text: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key text, else None."""
    m = _KEY_RE.fullmatch(text)
    return (m.group(1), m.group(2)) if m else None


def valid_id(key_id: str) -> bool:
    return _ID_RE.fullmatch(key_id) is not None


def validate(record: KeyRecord) -> None:
    """Raise :class:`InvalidKeyField` for a record the store must not hold."""
    for field in ("name", "owner"):
        value = getattr(record, field)
        if len(value) > _MAX_NAME or not value.isprintable():
            raise InvalidKeyField(f"`{field}` must be at most {_MAX_NAME} printable characters.", field)
    if not record.name:
        raise InvalidKeyField("`name` must not be empty.", "name")
    if record.models is not None and any(not m or len(m) > 256 for m in record.models):
        raise InvalidKeyField("`models` must be non-empty model names.", "models")
    if record.expires_ms is not None and not 0 <= record.expires_ms <= _MAX_EXPIRY:
        raise InvalidKeyField("`expires_ms` must be epoch milliseconds (a 64-bit integer).", "expires_ms")
    lim = record.limits
    for field in ("rpm", "tpm", "ipm", "concurrency"):
        value = getattr(lim, field)
        if value is not None and not 0 <= value <= MAX_COUNT:
            raise InvalidKeyField(f"`limits.{field}` must be from 0 to {MAX_COUNT}.", f"limits.{field}")
    if not 1 <= lim.priority <= MAX_PRIORITY:
        raise InvalidKeyField(f"`limits.priority` must be from 1 to {MAX_PRIORITY}.", "limits.priority")
    if lim.backlog_share is not None and not 0 < lim.backlog_share <= 1:
        raise InvalidKeyField("`limits.backlog_share` must be in (0, 1].", "limits.backlog_share")


# SET the record (create: only if absent; update: only if unchanged since read), index it,
# INCR the version and publish it: one atomic step (all keys share the {keys} slot).
_PUT = """
local cur = redis.call('GET', KEYS[1])
if ARGV[3] == 'create' then
  if cur then return -1 end
elseif cur ~= ARGV[4] then
  if not cur then return -1 end
  return -2
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
local v = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[5], v)
return v
"""

_DELETE = """
local n = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
if n == 0 then return 0 end
local v = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[2], v)
return v
"""


class KeyStore:
    """API key records in Redis: create (the only time a key's text exists), list, get, update, revoke."""

    def __init__(self, redis: Any, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._encode = msgspec.msgpack.Encoder().encode
        self._decoder = msgspec.msgpack.Decoder(KeyRecord)
        self._put = redis.register_script(_PUT)
        self._delete = redis.register_script(_DELETE)

    def _run_put(self, record: KeyRecord, mode: str, old: bytes = b"") -> Any:
        k = self.keys
        return self._put(keys=[k.api_key(record.id), k.keys_index, k.keys_version],
                         args=[self._encode(record), record.id, mode, old, k.keys_changed])

    async def create(self, name: str, *, owner: str = "", models: list[str] | None = None,
                     limits: KeyLimits | None = None, expires_ms: int | None = None,
                     disabled: bool = False) -> tuple[str, KeyRecord]:
        """A new key: its text (shown once, stored nowhere) and its record."""
        while True:
            key_id, secret, text = new_key_text()
            digest = await asyncio.to_thread(HASHER.hash, secret)  # ~15 ms: off the event loop
            record = KeyRecord(id=key_id, name=name, hash=digest, owner=owner, created_ms=_now_ms(),
                               expires_ms=expires_ms, models=models, limits=limits or KeyLimits(), disabled=disabled)
            validate(record)
            if await self._run_put(record, "create") != -1:
                return text, record
            # 48 random bits collided with an existing id: draw again.

    async def get(self, key_id: str) -> KeyRecord | None:
        """A key's record, or None when there is no such key."""
        if not valid_id(key_id):
            return None
        raw = await self.redis.get(self.keys.api_key(key_id))
        return None if raw is None else self._decoder.decode(raw)

    async def list(self) -> list[KeyRecord]:
        """Every key's record, oldest first."""
        ids = sorted(i.decode() if isinstance(i, bytes) else i for i in await self.redis.smembers(self.keys.keys_index))
        if not ids:
            return []
        raws = await self.redis.mget([self.keys.api_key(i) for i in ids])
        records = [self._decoder.decode(raw) for raw in raws if raw is not None]
        return sorted(records, key=lambda r: (r.created_ms, r.id))

    async def update(self, key_id: str, changes: KeyChanges) -> KeyRecord | None:
        """Apply ``changes`` to a key; its new record, or None when there is no such key."""
        if not valid_id(key_id):
            return None
        while True:
            raw = await self.redis.get(self.keys.api_key(key_id))
            if raw is None:
                return None
            fields = {f: v for f in KeyChanges.__struct_fields__
                      if (v := getattr(changes, f)) is not msgspec.UNSET}
            record = msgspec.structs.replace(self._decoder.decode(raw), **fields)
            validate(record)
            done = await self._run_put(record, "update", raw)
            if done == -1:
                return None
            if done != -2:
                return record
            # Changed by someone else since we read it: apply the changes to the new record.

    async def revoke(self, key_id: str) -> bool:
        """Delete a key for good; False when there was no such key."""
        if not valid_id(key_id):
            return False
        k = self.keys
        return bool(await self._delete(keys=[k.api_key(key_id), k.keys_index, k.keys_version],
                                       args=[key_id, k.keys_changed]))

    async def version(self) -> int:
        """The current keys version (0 before any key was made)."""
        raw = await self.redis.get(self.keys.keys_version)
        return int(raw) if raw is not None else 0
