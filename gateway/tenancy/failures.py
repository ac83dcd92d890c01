"""Failed authentications per client over a sliding window, in bounded memory.

Past ``limit`` failures in ``window_s`` a client is blocked for ``block_s``
(``gateway.tenancy.auth`` answers it 429). Memory holds under a flood of distinct addresses
(cheap with IPv6, or a botnet):

* at most ``max_tracked`` clients with recent failures; a new one past that forgets the client
  whose last failure is oldest. Forgetting gives a client back at most ``limit - 1`` attempts,
  and pushing one out takes ``max_tracked`` failures from other clients, each of which has a
  budget of its own anyway: a flood gains nothing it did not pay for.
* blocked clients apart, at most ``max_blocked``: a flood of failures that block nobody never
  unblocks anyone. Past the bound the block closest to its end goes first (every block lasts
  ``block_s``, so that is the oldest); lifting one early takes ``limit * max_blocked`` failures
  from as many distinct clients.

Who one client is (:func:`client_of`): an IPv4 address, or an IPv6 address's /64 (one subscriber
line, host or VM usually holds a whole /64 and may pick any address in it, so counting per
address would let it rotate past the limit); an IPv4-mapped or NAT64 (``64:ff9b::/96``) IPv6
address is the IPv4 address it carries.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict

from engines.contract.media import carried_ipv4

#: Clients with recent failures tracked at most (~280 bytes each: 28 MB when full).
MAX_TRACKED = 100_000
#: Clients blocked at once at most (~180 bytes each: 18 MB when full).
MAX_BLOCKED = 100_000
#: Leading bits of an IPv6 address that name one client.
IPV6_CLIENT_BITS = 64
#: Addresses whose client is remembered (an IPv6 address is parsed once, ~3 us).
_KNOWN = 4096


def client_of(addr: str) -> str:
    """The client ``addr`` counts against: itself (IPv4, or not an address), the IPv4 address it
    carries when IPv4-mapped or NAT64 (``64:ff9b::/96``: a translator's IPv4 clients are not one
    /64), else its IPv6 /64 (``2001:db8:0:1::/64``)."""
    if ":" not in addr:
        return addr
    try:
        address = ipaddress.IPv6Address(addr)
    except ValueError:
        return addr
    carried = carried_ipv4(address)
    if carried is not None:
        return str(carried)
    return str(ipaddress.IPv6Network((int(address) >> (128 - IPV6_CLIENT_BITS) << (128 - IPV6_CLIENT_BITS),
                                      IPV6_CLIENT_BITS)))


class FailureLimiter:
    """Failed authentications per client (:func:`client_of` an address), in this process's memory."""

    __slots__ = ("limit", "window_s", "block_s", "max_tracked", "max_blocked", "_failures", "_blocked", "_pending",
                 "_client")

    def __init__(self, limit: int = 20, window_s: float = 60.0, block_s: float = 60.0, *,
                 max_tracked: int = MAX_TRACKED, max_blocked: int = MAX_BLOCKED) -> None:
        self.limit = limit
        self.window_s = window_s
        self.block_s = block_s
        self.max_tracked = max_tracked
        self.max_blocked = max_blocked
        #: client -> times of its failures in the window; least recently failed first.
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        #: client -> when its block ends; soonest first (every block lasts ``block_s``).
        self._blocked: OrderedDict[str, float] = OrderedDict()
        #: Checks under way per client that may still fail (each counts against the limit, so
        #: a burst of concurrent wrong keys cannot all pass before the first failure is counted).
        #: Bounded by the requests in flight.
        self._pending: dict[str, int] = {}
        self._client = functools.lru_cache(maxsize=_KNOWN)(client_of)

    def blocked(self, addr: str) -> float:
        """Seconds ``addr``'s client stays blocked (0: not blocked)."""
        client = self._client(addr)
        until = self._blocked.get(client)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            del self._blocked[client]
            return 0.0
        return left

    def admit(self, addr: str) -> float:
        """0 when ``addr`` may start a check that can fail; else seconds to wait before retrying."""
        left = self.blocked(addr)
        if left:
            return left
        client = self._client(addr)
        times = self._failures.get(client)
        cutoff = time.monotonic() - self.window_s
        recent = sum(1 for t in times if t > cutoff) if times else 0
        if recent + self._pending.get(client, 0) >= self.limit:
            return 1.0
        return 0.0

    def begin(self, addr: str) -> None:
        client = self._client(addr)
        self._pending[client] = self._pending.get(client, 0) + 1

    def end(self, addr: str) -> None:
        client = self._client(addr)
        n = self._pending[client] - 1
        if n:
            self._pending[client] = n
        else:
            del self._pending[client]

    def failed(self, addr: str) -> None:
        """Count a failure; the one that reaches the limit blocks the client."""
        client = self._client(addr)
        now = time.monotonic()
        failures = self._failures
        times = failures.get(client)
        if times is None:
            if len(failures) >= self.max_tracked:
                failures.popitem(last=False)
            times = failures[client] = []
        else:
            failures.move_to_end(client)
            cutoff = now - self.window_s
            if times[0] <= cutoff:
                times[:] = [t for t in times if t > cutoff]
        times.append(now)
        if len(times) >= self.limit:
            del failures[client]
            self._block(client, now)

    def _block(self, client: str, now: float) -> None:
        blocked = self._blocked
        blocked.pop(client, None)  # blocked again (failures while blocked): it now ends last
        if len(blocked) >= self.max_blocked:
            blocked.popitem(last=False)  # the block that ends first (maybe ended already)
        blocked[client] = now + self.block_s

    def prune(self) -> None:
        """Forget clients with no failure in the window and blocks that ended (both kept in that order)."""
        now = time.monotonic()
        failures = self._failures
        cutoff = now - self.window_s
        while failures:
            client, times = next(iter(failures.items()))
            if times[-1] > cutoff:
                break
            del failures[client]
        blocked = self._blocked
        while blocked:
            client, until = next(iter(blocked.items()))
            if until > now:
                break
            del blocked[client]

    def __len__(self) -> int:
        """Clients remembered: with recent failures or blocked."""
        return len(self._failures) + len(self._blocked)
