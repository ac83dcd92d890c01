"""The media policy both sides apply (``engines.contract.media``): which addresses are public, and
which media URLs a request may carry, in every spelling a resolver would accept."""

from __future__ import annotations

import ipaddress

import pytest

from engines.contract.media import (
    ADDRESS_NOT_ALLOWED,
    DOMAIN_NOT_ALLOWED,
    FETCHING_OFF,
    INVALID_URL,
    MediaPolicy,
    MediaRefused,
    check_address,
    public_address,
)

PNG = "data:image/png;base64,iVBORw0KGgo="


@pytest.mark.parametrize(("address", "public"), [
    # IPv4: private, loopback, link-local (the metadata service), "this network", CGNAT, reserved ...
    ("127.0.0.1", False), ("127.255.255.254", False), ("10.1.2.3", False), ("172.16.0.1", False),
    ("172.31.255.255", False), ("192.168.1.1", False), ("169.254.169.254", False), ("0.0.0.0", False),
    ("0.1.2.3", False), ("100.64.0.1", False), ("100.127.255.254", False), ("192.0.0.8", False),
    ("192.0.2.1", False), ("198.18.0.1", False), ("198.51.100.7", False), ("203.0.113.9", False),
    ("224.0.0.1", False), ("239.255.255.250", False), ("240.0.0.1", False), ("255.255.255.255", False),
    # ... and the public neighbours of those ranges.
    ("8.8.8.8", True), ("1.1.1.1", True), ("93.184.216.34", True), ("172.32.0.1", True), ("100.128.0.1", True),
    ("11.0.0.1", True), ("169.255.0.1", True), ("192.169.0.1", True),
    # IPv6: loopback, unspecified, link-local, unique local, site-local, multicast, discard, documentation.
    ("::1", False), ("::", False), ("fe80::1", False), ("febf::1", False), ("fc00::1", False),
    ("fd12:3456:789a::1", False), ("fec0::1", False), ("ff02::1", False), ("100::1", False), ("2001:db8::1", False),
    ("3fff::1", False),
    # IPv6 forms that carry (and reach) an IPv4 address: judged by it.
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("::ffff:10.0.0.1", False),
    ("::ffff:8.8.8.8", True), ("64:ff9b::a9fe:a9fe", False), ("64:ff9b::808:808", True),
    # IPv4-compatible (deprecated), 6to4 and Teredo: never a media server's address.
    ("::127.0.0.1", False), ("::8.8.8.8", False), ("2002:7f00:1::1", False), ("2002:808:808::1", False),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
    # Global unicast.
    ("2606:4700:4700::1111", True), ("2a00:1450:4001:81b::200e", True),
])
def test_public_addresses(address: str, public: bool) -> None:
    assert public_address(ipaddress.ip_address(address)) is public


#: Every private target is listed as allowed: an address that is not public is refused even so.
POLICY = MediaPolicy(["media.example.com", "*.cdn.example.net", "127.0.0.1", "169.254.169.254", "localhost",
                      "::1", "2606:4700:4700::1111"])


