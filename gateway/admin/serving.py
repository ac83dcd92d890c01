"""The admin API for API keys: ``/admin/keys`` (create, list) and ``/admin/keys/{id}`` (show, change, revoke).

Every handler here is ``ADMIN_ONLY``: the guard (``gateway.tenancy.guard``) lets only the admin
credential through, and without an ``admin_key_hash`` the app does not register them (404). A
created key's text is in the creation's answer and nowhere else; no answer ever carries a hash.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response, delete, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from gateway.admin.protocol import CreatedKey, DeletedKey, KeyList, NewKey
from gateway.apispec import AUTH_ERRORS, REQUEST_ID, Operation, documented
from gateway.common.routing import get_and_head
from gateway.errors import InvalidRequest, NotFound
from gateway.tenancy.guard import ADMIN_ONLY
from gateway.tenancy.keys import InvalidKeyField, KeyChanges, KeyInfo, KeyStore
from gateway.tenancy.usage import KeyUsage, UsageLog

_JSON = msgspec.json.Encoder()


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


_ERRORS = {**AUTH_ERRORS, 401: "`invalid_api_key`: not the admin credential.",
           404: "`not_found`: the admin API is off (no `admin_key_hash` set).", 500: "`internal_error`."}
_NO_KEY = "`key_not_found`, or `not_found` (the admin API is off)."
KEY_ID = {"name": "key_id", "in": "path", "required": True, "description": "The key's public id.",
          "schema": {"type": "string"}}


def _admin(operation_id: str, summary: str, errors: dict[int, str], **more: Any) -> dict[str, Any]:
    """An admin handler's ``opt``: its operation (tagged Admin, Conduit's own) and ``ADMIN_ONLY``."""
    return documented(Operation(operation_id, summary, "Admin", {**_ERRORS, **errors}, extension="conduit", **more),
                      ADMIN_ONLY)


@post("/admin/keys", status_code=201, opt=_admin(
    "createKey", "Create an API key", {400: "`invalid_request`, `invalid_json`.", 413: "`request_too_large`."},
    body=NewKey, ok="Created: the key's text is in this answer only.", json=CreatedKey, parameters=(REQUEST_ID,)))
async def create_key(request: Request[Any, Any, Any],
                     key_store: NamedDependency[KeyStore]) -> Response[bytes]:
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


@get_and_head("/admin/keys", opt=_admin("listKeys", "Every API key (no hashes, no secrets)", {}, json=KeyList,
                                parameters=(REQUEST_ID,)))
async def list_keys(key_store: NamedDependency[KeyStore]) -> Response[bytes]:
    """Every key (no hashes, no secrets)."""
    return _json(KeyList(data=[r.info() for r in await key_store.list()]))


@get_and_head("/admin/keys/{key_id:str}", opt=_admin("retrieveKey", "One API key", {404: _NO_KEY}, json=KeyInfo,
                                            parameters=(KEY_ID, REQUEST_ID)))
async def show_key(key_id: FromPath[str], key_store: NamedDependency[KeyStore]) -> Response[bytes]:
    record = await key_store.get(key_id)
    if record is None:
        raise _missing(key_id)
    return _json(record.info())


@patch("/admin/keys/{key_id:str}", opt=_admin(
    "updateKey", "Change an API key (fields left out stay)",
    {400: "`invalid_request`.", 404: _NO_KEY, 413: "`request_too_large`."}, body=KeyChanges, body_required=False,
    json=KeyInfo, parameters=(KEY_ID, REQUEST_ID)))
async def update_key(key_id: FromPath[str], request: Request[Any, Any, Any],
                     key_store: NamedDependency[KeyStore]) -> Response[bytes]:
    """Change a key's name, owner, models, limits, expiry or disabled flag (fields left out stay)."""
    changes: KeyChanges = _decode(await request.body(), KeyChanges)
    try:
        record = await key_store.update(key_id, changes)
    except InvalidKeyField as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None
    if record is None:
        raise _missing(key_id)
    return _json(record.info())


@delete("/admin/keys/{key_id:str}", status_code=200, opt=_admin(
    "revokeKey", "Revoke an API key for good", {404: _NO_KEY}, json=DeletedKey, parameters=(KEY_ID, REQUEST_ID)))
async def revoke_key(key_id: FromPath[str], key_store: NamedDependency[KeyStore]) -> Response[bytes]:
    """Revoke a key for good (its record is deleted; every gateway refuses it within a second)."""
    if not await key_store.revoke(key_id):
        raise _missing(key_id)
    return _json(DeletedKey(id=key_id))


@get_and_head("/admin/keys/{key_id:str}/usage", opt=_admin(
    "getKeyUsage", "An API key's usage per UTC day and model",
    {400: "`invalid_value`: `days` out of range.", 404: _NO_KEY}, json=KeyUsage,
    parameters=(KEY_ID, {"name": "days", "in": "query", "required": False,
                         "description": "How many UTC days back, today included.",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 400, "default": 7}}, REQUEST_ID)))
async def key_usage(key_id: FromPath[str], request: Request[Any, Any, Any], key_store: NamedDependency[KeyStore],
                    usage_log: NamedDependency[UsageLog]) -> Response[bytes]:
    """A key's requests, tokens and images per UTC day and model (``?days=N``, default 7, at most 400)."""
    if await key_store.get(key_id) is None:
        raise _missing(key_id)
    raw = request.query_params.get("days", "7")
    if not raw.isdigit() or not 1 <= int(raw) <= 400:
        raise InvalidRequest("`days` must be a whole number from 1 to 400.", param="days", code="invalid_value")
    return _json(await usage_log.read(key_id, int(raw), time.time()))


#: The admin routes, for ``create_app`` (registered only with an admin credential set).
ADMIN_ROUTES = [create_key, list_keys, show_key, update_key, revoke_key, key_usage]
