"""``Idempotency-Key``: a retried request gets the first one's response instead of a second run.

An ASGI middleware inside the auth guard, on the generation routes only. A request without
the header costs one header lookup. With it, the body is buffered and fingerprinted
(SHA-256 of method, path and body) and one Redis record per (API key, Idempotency-Key) holds
its state (``Keys.idempotency``, kept by ``gateway.tenancy.claims``):

- ``running``: claimed by the request that runs it, under a lease its gateway renews every
  third of ``idempotency_lease_s``, naming the job it queues;
- ``done``: the response (status, content type, first request's ``x-request-id``, body),
  kept ``idempotency_ttl_s`` (24 h).

A retry with the same fingerprint gets the stored response (``idempotent-replayed: true``),
or waits for the running one (at most ``request_timeout_s``) and gets its response. If the
running one's lease lapsed and stays lapsed (its gateway died, or is cut off from Redis), the
retry takes the claim over once that request's job can no longer run (``claims``: never
while it may). The same key with another body is a 409 ``idempotency_key_reused``. Only
complete, successful (2xx) non-streaming responses of at most ``idempotency_max_response_bytes``
are stored: a request refused or failed (4xx, 5xx, a client gone: 499) leaves nothing behind,
so its retry runs again and a refusal costs Redis nothing after its answer. Streaming requests
hold the key while they run (a second request with the key meanwhile: 409
``idempotency_key_in_use``, unless the holder's lease lapsed) but are never stored or replayed.

A retry that waits holds a connection and a task as a running request does, so it takes one
of its API key's concurrent slots while it waits (``Limiter.hold``): a key at its
``concurrency`` limit gets the usual 429 for it, and one key can make a gateway hold no more
than its limit of requests, running or waiting. Whatever its limits, one gateway holds at most
``idempotency_max_waiters`` waiting retries per key (counted in process: what is held is this
process's connections and tasks, and the count costs no round trip nor leaks when a gateway
dies). A retry that waits or is replayed also takes one request of its key's rpm (none of its
tokens or images): it is answered without a generation, but it is a request all the same. A
waiter that ends up running gives it back (its admission takes one). Stored responses count
against their key's ``idempotency_max_stored_bytes`` (``ClaimStore.finish``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from engines.contract.lane import REDIS_ERRORS
from engines.contract.keys import Keys
from gateway.context import context_of
from gateway.errors import ConduitError, Conflict, InvalidRequest, PayloadTooLarge, RateLimited, error_head
from gateway.settings import IdempotencySettings
from gateway.tenancy.claims import ABANDONED, HELD, Claim, ClaimStore, Found, StoredResponse
from gateway.tenancy.limits import Grant, Limiter
from gateway.tenancy.principal import Principal

log = logging.getLogger("conduit.gateway")

HEADER = b"idempotency-key"
#: Routes whose requests may carry an ``Idempotency-Key`` (POST only).
ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/responses/input_tokens",
                    "/v1/embeddings", "/v1/images/generations"})
#: Response headers kept with a stored response (``x-request-id`` is handled apart).
_KEPT = frozenset({b"content-type"})
#: Seconds between a waiting retry's looks at the key, at most (fewer with a short lease).
_MAX_POLL_S = 0.25


class _StreamFlag(msgspec.Struct):
    stream: bool | None = None


_STREAM_FLAG = msgspec.json.Decoder(_StreamFlag)


def _is_stream(body: bytes) -> bool:
    try:
        return bool(_STREAM_FLAG.decode(body).stream)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False  # the route answers it with a 400


def fingerprint(method: str, path: str, body: bytes) -> bytes:
    """What makes a retry "the same request"."""
    return hashlib.sha256(b"%s\0%s\0%s" % (method.encode(), path.encode(), body)).digest()


class _Waiters:
    """Duplicates waiting on this gateway, by API key: at most ``limit`` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count: dict[str, int] = {}

    def enter(self, principal: Principal) -> bool:
        """Count one of ``principal``'s key in (True), or 429 at the limit."""
        n = self.count.get(principal.key_id, 0)
        if n >= self.limit:
            raise RateLimited(f"Too many requests of API key `{principal.name}` are waiting for a request with the "
                              f"same Idempotency-Key (at most {self.limit} per server); retry later.", 1)
        self.count[principal.key_id] = n + 1
        return True

    def leave(self, key_id: str, counted: bool) -> bool:
        """Count one out if ``counted``; False (not counted now)."""
        if counted:
            n = self.count.pop(key_id) - 1
            if n:
                self.count[key_id] = n
        return False


