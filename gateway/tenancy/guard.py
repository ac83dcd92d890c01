"""The one door: every request's path is checked, then its credential, before anything else runs.

**One canonical path.** The guard decides on the path Litestar's router routes: a path that
the router would normalise into another (doubled or trailing slashes) or that holds ``.`` or
``..`` segments is refused first with a 404, so no two spellings of one route can be judged
differently here, in a proxy in front, or in the router. (Percent-encoding is decoded by the
server before either sees the path: ``/v1/models/org%2Fname`` is the canonical
``/v1/models/org/name``, which is how the ``openai`` SDK sends a model id with a slash.)

**Deny by default.** What a route needs is asked of the router itself (``route_access``: the
handler the path and method reach, and its ``opt["access"]``), never read from a path prefix:

* ``key`` (every handler that says nothing, so a route added later is protected): an API key
  (``Authorization: Bearer cdt-...``) when ``settings.auth`` is on; the request's
  :class:`Principal` goes to its context (``gateway.context.RequestContext.principal``;
  ``ANONYMOUS`` when auth is off);
* ``admin``: the admin credential (``settings.admin_key_hash``); without a hash set the admin
  routes are not registered at all (404);
* ``metrics``: ``/metrics``, open unless ``settings.metrics_auth`` or a ``metrics_key_hash``:
  then the metrics credential (Prometheus's), which opens nothing else; the admin credential
  does not open it, so Prometheus never holds the credential that manages API keys;
* ``public``: the short list: ``/health``, ``/ready``, ``/openapi.json`` and
  ``/v1/images/files/{name}`` (its unguessable name is the capability, as OpenAI's signed image
  URLs are, and ``<img src>`` sends no header).

A handler's access holds for each method it registers: every GET route answers HEAD as well
(``gateway.common.routing``), so a HEAD needs what the GET needs. A path no route matches is
answered 404 here; one whose route lacks the method needs a key (then the router's 405); one
longer than ``MAX_PATH`` gets a 414; a websocket is closed.

On ``http.response.start`` of every response the guard adds the rate-limit headers found in the
request's context (``ratelimit``): a dict header name -> value filled by the limits check
(``x-ratelimit-limit-requests`` ...; a name without the ``x-ratelimit-`` prefix gets it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.context import RequestContext, context_of
from gateway.errors import ConduitError, NotFound, error_head
from gateway.settings import TenancySettings
from gateway.tenancy.auth import AuthUnavailable, Authenticator
from gateway.tenancy.principal import ANONYMOUS

_RATELIMIT = b"x-ratelimit-"

#: What a route needs, as its handler's ``opt`` (``@get(..., opt=PUBLIC)``); a handler without
#: one needs an API key.
KEY, ADMIN, METRICS, PUBLIC_ACCESS = "key", "admin", "metrics", "public"
PUBLIC: dict[str, Any] = {"access": PUBLIC_ACCESS}
ADMIN_ONLY: dict[str, Any] = {"access": ADMIN}
METRICS_ACCESS: dict[str, Any] = {"access": METRICS}

#: Characters of the longest path routed (model ids and image names are far shorter).
MAX_PATH = 2048

#: ``route_access(path, method)``: the access its route needs, or None when no route has the path.
RouteAccess = Callable[[str, str], str | None]


def canonical(path: str) -> bool:
    """Whether ``path`` is the one spelling of itself that the router routes: it starts with a
    slash and has no empty (``//``, a trailing ``/``), ``.`` or ``..`` segment."""
    if path == "/":
        return True
    if not path.startswith("/") or path.endswith("/") or "//" in path:
        return False
    return "/." not in path or all(seg not in (".", "..") for seg in path.split("/"))


@dataclass(slots=True)
class Guard:
    """ASGI middleware refusing non-canonical paths and authenticating requests (see the module
    docstring).

    ``authenticator`` returns the process's :class:`Authenticator` once the app's lifespan
    made it (None before: requests that need one get a 503); ``route_access`` asks the app's
    router what a path needs (``gateway.app.route_access``).
    """

    app: ASGIApp
    settings: TenancySettings
    authenticator: Callable[[], Any]
    route_access: RouteAccess

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":  # no route takes one (the server speaks none either)
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)  # lifespan
            return
        ctx = context_of(scope)
        try:
            await self._check(scope["path"], scope, ctx)
        except ConduitError as err:
            ctx.error = err.code or "error"  # for the request's log line and span
            await self._reject(err, send)
            return

        if not ctx.principal.key_id:
            await self.app(scope, receive, send)  # no key: no rate-limit headers to add
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                limits = ctx.ratelimit
                if limits:
                    message["headers"] = [*message.get("headers", ()), *_limit_headers(limits)]
            await send(message)

        await self.app(scope, receive, send_with_limits)

    async def _check(self, path: str, scope: Scope, ctx: RequestContext) -> None:
        if root_path := scope.get("root_path"):  # as the router reads it (no server of ours sets one)
            path = path.split(root_path, maxsplit=1)[-1]
        if len(path) > MAX_PATH:  # nor are such paths remembered by the router's cache
            raise ConduitError(f"The request's path is longer than this server accepts ({MAX_PATH} characters).",
                               status=414, type="invalid_request_error", code="uri_too_long")
        if not canonical(path):
            raise NotFound(f"Not found: `{path[:200]}` is not a canonical path (no doubled or trailing slashes, no "
                           "`.` or `..` segments).")
        access = self.route_access(path, scope["method"])
        if access is None:
            raise NotFound("Not found: no such route.")
        settings = self.settings
        if access == PUBLIC_ACCESS or (access == METRICS and not settings.metrics_protected):
            ctx.authenticated = not settings.auth  # with keys off, no request has more to show
            return
        if access == METRICS:
            await self._auth().authenticate_metrics(_header(scope, b"authorization"), _client(scope, ctx))
            ctx.authenticated = True
            return
        if access == ADMIN:
            await self._auth().authenticate_admin(_header(scope, b"authorization"), _client(scope, ctx))
            ctx.authenticated = True
            return
        # KEY, and anything a handler names that this guard does not know: deny by default.
        if not settings.auth:
            ctx.principal = ANONYMOUS
            ctx.authenticated = True
            return
        ctx.principal = await self._auth().authenticate(_header(scope, b"authorization"), _client(scope, ctx))
        ctx.authenticated = True

    def _auth(self) -> Authenticator:
        auth: Authenticator | None = self.authenticator()
        if auth is None:
            raise AuthUnavailable("The server is starting; try again shortly.")
        return auth

    async def _reject(self, err: ConduitError, send: Send) -> None:
        body, headers = error_head(err)
        if err.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="conduit"'))
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _client(scope: Scope, ctx: RequestContext) -> str:
    """The address failures are counted against: the observer's verdict (``gateway.proxies``), or the
    TCP peer where no observer ran (a guard on its own, in tests)."""
    if ctx.client:
        return ctx.client
    client = scope.get("client")
    return client[0] if client else ""


def _limit_headers(limits: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in limits.items():
        raw = name.lower().encode()
        out.append((raw if raw.startswith(_RATELIMIT) else _RATELIMIT + raw, str(value).encode()))
    return out
