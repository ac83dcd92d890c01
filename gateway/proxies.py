"""Who the client is: the TCP peer, or, behind trusted proxies, the address they forwarded.

The failed-authentication limit (``gateway.tenancy.failures``) counts failures per client address
(an IPv6 one by its /64), and every request log line names one. Behind a load balancer the TCP peer is the balancer for
every client, so one client's wrong keys would lock out all of them; believing any
``X-Forwarded-For`` instead lets each client pick a fresh address per request. So the header is
read only from a peer in ``trusted_proxies`` (addresses or CIDRs; empty, the default: nobody),
the way uvicorn's ``forwarded_allow_ips`` and nginx's ``set_real_ip_from`` decide:

* each proxy appends the address it saw to the header's right end, so the entries a client wrote
  itself are all to the left of the one its first proxy added. The client is found by walking
  from the peer leftwards through the header: the walk steps onto an entry while the address it
  stands on is trusted and fewer than ``proxy_hops`` (default 1) entries have been taken, and the
  address it stops on is the client's. One hop reads only the peer's own entry, which a client
  inside a trusted range cannot reach past either; give as many hops as there are proxies in
  front of the gateway (a CDN and a load balancer: 2, both trusted).
* an entry that is not an IP address (``unknown``, an obfuscated name, garbage, an empty entry)
  stops the walk: the trusted address last reached (the proxy that forwarded it) is the client.
  Nothing a client wrote is ever its address unless every proxy between was trusted and counted.
* ``proxy_header = forwarded`` reads RFC 7239 ``Forwarded`` (the ``for=`` of each element)
  instead of ``X-Forwarded-For``; only one of the two is ever read, since a proxy that writes one
  passes the other on as the client sent it. It is read from the right end, each header line on its
  own (a quoted string never spans two) and only as many elements as the hops take, so what a
  client wrote to the left of its proxy's element (an unclosed quote, kilobytes of anything) is
  never reached; an element that does not parse is an entry that is not an address.

A trusted peer's ``X-Forwarded-Proto`` (or the right-most ``Forwarded`` element's ``proto=``),
when ``http`` or ``https``, becomes the request's scheme, so ``url`` image links use the scheme
the client used (behind several proxies set ``public_url`` instead). uvicorn's own proxy-header
handling is off (``conduit gateway``): this module is the one place that decides.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.settings import ServerSettings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

HEADERS = ("x-forwarded-for", "forwarded")

#: Longer entries are never an address (the longest, a bracketed IPv6 with a port, is ~47 characters).
_MAX_NODE = 64
#: A longer ``Forwarded`` element is never one a proxy wrote (``for``, ``by``, ``host``, ``proto``).
_MAX_ELEMENT = 1024
_SEPARATORS = frozenset(',;=" \t')
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)
#: Entries whose verdict is remembered (parsing one and matching it costs ~2 us; a load balancer's
#: few addresses and the recent clients' stay in it).
_KNOWN = 4096


class TrustedProxies:
    """Resolves a request's client address (see the module docstring)."""

    __slots__ = ("networks", "hops", "header", "_known")

    def __init__(self, proxies: Sequence[str] = (), hops: int = 1, header: str = "x-forwarded-for") -> None:
        networks = []
        for entry in proxies:
            try:
                networks.append(ipaddress.ip_network(entry.strip()))
            except ValueError:
                raise ValueError(f"trusted_proxies: {entry!r} is not an IP address or network (CIDR with no host "
                                 "bits set, e.g. 10.0.0.0/8)") from None
        if hops < 1:
            raise ValueError(f"proxy_hops must be at least 1, not {hops}")
        if header not in HEADERS:
            raise ValueError(f"proxy_header must be one of {', '.join(HEADERS)}, not {header!r}")
        self.networks = tuple(networks)
        self.hops = hops
        self.header = header.encode()
        self._known = functools.lru_cache(maxsize=_KNOWN)(self._judge)

    @classmethod
    def from_settings(cls, server: ServerSettings) -> TrustedProxies:
        return cls(server.trusted_proxies, server.proxy_hops, server.proxy_header)

    def node(self, text: str) -> tuple[str, bool] | None:
        """An entry's address (normalised) and whether it is a trusted proxy's; None: not an address."""
        text = text.strip()
        if not text or len(text) > _MAX_NODE:
            return None
        return self._known(text)

    def _judge(self, text: str) -> tuple[str, bool] | None:
        address = _address(text)
        if address is None:
            return None
        return str(address), any(address in net for net in self.networks)

    def resolve(self, scope: Any) -> str:
        """The client's address for a request's ASGI ``scope`` (its peer's, unless that is a trusted
        proxy); with a trusted peer also sets ``scope["scheme"]`` from what it reports."""
        client = scope.get("client")
        peer = client[0] if client else ""
        if not self.networks:
            return peer
        judged = self.node(peer)
        if judged is None or not judged[1]:
            return peer
        values: list[str] = []
        proto = ""
        name = self.header
        for key, value in scope["headers"]:
            if key == name:
                values.append(value.decode("latin-1"))
            elif key == b"x-forwarded-proto":
                proto = value.decode("latin-1")
        if name == b"forwarded":
            nodes, proto = _forwarded(values, self.hops)
        else:
            nodes = _right_most(",".join(values), self.hops) if values else []
            proto = proto.rpartition(",")[2]
        proto = proto.strip().lower()
        if proto in ("http", "https"):
            scope["scheme"] = proto
        for taken, entry in enumerate(nodes, 1):
            forwarded = self.node(entry)
            if forwarded is None:
                break
            judged = forwarded
            if taken == self.hops or not judged[1]:
                break
        return judged[0]


