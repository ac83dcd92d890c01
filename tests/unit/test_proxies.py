"""Who the client is: the TCP peer, or what trusted proxies forwarded (``gateway.proxies``)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.proxies import TrustedProxies
from gateway.settings import GatewaySettings


def scope(peer: str | None, *headers: tuple[str, str], scheme: str = "http") -> dict[str, Any]:
    return {"type": "http", "client": (peer, 5000) if peer is not None else None, "scheme": scheme,
            "headers": [(k.encode(), v.encode("latin-1")) for k, v in headers]}


def client(proxies: TrustedProxies, peer: str | None, *headers: tuple[str, str]) -> str:
    return proxies.resolve(scope(peer, *headers))


XFF = "x-forwarded-for"


def test_by_default_nobody_is_trusted() -> None:
    proxies = TrustedProxies.from_settings(GatewaySettings().server)
    assert client(proxies, "10.0.0.1", (XFF, "203.0.113.7")) == "10.0.0.1"
    assert client(proxies, "127.0.0.1", (XFF, "203.0.113.7"), ("forwarded", "for=203.0.113.8")) == "127.0.0.1"
    assert client(proxies, None, (XFF, "203.0.113.7")) == ""


def test_a_trusted_peer_names_the_client_it_saw() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "2001:db8::1"])
    assert client(proxies, "10.1.2.3", (XFF, "203.0.113.7")) == "203.0.113.7"
    assert client(proxies, "10.1.2.3", (XFF, "6.6.6.6, 203.0.113.7")) == "203.0.113.7"  # the client wrote the rest
    assert client(proxies, "2001:db8::1", (XFF, "2001:DB8:0:0::7")) == "2001:db8::7"
    assert client(proxies, "::ffff:10.1.2.3", (XFF, "::ffff:203.0.113.7")) == "203.0.113.7"
    assert client(proxies, "192.0.2.1", (XFF, "203.0.113.7")) == "192.0.2.1"  # not a trusted peer
    assert client(proxies, "10.1.2.3") == "10.1.2.3"  # the proxy's own request
    # Several header lines are one list, in order (RFC 9110); ports and brackets are not the address.
    assert client(proxies, "10.1.2.3", (XFF, "6.6.6.6"), (XFF, "203.0.113.7:4711")) == "203.0.113.7"
    assert client(proxies, "10.1.2.3", (XFF, "[2001:db8::7]:4711")) == "2001:db8::7"


def test_hops_count_the_proxies_that_may_be_stepped_over() -> None:
    # CDN (198.51.100.0/24) -> load balancer (10.0.0.0/8) -> gateway.
    chain = (XFF, "6.6.6.6, 203.0.113.7, 198.51.100.9")
    assert client(TrustedProxies(["10.0.0.0/8", "198.51.100.0/24"], hops=2), "10.1.2.3", chain) == "203.0.113.7"
    # One hop: the load balancer's word only (the CDN's address is the client).
    assert client(TrustedProxies(["10.0.0.0/8", "198.51.100.0/24"]), "10.1.2.3", chain) == "198.51.100.9"
    # Two hops, but the CDN is not trusted: the walk stops at the first untrusted address.
    assert client(TrustedProxies(["10.0.0.0/8"], hops=2), "10.1.2.3", chain) == "198.51.100.9"
    # An internal client inside a trusted range cannot reach past the hops into what it wrote itself.
    assert client(TrustedProxies(["10.0.0.0/8"]), "10.1.2.3", (XFF, "6.6.6.6, 10.7.7.7")) == "10.7.7.7"
    # Fewer entries than hops: the left-most one.
    assert client(TrustedProxies(["0.0.0.0/0"], hops=3), "10.1.2.3", (XFF, "203.0.113.7")) == "203.0.113.7"


@pytest.mark.parametrize("header", [
    "", " ", ",", "203.0.113.7,", "unknown", "_hidden", "203.0.113.7, junk", "999.1.1.1", "203.0.113.7:port",
    "[2001:db8::7", "[2001:db8::7]x", "2001:db8::7]", "1.2.3.4\x00", "\u00e9", "0" * 5000, "1.2.3.4," * 2000,
    "010.1.1.1", "fe80::1%" + "x" * 100,
])
def test_a_malformed_header_from_a_trusted_proxy_names_that_proxy(header: str) -> None:
    proxies = TrustedProxies(["10.0.0.0/8"], hops=2)
    assert client(proxies, "10.1.2.3", (XFF, header)) == "10.1.2.3"
    # ... and from anyone else it is never read.
    assert client(proxies, "192.0.2.1", (XFF, header)) == "192.0.2.1"


def test_a_malformed_entry_past_the_first_hop_stops_the_walk_there() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"], hops=3)
    assert client(proxies, "10.1.2.3", (XFF, "203.0.113.7, junk, 10.9.9.9")) == "10.9.9.9"


def test_rfc_7239_forwarded() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"], hops=2, header="forwarded")
    fwd = "for=6.6.6.6, For=\"[2001:db8:cafe::17]:4711\";proto=https;by=10.0.0.1, for=10.9.9.9;host=\"a,b;c\""
    assert client(proxies, "10.1.2.3", ("forwarded", fwd)) == "2001:db8:cafe::17"
    assert client(proxies, "10.1.2.3", ("forwarded", "for=203.0.113.7;proto=http")) == "203.0.113.7"
    # X-Forwarded-For is not read when the proxies write Forwarded (a client may have sent it).
    assert client(proxies, "10.1.2.3", (XFF, "203.0.113.7")) == "10.1.2.3"
    for bad in ("for=unknown", "for=_hidden", "proto=https", 'for="203.0.113.7', "for=203.0.113.7;;=,", "", "for="):
        assert client(proxies, "10.1.2.3", ("forwarded", bad)) == "10.1.2.3", bad
    # Read from the right: the proxy's element, then the client's unclosed quote, which stops the walk.
    assert client(proxies, "10.1.2.3", ("forwarded", 'for="6.6.6.6, for=203.0.113.7')) == "203.0.113.7"
    assert client(proxies, "10.1.2.3", ("forwarded", 'for="6.6.6.6, for=10.9.9.9')) == "10.9.9.9"


def test_the_scheme_a_trusted_proxy_reports_is_the_requests() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    s = scope("10.1.2.3", (XFF, "203.0.113.7"), ("x-forwarded-proto", "https"))
    proxies.resolve(s)
    assert s["scheme"] == "https"
    s = scope("10.1.2.3", ("x-forwarded-proto", "gopher"))
    proxies.resolve(s)
    assert s["scheme"] == "http"
    s = scope("192.0.2.1", ("x-forwarded-proto", "https"))  # not trusted: not read
    proxies.resolve(s)
    assert s["scheme"] == "http"
    s = scope("10.1.2.3", ("forwarded", "for=203.0.113.7;proto=https"))
    TrustedProxies(["10.0.0.0/8"], header="forwarded").resolve(s)
    assert s["scheme"] == "https"


def test_settings_are_comma_separated_and_checked_at_start() -> None:
    server = GatewaySettings.from_env({"CONDUIT_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7,",
                                       "CONDUIT_PROXY_HOPS": "2", "CONDUIT_PROXY_HEADER": "forwarded"}).server
    assert (server.trusted_proxies, server.proxy_hops, server.proxy_header) == (
        ["10.0.0.0/8", "192.168.1.7"], 2, "forwarded")
    assert client(TrustedProxies.from_settings(server), "192.168.1.7", ("forwarded", "for=203.0.113.7")) == "203.0.113.7"
    for bad in (["10.0.0.0/33"], ["proxy.internal"], ["10.0.0.1/8"], ["*"]):
        with pytest.raises(ValueError, match="trusted_proxies"):
            TrustedProxies(bad)
    with pytest.raises(ValueError, match="proxy_hops"):
        TrustedProxies(["10.0.0.0/8"], hops=0)
    with pytest.raises(ValueError, match="proxy_header"):
        TrustedProxies(["10.0.0.0/8"], header="x-real-ip")


@pytest.mark.parametrize("sent", ['for="', 'for="1.1.1.1\\', 'for="6.6.6.6', 'for=6.6.6.6;by="x', '"', "for=\\"])
def test_a_clients_unclosed_quote_never_swallows_what_its_proxy_appended(sent: str) -> None:
    proxies = TrustedProxies(["10.0.0.1"], 1, "forwarded")
    # The proxy's element on a line of its own (a quote never spans header lines) ...
    assert client(proxies, "10.0.0.1", ("forwarded", sent), ("forwarded", "for=203.0.113.7")) == "203.0.113.7"
    # ... or appended to the client's line after a comma: read from the right, the garbage is never reached.
    assert client(proxies, "10.0.0.1", ("forwarded", sent + ", for=203.0.113.7")) == "203.0.113.7"
    assert client(proxies, "10.0.0.1", ("forwarded", sent + ',for="[2001:db8::7]:80";proto=https')) == "2001:db8::7"
    # Two hops: the first proxy's element is read, the client's garbage to its left stops the walk there.
    two = TrustedProxies(["10.0.0.0/8"], 2, "forwarded")
    assert client(two, "10.0.0.1", ("forwarded", sent), ("forwarded", "for=203.0.113.7, for=10.0.0.2")) == "203.0.113.7"
    assert client(two, "10.0.0.1", ("forwarded", sent + ", for=10.0.0.2")) == "10.0.0.2"


def test_a_malformed_element_from_the_proxy_itself_names_the_proxy() -> None:
    proxies = TrustedProxies(["10.0.0.1"], 1, "forwarded")
    for own in ('for="203.0.113.7', 'for=203.0.113.7"', 'for="a"b', "for==1.2.3.4"):
        assert client(proxies, "10.0.0.1", ("forwarded", "for=6.6.6.6"), ("forwarded", own)) == "10.0.0.1", own
        assert client(proxies, "10.0.0.1", ("forwarded", "for=6.6.6.6, " + own)) == "10.0.0.1", own


def test_a_long_header_is_read_from_its_right_end_only() -> None:
    """A 60 KB ``Forwarded`` header costs what its last element costs: reading it whole took
    ~3.5 ms a request (before authentication), reading from its right end ~6 us. The bound sits
    between the two, far from both, and the best of five rounds keeps a busy machine's pauses out."""
    import timeit
    proxies = TrustedProxies(["10.0.0.1"], 1, "forwarded")
    for junk in ("for=6.6.6.6;" * 5000, '"' + "a" * 60_000, "for=6.6.6.6, " * 5000):
        s = scope("10.0.0.1", ("forwarded", junk + ", for=203.0.113.7"))
        assert proxies.resolve(s) == "203.0.113.7"
        best = min(timeit.repeat(lambda s=s: proxies.resolve(s), number=20, repeat=5)) / 20
        assert best < 0.001, f"{best * 1e3:.2f} ms a request: the header is read whole"