class IdempotencyMiddleware:
    """Replays the response of a request retried with the same ``Idempotency-Key``.

    ``redis`` returns the gateway's client and ``limiter`` its per-key limits (both opened by the
    app's lifespan, after this is built). The principal comes from the request's context (set
    by the auth guard outside this middleware; ``ANONYMOUS`` without one).
    """

    def __init__(self, app: ASGIApp, settings: IdempotencySettings, redis: Callable[[], Any], *, keys: Keys,
                 max_body_bytes: int, request_timeout_s: float,
                 limiter: Callable[[], Limiter | None] = lambda: None) -> None:
        self._app = app
        self._redis = redis
        self._limiter = limiter
        self._keys = keys
        self._claims = ClaimStore(keys, lease_s=settings.idempotency_lease_s, ttl_s=settings.idempotency_ttl_s,
                                  max_stored_bytes=settings.idempotency_max_stored_bytes)
        self._waiters = _Waiters(settings.idempotency_max_waiters)
        # The bounds, read from the settings once rather than on every request.
        self._max_key_chars = settings.idempotency_max_key_chars
        self._max_response_bytes = settings.idempotency_max_response_bytes
        self._max_body_bytes = max_body_bytes
        self._request_timeout_s = request_timeout_s
        # A waiting retry looks at least four times a grace: its looks are never far enough apart
        # to be taken for a pause (which restarts the grace).
        self._poll_s = min(_MAX_POLL_S, self._claims.grace_ms / 4000)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ROUTES:
            await self._app(scope, receive, send)
            return
        value = None
        for name, v in scope["headers"]:
            if name == HEADER:
                value = v
                break
        if value is None:
            await self._app(scope, receive, send)
            return
        try:
            await self._idempotent(value, scope, receive, send)
        except ConduitError as exc:
            await _send_error(scope, send, exc)
        except REDIS_ERRORS as exc:
            log.warning("idempotency state unavailable: %s", exc)
            await _send_error(scope, send, ConduitError("The request could not be checked for idempotency; retry it.",
                                                 status=503, code="idempotency_unavailable"))

    async def _idempotent(self, value: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        if len(value) > self._max_key_chars or not value.strip():
            raise InvalidRequest(f"The Idempotency-Key header must be 1 to "
                                 f"{self._max_key_chars} characters.",
                                 code="invalid_idempotency_key")
        body = await self._read_body(receive)
        if body is None:
            return  # the client went away
        principal = context_of(scope).principal
        key = self._keys.idempotency(principal.key_id, hashlib.sha256(value).hexdigest())
        fp = fingerprint(scope["method"], scope["path"], body)
        stream = _is_stream(body)
        redis = self._redis()
        deadline = time.monotonic() + self._request_timeout_s
        takeover: Found | None = None  # an abandoned claim whose job can no longer run
        # While this request waits: one of its key's concurrent slots, and its client's disconnect
        # (the body is read: nothing else can come).
        slot: Grant | None = None
        gone: asyncio.Future[Any] | None = None
        waiter = False  # counted in ``_waiters``
        delay, next_cancel = 0.02, 0.0
        try:
            while True:
                owner = os.urandom(12).hex()
                found = await self._claims.claim(redis, key, owner, fp, stream, takeover)
                takeover = None
                if found is None:
                    if gone is not None:  # it waited: what it held is the running request's now
                        gone.cancel()
                        gone = None
                        # (admission takes the request's own slot and request)
                        await self._give_back(slot, refund=True)
                        slot = None
                        waiter = self._waiters.leave(principal.key_id, waiter)
                    await self._run(redis, Claim(self._claims, redis, key, owner), fp, stream, body, scope, receive,
                                    send)
                    return
                if found.fingerprint != fp:
                    # The SDK retries 409s (lock timeouts) unless told this one would not change.
                    raise Conflict("This Idempotency-Key was already used with a different request; use a new "
                                   "key for a new request.", code="idempotency_key_reused",
                                   headers={"x-should-retry": "false"})
                if found.response is not None:
                    if gone is None:  # answered without running or waiting: still one of its key's requests
                        await self._give_back(await self._hold(scope, time.monotonic()))
                    await _replay(scope, send, found.response)
                    return
                if found.what == ABANDONED:
                    # Its job is cancelled (again each second: the channel may lose one), and the
                    # claim taken over once that job is gone and fenced.
                    cancel = time.monotonic() >= next_cancel
                    if cancel:
                        next_cancel = time.monotonic() + 1
                    if await self._claims.fence(redis, found, cancel=cancel):
                        takeover = found
                        continue
                elif found.what == HELD and stream:
                    raise Conflict("A request with this Idempotency-Key is still in progress; a streaming request "
                                   "cannot wait for it.", code="idempotency_key_in_use")
                # Wait: for the holder's answer, or (its lease lapsed) to see whether it renews it.
                if gone is None:
                    waiter = self._waiters.enter(principal)
                    slot = await self._hold(scope, deadline)
                    gone = asyncio.ensure_future(receive())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Conflict("A request with this Idempotency-Key is still in progress; retry later.",
                                   code="idempotency_key_in_use")
                done, _ = await asyncio.wait({gone}, timeout=min(delay, left))
                if done:
                    return  # the client went away while waiting
                delay = min(delay * 2, self._poll_s)
        finally:
            if gone is not None:
                gone.cancel()
            self._waiters.leave(principal.key_id, waiter)
            await self._give_back(slot)

    async def _hold(self, scope: Scope, deadline: float) -> Grant | None:
        """One of the key's requests (rpm) and one of its concurrent slots, for a request answered
        without running: while it waits (a connection and a task are held like a running
        request's) or replayed. 429 at either limit, with the key's ``x-ratelimit-*`` headers;
        None when it has neither."""
        limiter = self._limiter()
        if limiter is None:
            return None
        ctx = context_of(scope)
        if ctx.principal.key_id and ctx.ratelimit is None:
            ctx.ratelimit = {}  # sent by the guard
        expiry_ms = int((time.time() + max(deadline - time.monotonic(), 0)) * 1000)
        return await limiter.hold(ctx.principal, f"idem-{os.urandom(12).hex()}", expiry_ms, ctx.ratelimit)

    async def _give_back(self, slot: Grant | None, refund: bool = False) -> None:
        """Free ``slot``'s concurrent slot (``refund``: and its request, which admission takes again)."""
        if slot is not None:
            try:
                await self._limiter().release(slot, None, refused=refund)  # type: ignore[union-attr]
            except REDIS_ERRORS as exc:  # it expires at the wait's deadline anyway
                log.warning("could not give back a waiting request's concurrent slot: %s", exc)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body_bytes:
                raise PayloadTooLarge("The request body is larger than this server accepts.")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _run(self, redis: Any, claim: Claim, fp: bytes, stream: bool, body: bytes,
                   scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request as the key's holder; store its response or release the key."""
        context_of(scope).claim = claim  # each of its jobs is named in the claim before it is queued
        sent_body = False

        async def replay_body() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        status = 0
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        size = 0
        storable = not stream
        finished = False

        async def finish(complete: bool) -> None:
            nonlocal finished
            finished = True
            response = None
            if complete and storable and 200 <= status < 300:
                response = StoredResponse(status=status, headers=headers, request_id=context_of(scope).request_id,
                                          body=b"".join(chunks))
            try:
                done = await self._claims.finish(redis, claim.key, claim.owner, fp, response,
                                                 context_of(scope).principal.key_id)
                if not done:
                    log.warning("an idempotent request ended after a retry took its Idempotency-Key over")
                elif done == 2:
                    log.info("an idempotent response was not stored: its API key's budget of stored bytes is spent")
            except REDIS_ERRORS as exc:
                # The lease lapses by itself: a retry then runs the request again (its job is over).
                log.warning("could not record an idempotent request's end: %s", exc)

        async def capture(message: Message) -> None:
            nonlocal status, size, storable
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    name = name.lower()
                    if name == b"content-type" and value.startswith(b"text/event-stream"):
                        storable = False
                    if name in _KEPT:
                        headers.append((name, value))
            elif message["type"] == "http.response.body":
                if storable:
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self._max_response_bytes:
                        storable = False
                        chunks.clear()
                if not message.get("more_body", False):
                    # Stored (or released) before the client has its whole response: a retry
                    # it sends next finds the key done (or free), never still running.
                    await finish(complete=True)
            await send(message)

        renewer = asyncio.create_task(self._renew(redis, claim))
        try:
            await self._app(scope, replay_body, capture)
        finally:
            renewer.cancel()
            if not finished:
                await finish(complete=False)

    async def _renew(self, redis: Any, claim: Claim) -> None:
        while True:
            await asyncio.sleep(self._claims.lease_ms / 3000)
            try:
                if not await self._claims.renew(redis, claim.key, claim.owner):
                    # Taken over: this request's job is gone or fenced, and its next one is refused.
                    return
            except REDIS_ERRORS as exc:
                log.warning("could not renew an idempotency lease: %s", exc)


async def _replay(scope: Scope, send: Send, response: StoredResponse) -> None:
    if response.request_id:
        # The observer (outside) sends the first request's id with the replay.
        context_of(scope).request_id = response.request_id
    headers = [*response.headers, (b"content-length", str(len(response.body)).encode()),
               (b"idempotent-replayed", b"true")]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


async def _send_error(scope: Scope, send: Send, exc: ConduitError) -> None:
    context_of(scope).error = exc.code or "error"  # for the request's log line and span
    body, headers = error_head(exc)
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
