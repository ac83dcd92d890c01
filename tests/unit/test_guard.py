"""The guard decides on the router's own route (deny by default), on the canonical path only."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from litestar import Response, get, post

from engines.contract.keys import Keys
from gateway.app import create_app, route_access
from gateway.settings import GatewaySettings, TenancySettings
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.guard import PUBLIC, Guard, canonical
from gateway.tenancy.keys import HASHER, KeyStore



@get("/v1/added-later")
async def added_later() -> Response[bytes]:
    return Response(b"secret")


@post("/internal/debug")
async def internal_debug() -> Response[bytes]:
    return Response(b"secret")


@get("/status", opt=PUBLIC)
async def status() -> Response[bytes]:
    return Response(b"ok")


async def call(guard: Guard, method: str, path: str, credential: str = "") -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "client": ("10.0.0.1", 1234), "state": {},
             "headers": [(b"authorization", f"Bearer {credential}".encode())] if credential else []}
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


async def passed(scope: Any, receive: Any, send: Any) -> None:
    """An app behind the guard that answers 200 to whatever reaches it."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"passed"})


async def test_the_metrics_credential_opens_metrics_and_nothing_else() -> None:
    """Prometheus holds the metrics credential: it opens /metrics only, and the admin credential
    (which manages API keys) does not open /metrics, so Prometheus never needs it."""
    admin, metrics = "admin-credential-0123456789", "metrics-credential-0123456789"
    settings = GatewaySettings.from_env({}, auth=True, admin_key_hash=HASHER.hash(admin), metrics_auth=True,
                                        metrics_key_hash=HASHER.hash(metrics))
    app = create_app(settings)
    authenticator = Authenticator(KeyStore(aioredis.Redis(), Keys("t")), admin_hash=settings.tenancy.admin_key_hash,
                                  metrics_hash=settings.tenancy.metrics_key_hash)
    guard = Guard(passed, settings.tenancy, lambda: authenticator, route_access(app))
    assert await call(guard, "GET", "/metrics", metrics) == (200, b"passed")
    assert (await call(guard, "GET", "/metrics", admin))[0] == 401
    assert (await call(guard, "GET", "/metrics"))[0] == 401
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/v1/models"),
                         ("POST", "/v1/chat/completions")):
        assert (await call(guard, method, path, metrics))[0] == 401, path
    assert await call(guard, "GET", "/admin/keys", admin) == (200, b"passed")


def test_metrics_auth_without_a_metrics_credential_refuses_to_start() -> None:
    """Rather than serve /metrics open (or, as before, behind the admin credential)."""
    with pytest.raises(ValueError, match="metrics_key_hash"):
        TenancySettings(metrics_auth=True)
    assert TenancySettings(metrics_key_hash="h").metrics_protected and not TenancySettings().metrics_protected
