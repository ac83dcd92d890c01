"""Which media URLs a request may make an engine fetch: the one policy gateways and engines apply.

A chat request names its images by URL (``image_url`` parts). vLLM fetches an http(s) URL itself,
from inside the network its engine runs in, following redirects: left alone, any client could
make an engine read its cloud's metadata service (169.254.169.254), an admin page on loopback or
anything else only the cluster can reach (server-side request forgery). So:

* by default nothing is fetched: only ``data:`` URLs are accepted (the image travels in the
  request), every other URL is refused;
* where fetching is turned on, only for the hosts listed in ``MediaPolicy.domains`` (a name
  exactly, or ``*.example.com`` for the names under it), over http(s), and never to an address
  that is not public (:func:`public_address`), whatever the name resolves to;
* a host given as an address is read in every spelling a resolver accepts (``2130706433``,
  ``0x7f.1``, ``0177.0.0.1``, ``[::ffff:127.0.0.1]``), so none slips past as a "name".

The gateway checks a request's URLs before queueing it (no DNS there: a name may resolve
differently later); the engine checks them again and fetches them itself, resolving the name
once, at connect time, refusing any address that is not public, and following no redirect
(``engines.media``), so what was checked is what is reached (no DNS rebinding).

Part of the sealed contract package (``engines.contract``); imports nothing of the project.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from urllib.parse import urlsplit

#: Error codes of a refused media URL (the OpenAI envelope's ``code``).
FETCHING_OFF = "media_url_not_allowed"
DOMAIN_NOT_ALLOWED = "media_domain_not_allowed"
ADDRESS_NOT_ALLOWED = "media_address_not_allowed"
INVALID_URL = "invalid_media_url"

# IANA's special-purpose registries (RFC 6890 and successors), multicast and reserved space:
# nothing a public media server lives at.
_NOT_PUBLIC_V4 = [IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4")]
#: Global unicast IPv6 space; everything outside it (loopback, unspecified, link-local, unique
#: local, site-local, multicast, IPv4-compatible, discard) is not public.
_GLOBAL_V6 = IPv6Network("2000::/3")
_NOT_PUBLIC_V6 = [IPv6Network(n) for n in (
    "2001::/23",      # IETF protocol assignments, Teredo (an IPv4 address inside) included
    "2001:db8::/32",  # documentation
    "2002::/16",      # 6to4: an IPv4 address inside; public ones have native addresses too
    "3fff::/20",      # documentation
)]
#: IPv6 prefixes that carry an IPv4 address in their last 32 bits and reach it: IPv4-mapped
#: (a dual-stack socket connects to the IPv4 address) and NAT64 (a translator does).
_CARRIES_V4 = [IPv6Network("::ffff:0:0/96"), IPv6Network("64:ff9b::/96")]

_HOST_NAME = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*$")
# What an RFC 3986 URL may hold; anything else (spaces, backslashes, controls, non-ASCII) is
# where URL parsers disagree, so it is refused rather than guessed at.
_URL_CHARS = re.compile(r"^[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+$")
_DECIMAL = re.compile(r"^[0-9]+$")
_HEX = re.compile(r"^0[xX][0-9a-fA-F]*$")


class MediaRefused(Exception):
    """A media URL the policy refuses; ``code`` says why (one of this module's codes)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class MediaTarget:
    """An http(s) media URL the policy allows, as it is to be fetched: rebuilt from its checked
    parts (``url``), so the fetcher reaches the host that was checked and no other."""

    url: str
    #: The host: a lower-case name, or an address (then ``address`` is set).
    host: str
    port: int
    address: IPv4Address | IPv6Address | None


def public_address(address: IPv4Address | IPv6Address) -> bool:
    """Whether ``address`` is one a public media server may have: not private, loopback,
    link-local, shared (CGNAT), multicast, reserved or documentation space, in IPv4 or IPv6,
    nor an IPv6 address that carries (and reaches) such an IPv4 one."""
    if isinstance(address, IPv6Address):
        carried = carried_ipv4(address)
        if carried is not None:
            return public_address(carried)
        return address in _GLOBAL_V6 and not any(address in n for n in _NOT_PUBLIC_V6)
    return not any(address in n for n in _NOT_PUBLIC_V4)


def carried_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv4-mapped or NAT64 (``64:ff9b::/96``) address carries, else None.
    Not the local-use ``64:ff9b:1::/48`` (RFC 8215): its operator picks the prefix length (/48 to
    /96), and with it where the IPv4 address sits (RFC 6052), which the address does not say."""
    for prefix in _CARRIES_V4:
        if address in prefix:
            return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _ipv4_number(part: str) -> int | None:
    """One dotted part as resolvers read it: ``0x`` hex, a leading ``0`` octal, else decimal."""
    try:
        if _HEX.match(part):
            return int(part[2:] or "0", 16)
        if len(part) > 1 and part.startswith("0"):
            return int(part[1:], 8)
        return int(part) if _DECIMAL.match(part) else None
    except ValueError:  # an 8 or 9 in an octal part
        return None


def ipv4_host(host: str) -> IPv4Address | None:
    """``host`` as the IPv4 address a resolver would take it for, in any of the spellings
    ``inet_aton`` and browsers accept (``127.1``, ``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1``);
    None for a name. A host that ends like a number but is no address is refused (a resolver
    might read it either way)."""
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    last = parts[-1]
    if not (_DECIMAL.match(last) or _HEX.match(last)):
        return None
    numbers = [_ipv4_number(p) for p in parts]
    if len(parts) > 4 or any(n is None for n in numbers):
        raise MediaRefused(f"The media URL's host {host!r} is neither a name nor an address.", INVALID_URL)
    *head, tail = numbers
    if any(n > 255 for n in head) or tail >= 256 ** (5 - len(numbers)):  # type: ignore[operator]
        raise MediaRefused(f"The media URL's host {host!r} is not a valid address.", INVALID_URL)
    value = tail + sum(n << (8 * (3 - i)) for i, n in enumerate(head))  # type: ignore[operator]
    return IPv4Address(value)


class MediaPolicy:
    """What media URLs requests may carry: ``data:`` URLs always; http(s) URLs only of
    ``domains`` (none: fetching is off), and only at public addresses."""

    __slots__ = ("_exact", "_suffixes", "domains")

    def __init__(self, domains: list[str] | tuple[str, ...] = ()) -> None:
        names = [d.strip().lower().rstrip(".") for d in domains if d.strip()]
        self.domains = tuple(names)
        self._exact = frozenset(n for n in names if not n.startswith("*."))
        self._suffixes = tuple(n[1:] for n in names if n.startswith("*."))

    @property
    def fetching(self) -> bool:
        """Whether any http(s) URL may be fetched at all."""
        return bool(self.domains)

    def check(self, url: str) -> MediaTarget | None:
        """None for a ``data:`` URL (nothing to fetch); the :class:`MediaTarget` of an http(s) URL
        the policy allows; raises :class:`MediaRefused` for any other."""
        if url[:5].lower() == "data:":
            return None
        if not self.domains:
            raise MediaRefused("This server does not fetch media by URL: send the image inline as a "
                               "base64 `data:` URL.", FETCHING_OFF)
        if not _URL_CHARS.match(url):
            raise MediaRefused("The media URL holds characters a URL may not (spaces, backslashes, control "
                               "or non-ASCII characters): percent-encode them.", INVALID_URL)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise MediaRefused(f"The media URL cannot be read ({exc}).", INVALID_URL) from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise MediaRefused("A media URL must be an http(s) or a `data:` URL.", FETCHING_OFF)
        netloc = parts.netloc
        if "@" in netloc:
            raise MediaRefused("A media URL may not carry a user name or password.", INVALID_URL)
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise MediaRefused("The media URL names no host.", INVALID_URL)
        address: IPv4Address | IPv6Address | None
        if netloc.startswith("["):
            try:
                if "%" in host:  # a zone ("%25eth0") names a local link
                    raise ValueError(host)
                address = IPv6Address(host)
            except ValueError:
                raise MediaRefused(f"The media URL's host [{host}] is not an IPv6 address.", INVALID_URL) from None
        else:
            address = ipv4_host(host)
            if address is None and not _HOST_NAME.match(host):
                raise MediaRefused(f"The media URL's host {host!r} is not a valid name.", INVALID_URL)
        if address is not None and not public_address(address):  # listed or not
            raise MediaRefused(f"The media URL's address {address} is not a public one.", ADDRESS_NOT_ALLOWED)
        name = str(address) if address is not None else host
        if not (name in self._exact or (address is None and host.endswith(self._suffixes))):
            raise MediaRefused(f"This server fetches media only from {', '.join(self.domains)}; not from "
                               f"{name}.", DOMAIN_NOT_ALLOWED)
        port = port if port is not None else (443 if scheme == "https" else 80)
        shown = f"[{address.compressed}]" if isinstance(address, IPv6Address) else name
        target = f"{scheme}://{shown}:{port}{parts.path or '/'}{'?' + parts.query if parts.query else ''}"
        return MediaTarget(url=target, host=name, port=port, address=address)


def check_address(host: str, address: str) -> None:
    """Refuse (:class:`MediaRefused`) ``address``, what ``host`` resolved to, unless it is public:
    engines call this on every address a name resolves to, when they connect."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        raise MediaRefused(f"{host} resolved to {address!r}, which is no address.", ADDRESS_NOT_ALLOWED) from None
    if not public_address(ip):
        raise MediaRefused(f"The media URL's host {host} resolves to {ip}, which is not a public address.",
                           ADDRESS_NOT_ALLOWED)