@pytest.mark.parametrize(("url", "code"), [
    ("http://127.0.0.1/", ADDRESS_NOT_ALLOWED),
    ("http://127.0.0.1:8080/a.png", ADDRESS_NOT_ALLOWED),
    # The other spellings of 127.0.0.1 a resolver (inet_aton) accepts: decimal, hex, octal, short.
    ("http://2130706433/", ADDRESS_NOT_ALLOWED),
    ("http://0x7f.1/", ADDRESS_NOT_ALLOWED),
    ("http://0x7f000001/", ADDRESS_NOT_ALLOWED),
    ("http://0177.0.0.1/", ADDRESS_NOT_ALLOWED),
    ("http://017700000001/", ADDRESS_NOT_ALLOWED),
    ("http://127.1/", ADDRESS_NOT_ALLOWED),
    ("http://127.0.1/", ADDRESS_NOT_ALLOWED),
    ("http://127.0.0.1./", ADDRESS_NOT_ALLOWED),
    ("http://169.254.169.254/latest/meta-data/", ADDRESS_NOT_ALLOWED),
    ("http://0xa9fea9fe/", ADDRESS_NOT_ALLOWED),
    ("http://2852039166/", ADDRESS_NOT_ALLOWED),
    ("http://0/", ADDRESS_NOT_ALLOWED),
    ("http://10.0.0.1/", ADDRESS_NOT_ALLOWED),
    ("http://[::1]/", ADDRESS_NOT_ALLOWED),
    ("http://[0:0:0:0:0:0:0:1]/", ADDRESS_NOT_ALLOWED),
    ("http://[::ffff:127.0.0.1]/", ADDRESS_NOT_ALLOWED),
    ("http://[::ffff:7f00:1]/", ADDRESS_NOT_ALLOWED),
    ("http://[::ffff:a9fe:a9fe]/", ADDRESS_NOT_ALLOWED),
    ("http://[fe80::1]/", ADDRESS_NOT_ALLOWED),
    ("http://[fd00::1]/", ADDRESS_NOT_ALLOWED),
    # Hosts that only look like names, or are neither names nor addresses.
    ("http://[fe80::1%25eth0]/", INVALID_URL),
    ("http://1.2.3.4.5/", INVALID_URL),
    ("http://256.1.1.1/", INVALID_URL),
    ("http://1.256.1.1/", INVALID_URL),
    ("http://09.1.1.1/", INVALID_URL),
    ("http://4294967296/", INVALID_URL),
    ("http://example.123/", INVALID_URL),
    ("http://%31%32%37.0.0.1/", INVALID_URL),
    ("http://[127.0.0.1]/", INVALID_URL),
    ("http://media.example.com:99999/", INVALID_URL),
    ("http:///a.png", INVALID_URL),
    ("http:media.example.com/a.png", INVALID_URL),
    # Where URL parsers disagree: user info, backslashes, spaces, non-ASCII.
    ("https://user:secret@media.example.com/a.png", INVALID_URL),
    ("https://media.example.com@127.0.0.1/a.png", INVALID_URL),
    ("https://media.example.com\\@127.0.0.1/a.png", INVALID_URL),
    ("https://media.example.com /a.png", INVALID_URL),
    ("https://mediä.example.com/a.png", INVALID_URL),
    # Names not listed.
    ("https://evil.example.org/a.png", DOMAIN_NOT_ALLOWED),
    ("https://media.example.com.evil.org/a.png", DOMAIN_NOT_ALLOWED),
    ("https://evilmedia.example.com/a.png", DOMAIN_NOT_ALLOWED),
    ("https://cdn.example.net/a.png", DOMAIN_NOT_ALLOWED),  # "*." is the names under it, not itself
    ("http://8.8.8.8/a.png", DOMAIN_NOT_ALLOWED),
    # Schemes other than http(s) and data.
    ("file:///etc/passwd", FETCHING_OFF),
    ("ftp://media.example.com/a.png", FETCHING_OFF),
    ("gopher://media.example.com/a.png", FETCHING_OFF),
])
def test_refused_urls(url: str, code: str) -> None:
    with pytest.raises(MediaRefused) as info:
        POLICY.check(url)
    assert info.value.code == code, info.value.message


@pytest.mark.parametrize(("url", "fetched", "host"), [
    ("https://media.example.com/a.png", "https://media.example.com:443/a.png", "media.example.com"),
    ("HTTPS://Media.Example.COM./a.png?size=2#top", "https://media.example.com:443/a.png?size=2",
     "media.example.com"),
    ("http://img.cdn.example.net:8080/x/y.jpg", "http://img.cdn.example.net:8080/x/y.jpg", "img.cdn.example.net"),
    ("https://media.example.com", "https://media.example.com:443/", "media.example.com"),
    ("http://[2606:4700:4700::1111]/a.png", "http://[2606:4700:4700::1111]:80/a.png", "2606:4700:4700::1111"),
    # A listed name is allowed here whatever it resolves to: the engine's resolver judges that, when it connects.
    ("http://localhost:8000/a.png", "http://localhost:8000/a.png", "localhost"),
])
def test_allowed_urls_are_rebuilt_from_their_checked_parts(url: str, fetched: str, host: str) -> None:
    target = POLICY.check(url)
    assert target is not None and (target.url, target.host) == (fetched, host)


def test_data_urls_pass_and_nothing_else_by_default() -> None:
    off = MediaPolicy()
    assert not off.fetching and POLICY.fetching
    assert off.check(PNG) is None and off.check("DATA:image/jpeg;base64,/9j/") is None and POLICY.check(PNG) is None
    for url in ("https://media.example.com/a.png", "http://127.0.0.1/", "file:///etc/passwd", "a.png"):
        with pytest.raises(MediaRefused) as info:
            off.check(url)
        assert info.value.code == FETCHING_OFF and "data:" in info.value.message


def test_domains_are_read_as_written_in_settings() -> None:
    policy = MediaPolicy([" Media.Example.com. ", "", "*.CDN.example.net"])
    assert policy.domains == ("media.example.com", "*.cdn.example.net")
    assert policy.check("https://media.example.com/a.png") is not None
    assert policy.check("https://a.b.cdn.example.net/a.png") is not None


@pytest.mark.parametrize(("address", "refused"), [
    ("127.0.0.1", True), ("::1", True), ("169.254.169.254", True), ("::ffff:10.0.0.1", True), ("fe80::1%eth0", True),
    ("not-an-address", True), ("93.184.216.34", False), ("2606:4700:4700::1111", False),
])
def test_resolved_addresses_are_checked_too(address: str, refused: bool) -> None:
    if refused:
        with pytest.raises(MediaRefused) as info:
            check_address("media.example.com", address)
        assert info.value.code == ADDRESS_NOT_ALLOWED
    else:
        check_address("media.example.com", address)
