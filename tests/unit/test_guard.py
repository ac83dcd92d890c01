"""The guard decides on the router's own route (deny by default), on the canonical path only."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from litestar import Response, get, post

from engines.contract.keys import Keys
from gateway.app import create_app, route_access
from gateway.settings import GatewaySettings
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.guard import PUBLIC, Guard, canonical
from gateway.tenancy.keys import KeyStore



@get("/v1/added-later")
async def added_later() -> Response[bytes]:
    return Response(b"secret")


@post("/internal/debug")
async def internal_debug() -> Response[bytes]:
    return Response(b"secret")


@get("/status", opt=PUBLIC)
async def status() -> Response[bytes]:
    return Response(b"ok")


async def call(guard: Guard, method: str, path: str) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [], "client": ("10.0.0.1", 1234), "state": {}}
    await guard(scope, receive, send)  # type: ignore[arg-type]
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
def guard() -> Guard:
    settings = GatewaySettings()
    app = create_app(settings)
    for handler in (added_later, internal_debug, status):
        app.register(handler)
    authenticator = Authenticator(KeyStore(aioredis.Redis(), Keys("t")))
    return Guard(app, settings.tenancy, lambda: authenticator, route_access(app))


async def test_a_route_added_without_thought_needs_a_key(guard: Guard) -> None:
    assert (await call(guard, "GET", "/v1/added-later"))[0] == 401
    assert (await call(guard, "POST", "/internal/debug"))[0] == 401
    assert (await call(guard, "GET", "/internal/debug"))[0] == 401  # its route, another method
    assert (await call(guard, "OPTIONS", "/internal/debug"))[0] == 401
    assert await call(guard, "GET", "/status") == (200, b"ok")  # marked public: served without one
    assert (await call(guard, "GET", "/nowhere"))[0] == 404


async def test_admin_routes_are_not_registered_without_an_admin_credential() -> None:
    paths = {r.path for r in create_app(GatewaySettings()).routes}
    assert not {p for p in paths if p.startswith("/admin")}
    assert "/admin/keys" in {r.path for r in create_app(GatewaySettings.from_env({}, admin_key_hash="h")).routes}


@pytest.mark.parametrize(("path", "ok"), [
    ("/", True), ("/v1/models", True), ("/v1/models/org/name", True), ("/v1/models/a.b..c", True),
    ("/v1/models/.hidden", True), ("//v1/models", False), ("/v1//models", False), ("/v1/models/", False),
    ("/v1/./models", False), ("/v1/../admin", False), ("/v1/models/.", False), ("/v1/models/..", False),
    ("v1/models", False), ("", False),
])
def test_canonical(path: str, ok: bool) -> None:
    assert canonical(path) is ok


async def test_long_paths_and_websockets_are_refused(guard: Guard) -> None:
    status, body = await call(guard, "GET", "/v1/models/" + "m" * 3000)
    assert status == 414 and b"uri_too_long" in body
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await guard({"type": "websocket", "path": "/admin/keys", "headers": [], "state": {}},  # type: ignore[arg-type]
                receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]
