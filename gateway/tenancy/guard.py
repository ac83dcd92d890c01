"""The one door: every request's credential is checked here, before routing, and nowhere else.

* ``/v1/*`` needs an API key (``Authorization: Bearer cdt-...``) when ``settings.auth`` is on;
  the request's :class:`Principal` goes to ``scope["state"]["principal"]`` (``ANONYMOUS``
  when auth is off). ``/v1/images/files/*`` stays open: its unguessable names are the
  capability (as OpenAI's signed image URLs are), and ``<img src>`` sends no header.
* ``/admin/*`` needs the admin credential (``settings.admin_key_hash``); without a hash set the
  admin API does not exist (404). ``/metrics`` needs it too when ``settings.metrics_auth``.
* ``/health``, ``/ready`` and anything else stay open (unknown routes get their 404).

On ``http.response.start`` of every response the guard adds the rate-limit headers found at
``scope["state"]["ratelimit"]``: a dict header name -> value filled by the limits check
(``x-ratelimit-limit-requests`` ...; a name without the ``x-ratelimit-`` prefix gets it).
"""

from __future__ import annotations

from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import ConduitError, NotFound, encode_error
from gateway.settings import GatewaySettings
from gateway.tenancy.auth import AuthUnavailable, Authenticator
from gateway.tenancy.principal import ANONYMOUS, Principal

_RATELIMIT = b"x-ratelimit-"


def principal_of(scope: Any) -> Principal:
    """The principal the guard attached to a request (``ANONYMOUS`` when there is none)."""
    state = scope.get("state")
    return state.get("principal", ANONYMOUS) if state else ANONYMOUS


class Guard:
    """ASGI middleware authenticating requests (see the module docstring).

    ``authenticator`` returns the process's :class:`Authenticator` once the app's lifespan
    made it (None before: requests that need one get a 503).
    """

    def __init__(self, app: ASGIApp, settings: GatewaySettings, authenticator: Any) -> None:
        self.app = app
        self.settings = settings
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}  # type: ignore[typeddict-unknown-key]
        try:
            await self._check(scope["path"], scope, state)
        except ConduitError as err:
            state["error"] = err.code or "error"  # for the request's log line and span
            await self._reject(err, send)
            return

        principal = state.get("principal")
        if principal is None or not principal.key_id:
            await self.app(scope, receive, send)  # no key: no rate-limit headers to add
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                limits = state.get("ratelimit")
                if limits:
                    message["headers"] = [*message.get("headers", ()), *_limit_headers(limits)]
            await send(message)

        await self.app(scope, receive, send_with_limits)

    async def _check(self, path: str, scope: Scope, state: dict[str, Any]) -> None:
        settings = self.settings
        if path.startswith("/v1/") or path == "/v1":
            if not settings.auth or path.startswith("/v1/images/files/"):
                state["principal"] = ANONYMOUS
                return
            state["principal"] = await self._auth().authenticate(_header(scope, b"authorization"), _addr(scope))
        elif path.startswith("/admin/") or path == "/admin":
            if not settings.admin_key_hash:
                raise NotFound("Not found: no such route.")
            await self._auth().authenticate_admin(_header(scope, b"authorization"), _addr(scope))
        elif path == "/metrics" and settings.metrics_auth:
            await self._auth().authenticate_admin(_header(scope, b"authorization"), _addr(scope))

    def _auth(self) -> Authenticator:
        auth: Authenticator | None = self.authenticator()
        if auth is None:
            raise AuthUnavailable("The server is starting; try again shortly.")
        return auth

    async def _reject(self, err: ConduitError, send: Send) -> None:
        body = encode_error(err)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *((k.lower().encode(), v.encode()) for k, v in err.headers.items())]
        if err.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="conduit"'))
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _addr(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else ""


def _limit_headers(limits: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in limits.items():
        raw = name.lower().encode()
        out.append((raw if raw.startswith(_RATELIMIT) else _RATELIMIT + raw, str(value).encode()))
    return out
