"""Verifying API keys fast: cached verdicts, argon2 off the event loop, failures limited per client.

argon2id costs ~15 ms by design (``gateway.tenancy.keys.HASHER``), so a gateway verifies a
key's text once and remembers the verdict:

* verdicts are keyed by HMAC-SHA256 of the key text under a random secret of this process, so
  the cache holds nothing usable as a key (nor anything that can be checked offline against
  guessed keys). A verdict says "this text matches (or not) the argon2 hash H": it stays true
  for as long as the key's record carries H, so it survives key changes. The cache holds at most
  ``_CACHE_MAX`` verdicts and, once full, forgets the least recently used one per new one (a
  flood of distinct texts pushes out only verdicts nobody used since, never every key at once);
* key records are cached too, and dropped whenever ``Keys.keys_version`` moves; a background
  task polls it every ``poll_s`` (0.25 s), so revoking, disabling or changing a key takes
  effect on every gateway within ``poll_s`` plus one Redis round trip. A request after the
  drop reads the record again (one GET) and reuses its verdict: a change to one key never
  makes every key pay argon2 again. Expiry is checked against the clock at every use;
* argon2 runs on a small thread pool (argon2-cffi releases the GIL) with at most ``threads``
  verifications at once; a request waits at most ``verify_wait_s`` for a turn, then gets a 503
  with Retry-After (server_busy: the server, not the client, is short of capacity). Requests
  for one key text share one verification;
* failures (missing, malformed, unknown, wrong, expired, disabled, revoked) are counted per
  client (its address: the TCP peer, or what a trusted proxy forwarded, ``gateway.proxies``; an
  IPv6 address's /64) in a sliding window, in bounded memory (``gateway.tenancy.failures``): past
  ``failures`` in ``failure_window_s`` the client gets 429 ``rate_limit_exceeded`` with
  Retry-After for ``block_s`` on everything that is not already known to be a valid key. Keys
  verified before keep working, so a flood of wrong keys costs one dict lookup each and cannot
  starve valid ones.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, NoReturn, TypeVar

from argon2.exceptions import InvalidHashError, VerificationError

from engines.contract.lane import REDIS_ERRORS
from gateway.errors import ConduitError, Unauthorized
from gateway.tenancy.failures import FailureLimiter
from gateway.tenancy.keys import HASHER, KeyRecord, KeyStore, parse_key
from gateway.tenancy.principal import Principal

log = logging.getLogger("conduit.gateway")

MISSING_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
               "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
#: Never says which check failed (unknown, wrong, expired, disabled) and never echoes the key.
INCORRECT_KEY = "Incorrect API key provided."

#: Entries each cache holds at most (bounds memory under a flood of distinct texts).
_CACHE_MAX = 100_000

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")


class LruCache(Generic[K, V]):
    """At most ``size`` entries; a full cache forgets its least recently used entry for each new one."""

    __slots__ = ("size", "_entries")

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, default: D) -> V | D:
        """The entry (now the most recently used), or ``default``."""
        entries = self._entries
        if key not in entries:
            return default
        entries.move_to_end(key)
        return entries[key]

    def put(self, key: K, value: V) -> None:
        entries = self._entries
        entries[key] = value
        entries.move_to_end(key)
        if len(entries) > self.size:
            entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class TooManyFailures(ConduitError, status=429, type="rate_limit_error", code="rate_limit_exceeded"):
    """429 for a client (an address, an IPv6 /64) that failed authentication too often."""

    def __init__(self, retry_after_s: float) -> None:
        retry = max(1, int(retry_after_s + 0.999))
        super().__init__(f"Too many failed authentication attempts from your address or network; retry in {retry}s.",
                         headers={"Retry-After": str(retry)})


class AuthUnavailable(ConduitError, status=503, type="server_error", code="server_busy"):
    """503: keys cannot be checked now (Redis unreachable, or every verifier busy)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class Authenticator:
    """API key text -> :class:`Principal`, or the right error; and the admin credential check."""

    def __init__(self, store: KeyStore, *, admin_hash: str = "", metrics_hash: str = "", poll_s: float = 0.25,
                 threads: int = 2, verify_wait_s: float = 2.0, failures: int = 20, failure_window_s: float = 60.0,
                 block_s: float = 60.0) -> None:
        self.store = store
        self.admin_hash = admin_hash
        self.metrics_hash = metrics_hash
        self.poll_s = poll_s
        self.verify_wait_s = verify_wait_s
        self.failures = FailureLimiter(failures, failure_window_s, block_s)
        self._hmac_key = os.urandom(32)
        #: HMAC(text) -> (argon2 hash it was checked against, whether it matched).
        self._verdicts: LruCache[bytes, tuple[str, bool]] = LruCache(_CACHE_MAX)
        #: key id -> (record, its principal), or None for no such key; dropped when the version moves.
        self._records: LruCache[str, tuple[KeyRecord, Principal] | None] = LruCache(_CACHE_MAX)
        self._generation = 0
        self._version: int | None = None
        self._pending: dict[bytes, asyncio.Future[bool]] = {}
        self._fetching: dict[str, asyncio.Future[tuple[KeyRecord, Principal] | None]] = {}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")
        self._slots = asyncio.Semaphore(threads)

    # ---- keys ----------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None, addr: str) -> Principal:
        """The principal of a request's ``Authorization`` header value; raises 401, 429 or 503."""
        text = _bearer(authorization)
        if not text:
            self._fail(addr, MISSING_KEY)
        parsed = parse_key(text)
        if parsed is None:
            self._fail(addr, INCORRECT_KEY)
        key_id, secret = parsed
        digest = hmac.digest(self._hmac_key, text.encode(), "sha256")
        verdict = self._verdicts.get(digest, None)
        cached = self._records.get(key_id, False)
        if cached is False:
            # A text this process verified keeps working while its address is blocked, also when
            # its record must be read again (any key change drops every cached record).
            if verdict is None or not verdict[1]:
                self._admit(addr)
            self.failures.begin(addr)
            try:
                cached = await self._record(key_id)
            finally:
                self.failures.end(addr)
        if cached is None:
            self._fail(addr, INCORRECT_KEY)
        record, principal = cached
        if verdict is None or verdict[0] != record.hash:
            ok = await self._verify_from(addr, digest, record.hash, secret)
        else:
            ok = verdict[1]
        if not ok or record.disabled or record.expired():
            self._fail(addr, INCORRECT_KEY)
        return principal

    async def _verify_from(self, addr: str, digest: bytes, hashed: str, secret: str) -> bool:
        self._admit(addr)
        self.failures.begin(addr)
        try:
            return await self._verify(digest, hashed, secret)
        finally:
            self.failures.end(addr)

    async def _record(self, key_id: str) -> tuple[KeyRecord, Principal] | None:
        """A key's record from Redis (concurrent requests for one id share one read)."""
        fut = self._fetching.get(key_id)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._fetching[key_id] = fut
        generation = self._generation
        try:
            try:
                record = await self.store.get(key_id)
            except REDIS_ERRORS as exc:
                raise AuthUnavailable("API keys cannot be checked right now; try again shortly.") from exc
            entry = None if record is None else (record, record.principal())
            if generation == self._generation:  # no key change since the read began
                self._records.put(key_id, entry)
            fut.set_result(entry)
            return entry
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._fetching[key_id]

    async def _verify(self, digest: bytes, hashed: str, secret: str) -> bool:
        """argon2 on the pool, at most ``threads`` at once; one verification per text at a time."""
        fut = self._pending.get(digest)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._pending[digest] = fut
        try:
            ok = await self._argon2(hashed, secret)
            self._verdicts.put(digest, (hashed, ok))
            fut.set_result(ok)
            return ok
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()
            raise
        finally:
            del self._pending[digest]

    async def _argon2(self, hashed: str, secret: str) -> bool:
        try:
            await asyncio.wait_for(self._slots.acquire(), self.verify_wait_s)
        except TimeoutError:
            raise AuthUnavailable("The server is busy verifying API keys; try again shortly.") from None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, _matches, hashed, secret)
        finally:
            self._slots.release()

    def _fail(self, addr: str, message: str) -> NoReturn:
        self.failures.failed(addr)
        left = self.failures.blocked(addr)
        if left:
            raise TooManyFailures(left)
        raise Unauthorized(message)

    def _admit(self, addr: str) -> None:
        left = self.failures.admit(addr)
        if left:
            raise TooManyFailures(left)

    # ---- admin and metrics credentials ---------------------------------------------------

    async def authenticate_admin(self, authorization: str | None, addr: str) -> None:
        """Raise unless the header carries the admin credential (``admin_hash``)."""
        await self._credential(authorization, addr, b"admin", self.admin_hash)

    async def authenticate_metrics(self, authorization: str | None, addr: str) -> None:
        """Raise unless the header carries the metrics credential (``metrics_hash``): Prometheus's,
        which opens ``/metrics`` and nothing else (and the admin credential does not open it)."""
        await self._credential(authorization, addr, b"metrics", self.metrics_hash)

    async def _credential(self, authorization: str | None, addr: str, kind: bytes, hashed: str) -> None:
        text = _bearer(authorization)
        if not text or not hashed:
            self._fail(addr, MISSING_KEY if not text else INCORRECT_KEY)
        digest = hmac.digest(self._hmac_key, kind + b"\0" + text.encode(), "sha256")
        verdict = self._verdicts.get(digest, None)
        if verdict is None or verdict[0] != hashed:
            ok = await self._verify_from(addr, digest, hashed, text)
        else:
            ok = verdict[1]
        if not ok:
            self._fail(addr, INCORRECT_KEY)

    # ---- cache upkeep --------------------------------------------------------------------

    def drop_records(self) -> None:
        """Forget every cached record (the next request of each key reads it again)."""
        self._generation += 1
        self._records.clear()

    async def run(self) -> None:
        """Poll ``Keys.keys_version``; drop the cached records whenever it moves."""
        warned = False
        turns = 0
        while True:
            try:
                version = await self.store.version()
            except Exception as exc:
                if not warned:
                    log.warning("cannot read the API keys version (%s); keeping cached keys", type(exc).__name__)
                    warned = True
            else:
                warned = False
                if version != self._version:
                    self._version = version
                    self.drop_records()
            turns += 1
            if turns % 240 == 0:  # each minute
                self.failures.prune()
            await asyncio.sleep(self.poll_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _bearer(authorization: str | None) -> str:
    if not authorization:
        return ""
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _matches(hashed: str, secret: str) -> bool:
    try:
        return HASHER.verify(hashed, secret)
    except (VerificationError, InvalidHashError):
        return False
