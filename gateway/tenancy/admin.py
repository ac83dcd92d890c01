"""The admin API for API keys: ``/admin/keys`` (create, list) and ``/admin/keys/{id}`` (show, change, revoke).

Every handler here is ``ADMIN_ONLY``: the guard (``gateway.tenancy.guard``) lets only the admin
credential through, and without an ``admin_key_hash`` the app does not register them (404). A created key's text is in the
creation's answer and nowhere else; no answer ever carries a hash.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, patch, post

from gateway.errors import InvalidRequest, NotFound
from gateway.tenancy.guard import ADMIN_ONLY
from gateway.tenancy.keys import (
    Expiry,
    InvalidKeyField,
    KeyChanges,
    KeyInfo,
    KeyStore,
    Lifetime,
    ModelName,
    Name,
    Owner,
)
from gateway.tenancy.principal import KeyLimits
from gateway.tenancy.usage import UsageLog

_JSON = msgspec.json.Encoder()


class NewKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /admin/keys``: the key to make."""

    name: Name
    owner: Owner = ""
    #: None: every model.
    models: list[ModelName] | None = None
    limits: KeyLimits = msgspec.field(default_factory=KeyLimits)
    #: Epoch milliseconds after which the key stops working ...
    expires_ms: Expiry | None = None
    #: ... or a lifetime in days from now.
    expires_in_days: Lifetime | None = None
    disabled: bool = False


class CreatedKey(KeyInfo, kw_only=True):
    """The answer to a creation: the key's text, shown this once, and its record."""

    key: str


class KeyList(msgspec.Struct):
    data: list[KeyInfo]
    object: str = "list"


class DeletedKey(msgspec.Struct):
    id: str
    object: str = "api_key"
    deleted: bool = True


def _decode(body: bytes, type_: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body or b"{}", type=type_)
    except msgspec.ValidationError as exc:
        path = str(exc).rpartition("at `$.")[2].rstrip("`") if "at `$." in str(exc) else None
        raise InvalidRequest(f"Invalid body: {exc}", param=path) from None
    except msgspec.DecodeError:
        raise InvalidRequest("The body is not valid JSON.") from None


def _json(value: Any, status: int = 200) -> Response[bytes]:
    return Response(_JSON.encode(value), status_code=status, media_type="application/json")


def _missing(key_id: str) -> NotFound:
    return NotFound(f"No API key with id `{key_id[:40]}`.", param="id", code="key_not_found")


@post("/admin/keys", status_code=201, opt=ADMIN_ONLY)
async def create_key(request: Request[Any, Any, Any], key_store: KeyStore) -> Response[bytes]:
    """Make a key; the answer carries its text once."""
    new: NewKey = _decode(await request.body(), NewKey)
    expires_ms = new.expires_ms
    if new.expires_in_days is not None:
        expires_ms = int((time.time() + new.expires_in_days * 86400) * 1000)
    try:
        text, record = await key_store.create(new.name, owner=new.owner, models=new.models, limits=new.limits,
                                              expires_ms=expires_ms, disabled=new.disabled)
    except InvalidKeyField as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None
    info = record.info()
    return _json(CreatedKey(key=text, **msgspec.structs.asdict(info)), 201)


@get("/admin/keys", opt=ADMIN_ONLY)
async def list_keys(key_store: KeyStore) -> Response[bytes]:
    """Every key (no hashes, no secrets)."""
    return _json(KeyList(data=[r.info() for r in await key_store.list()]))


@get("/admin/keys/{key_id:str}", opt=ADMIN_ONLY)
async def show_key(key_id: str, key_store: KeyStore) -> Response[bytes]:
    record = await key_store.get(key_id)
    if record is None:
        raise _missing(key_id)
    return _json(record.info())


@patch("/admin/keys/{key_id:str}", opt=ADMIN_ONLY)
async def update_key(key_id: str, request: Request[Any, Any, Any], key_store: KeyStore) -> Response[bytes]:
    """Change a key's name, owner, models, limits, expiry or disabled flag (fields left out stay)."""
    changes: KeyChanges = _decode(await request.body(), KeyChanges)
    try:
        record = await key_store.update(key_id, changes)
    except InvalidKeyField as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None
    if record is None:
        raise _missing(key_id)
    return _json(record.info())


@delete("/admin/keys/{key_id:str}", status_code=200, opt=ADMIN_ONLY)
async def revoke_key(key_id: str, key_store: KeyStore) -> Response[bytes]:
    """Revoke a key for good (its record is deleted; every gateway refuses it within a second)."""
    if not await key_store.revoke(key_id):
        raise _missing(key_id)
    return _json(DeletedKey(id=key_id))


@get("/admin/keys/{key_id:str}/usage", opt=ADMIN_ONLY)
async def key_usage(key_id: str, request: Request[Any, Any, Any], key_store: KeyStore,
                    usage_log: UsageLog) -> Response[bytes]:
    """A key's requests, tokens and images per UTC day and model (``?days=N``, default 7, at most 400)."""
    if await key_store.get(key_id) is None:
        raise _missing(key_id)
    raw = request.query_params.get("days", "7")
    if not raw.isdigit() or not 1 <= int(raw) <= 400:
        raise InvalidRequest("`days` must be a whole number from 1 to 400.", param="days", code="invalid_value")
    return _json(await usage_log.read(key_id, int(raw), time.time()))


#: The admin routes, for ``create_app`` (registered only with an admin credential set).
ADMIN_ROUTES = [create_key, list_keys, show_key, update_key, revoke_key, key_usage]