def _right_most(header: str, n: int) -> list[str]:
    """The last ``n`` comma-separated entries of ``header``, right-most first (the rest is never split)."""
    parts = header.rsplit(",", n)
    return parts[::-1][:n]


def _forwarded(lines: list[str], n: int) -> tuple[list[str], str]:
    """The ``for=`` values of the last ``n`` elements of an RFC 7239 ``Forwarded`` header (its
    ``lines``, in order), right-most first ("" where an element has none), and the right-most
    element's ``proto=``. Read from the right end, one line at a time (a quoted string never spans
    two), and only as far as ``n`` elements: what a client wrote to the left of its proxy's element
    (an unclosed quote, a trailing backslash, 60 KB of anything) is never reached. An element that
    does not parse ends the list with a "" (the walk stops at the proxy that forwarded it)."""
    found: list[str] = []
    proto = ""
    for line in reversed(lines):
        end = len(line)
        while len(found) < n:
            element, end = _element(line, end)
            if element is None:
                found.append("")
                return found, proto
            if not found:
                proto = element.get("proto", "")
            found.append(element.get("for", ""))
            if end < 0:
                break
        if len(found) == n:
            break
    return found, proto


def _element(line: str, end: int) -> tuple[dict[str, str] | None, int]:
    """The pairs of the element of ``line`` that ends at ``end``, read leftwards (None: it does not
    parse, or is longer than ``_MAX_ELEMENT``), and where the comma before it stands (-1: none)."""
    low = max(0, end - _MAX_ELEMENT)
    pairs: dict[str, str] = {}
    i = _space_before(line, end, low)
    while True:
        if i > low and line[i - 1] not in ",;":  # a pair: name=token or name="quoted string"
            if line[i - 1] == '"':  # opens at the first quote to its left not escaped by a backslash
                j = i - 1
                while True:
                    j = line.rfind('"', low, j)
                    if j < 0:
                        return None, 0
                    k = j
                    while k > low and line[k - 1] == "\\":
                        k -= 1
                    if (j - k) % 2 == 0:
                        break
                value = _ESCAPED.sub(r"\1", line[j + 1:i - 1])
            else:
                j = _token_before(line, i, low)
                value = line[j:i]
                if j == i:
                    return None, 0
            i = _space_before(line, j, low)
            if i == low or line[i - 1] != "=":
                return None, 0
            i = _space_before(line, i - 1, low)
            j = _token_before(line, i, low)
            if j == i:
                return None, 0
            pairs.setdefault(line[j:i].lower(), value)
            i = _space_before(line, j, low)
        if i == 0:
            return pairs, -1
        if i == low or line[i - 1] != ";" and line[i - 1] != ",":
            return None, 0
        if line[i - 1] == ",":
            return pairs, i - 1
        i = _space_before(line, i - 1, low)


def _space_before(line: str, i: int, low: int) -> int:
    while i > low and line[i - 1] in " \t":
        i -= 1
    return i


def _token_before(line: str, i: int, low: int) -> int:
    """Where the token (a run of anything but separators, quotes and spaces) that ends at ``i`` starts."""
    while i > low and line[i - 1] not in _SEPARATORS:
        i -= 1
    return i


def _address(node: str) -> Address | None:
    """The IP address an entry names (``1.2.3.4``, ``1.2.3.4:80``, ``2001:db8::1``,
    ``[2001:db8::1]:80``; an IPv4-mapped IPv6 address as IPv4), or None."""
    if node[0] == "[":
        host, bracket, port = node[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
        node = host
    elif node.count(":") == 1:
        node, _, port = node.partition(":")
        if not port.isdigit():
            return None
    try:
        address = ipaddress.ip_address(node)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address
