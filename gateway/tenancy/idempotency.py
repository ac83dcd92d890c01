"""``Idempotency-Key``: a retried request gets the first one's response instead of a second run.

An ASGI middleware inside the auth guard, on the generation routes only. A request without
the header costs one header lookup. With it, the body is buffered and fingerprinted
(SHA-256 of method, path and body) and one Redis key per (API key, Idempotency-Key) holds
its state (``Keys.idempotency``):

- ``running``: claimed with ``SET NX`` by the request that runs it, under a lease its
  gateway refreshes every third of ``idempotency_lease_s``, so a gateway that died frees
  the key within one lease;
- ``done``: the response (status, content type, first request's ``x-request-id``, body),
  kept ``idempotency_ttl_s`` (24 h).

A retry that waits for the running one holds a connection and a task as a running request does,
so it takes one of its API key's concurrent slots while it waits (``Limiter.hold``): a key at
its ``concurrency`` limit gets the usual 429 for it, and one key can make a gateway hold no more
than its limit of requests, running or waiting.

A retry with the same fingerprint gets the stored response (``idempotent-replayed: true``),
or waits for the running one (at most ``request_timeout_s``) and gets its response; if the
running one's gateway died, the retry runs it. The same key with another body is a 409
``idempotency_key_reused``. Only complete, successful (2xx) non-streaming responses of at most
``idempotency_max_response_bytes`` are stored: a request refused or failed (4xx, 5xx, a client
gone: 499) leaves nothing behind, so its retry runs again and a refusal costs Redis nothing
after its answer. Streaming requests hold the key while they run (a second request with the
key meanwhile: 409 ``idempotency_key_in_use``) but are never stored or replayed.
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
from redis.exceptions import NoScriptError
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from engines.contract.lane import REDIS_ERRORS
from engines.contract.keys import Keys
from gateway.context import context_of
from gateway.errors import ConduitError, Conflict, InvalidRequest, PayloadTooLarge, error_head
from gateway.settings import IdempotencySettings
from gateway.tenancy.limits import Grant, Limiter

log = logging.getLogger("conduit.gateway")

HEADER = b"idempotency-key"
#: Routes whose requests may carry an ``Idempotency-Key`` (POST only).
ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/images/generations"})
#: Response headers kept with a stored response (``x-request-id`` is handled apart).
_KEPT = frozenset({b"content-type"})

RUNNING = "running"
DONE = "done"

# Claim: the current state, or nil after taking the key (ARGV[1] for ARGV[2] ms).
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
# Owner-only updates compare the whole running record: its owner token makes it unique.
# Refresh the lease (ARGV[2] ms); or finish: ARGV[2] "" releases, else becomes the value.
_REFRESH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


class IdempotencyRecord(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """What ``Keys.idempotency`` holds (msgpack)."""

    state: str
    #: SHA-256 of method, path and body: a retry must be the same request.
    fingerprint: bytes
    #: ``running``: a random token naming the request that holds the key.
    owner: str = ""
    started_ms: int = 0
    #: ``running``: a streaming request (never stored).
    stream: bool = False
    # ``done``: the response to replay.
    status: int = 0
    headers: list[tuple[bytes, bytes]] = []
    request_id: bytes = b""
    body: bytes = b""


class _StreamFlag(msgspec.Struct):
    stream: bool | None = None


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(IdempotencyRecord)
_STREAM_FLAG = msgspec.json.Decoder(_StreamFlag)


def _is_stream(body: bytes) -> bool:
    try:
        return bool(_STREAM_FLAG.decode(body).stream)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False  # the route answers it with a 400


def fingerprint(method: str, path: str, body: bytes) -> bytes:
    """What makes a retry "the same request"."""
    return hashlib.sha256(b"%s\0%s\0%s" % (method.encode(), path.encode(), body)).digest()


class _Scripts:
    """The three Lua scripts, run by SHA and loaded on a miss (Redis restarted)."""

    def __init__(self) -> None:
        self._src = {name: src for name, src in (("claim", _CLAIM), ("refresh", _REFRESH), ("finish", _FINISH))}
        self._sha = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in self._src.items()}

    async def run(self, redis: Any, name: str, key: str, *args: Any) -> Any:
        try:
            return await redis.execute_command("EVALSHA", self._sha[name], 1, key, *args)
        except NoScriptError:
            return await redis.execute_command("EVAL", self._src[name], 1, key, *args)


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
        self._scripts = _Scripts()
        # The bounds, read from the settings once rather than on every request.
        self._max_key_chars = settings.idempotency_max_key_chars
        self._max_response_bytes = settings.idempotency_max_response_bytes
        self._max_body_bytes = max_body_bytes
        self._request_timeout_s = request_timeout_s
        self._lease_ms = max(int(settings.idempotency_lease_s * 1000), 100)
        self._ttl_ms = int(settings.idempotency_ttl_s * 1000)

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
        slot: Grant | None = None  # held while this request waits for its twin
        try:
            while True:
                mine = _ENCODER.encode(IdempotencyRecord(state=RUNNING, fingerprint=fp, owner=os.urandom(12).hex(),
                                                         started_ms=int(time.time() * 1000), stream=stream))
                held = await self._scripts.run(redis, "claim", key, mine, self._lease_ms)
                if held is None:
                    await self._give_back(slot)  # admission takes the request's own
                    slot = None
                    await self._run(redis, key, mine, stream, body, scope, receive, send)
                    return
                record = _DECODER.decode(held)
                if record.fingerprint != fp:
                    # The SDK retries 409s (lock timeouts) unless told this one would not change.
                    raise Conflict("This Idempotency-Key was already used with a different request; use a new "
                                   "key for a new request.", code="idempotency_key_reused",
                                   headers={"x-should-retry": "false"})
                if record.state == DONE:
                    await _replay(scope, send, record)
                    return
                if stream:
                    raise Conflict("A request with this Idempotency-Key is still in progress; a streaming request "
                                   "cannot wait for it.", code="idempotency_key_in_use")
                if slot is None:
                    slot = await self._hold(scope, deadline)
                if not await self._wait(redis, key, held, deadline, receive):
                    return  # the client went away while waiting
                if time.monotonic() >= deadline:
                    raise Conflict("A request with this Idempotency-Key is still in progress; retry later.",
                                   code="idempotency_key_in_use")
                # The state changed (done, released, or taken over): the next claim tells.
        finally:
            await self._give_back(slot)

    async def _hold(self, scope: Scope, deadline: float) -> Grant | None:
        """One of the key's concurrent slots while this request waits (a connection and a task
        are held like a running request's): 429 at the key's limit; None when it has none."""
        limiter = self._limiter()
        if limiter is None:
            return None
        expiry_ms = int((time.time() + max(deadline - time.monotonic(), 0)) * 1000)
        return await limiter.hold(context_of(scope).principal, f"idem-{os.urandom(12).hex()}", expiry_ms)

    async def _give_back(self, slot: Grant | None) -> None:
        if slot is not None:
            try:
                await self._limiter().release(slot, None)  # type: ignore[union-attr]
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

    async def _wait(self, redis: Any, key: str, held: bytes, deadline: float, receive: Receive) -> bool:
        """Poll until the key no longer holds ``held`` or the deadline passes; False if the
        client went away meanwhile."""
        gone = asyncio.ensure_future(receive())  # the body is read: only http.disconnect can come
        delay = 0.02
        try:
            while (left := deadline - time.monotonic()) > 0:
                done, _ = await asyncio.wait({gone}, timeout=min(delay, left))
                if done:
                    return False
                delay = min(delay * 2, 0.25)
                if await redis.get(key) != held:
                    return True
            return True
        finally:
            gone.cancel()

    async def _run(self, redis: Any, key: str, mine: bytes, stream: bool, body: bytes,
                   scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request as the key's holder; store its response or release the key."""
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
            done = b""
            if complete and storable and 200 <= status < 300:
                done = _ENCODER.encode(IdempotencyRecord(
                    state=DONE, fingerprint=_DECODER.decode(mine).fingerprint, status=status, headers=headers,
                    request_id=context_of(scope).request_id, body=b"".join(chunks)))
            try:
                await self._scripts.run(redis, "finish", key, mine, done, self._ttl_ms)
            except REDIS_ERRORS as exc:
                # The lease runs out by itself: a retry then runs the request again.
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

        refresher = asyncio.create_task(self._refresh(redis, key, mine))
        try:
            await self._app(scope, replay_body, capture)
        finally:
            refresher.cancel()
            if not finished:
                await finish(complete=False)

    async def _refresh(self, redis: Any, key: str, mine: bytes) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                if not await self._scripts.run(redis, "refresh", key, mine, self._lease_ms):
                    return  # lost the key (our lease ran out while Redis was away)
            except REDIS_ERRORS as exc:
                log.warning("could not refresh an idempotency lease: %s", exc)


async def _replay(scope: Scope, send: Send, record: IdempotencyRecord) -> None:
    if record.request_id:
        # The observer (outside) sends the first request's id with the replay.
        context_of(scope).request_id = record.request_id
    headers = [*record.headers, (b"content-length", str(len(record.body)).encode()),
               (b"idempotent-replayed", b"true")]
    await send({"type": "http.response.start", "status": record.status, "headers": headers})
    await send({"type": "http.response.body", "body": record.body, "more_body": False})


async def _send_error(scope: Scope, send: Send, exc: ConduitError) -> None:
    context_of(scope).error = exc.code or "error"  # for the request's log line and span
    body, headers = error_head(exc)
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
