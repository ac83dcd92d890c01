"""Who the client is, from a real gateway: the failed-authentication limit and the request log
key on the TCP peer unless it is a trusted proxy (the test's connections come from 127.0.0.1, or
from 127.0.0.2 playing a load balancer); the limit takes an IPv6 address's /64 as one client."""

from __future__ import annotations

import time

import httpx

from tests.harness import Stack
from tests.integration.test_telemetry import create_key

WRONG = "Bearer cdt-000000000000-{:043d}"


def through(address: str) -> httpx.Client:
    """A client whose connections come from ``address`` (any 127.x.y.z is this machine)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


def clients_logged(stack: Stack, responses: list[httpx.Response]) -> list[str]:
    time.sleep(0.5)  # request lines are written every 0.1 s
    lines = {line["request_id"]: line for proc in stack.procs for line in proc.request_lines()}
    return [lines[r.headers["x-request-id"]]["client"] for r in responses]


def test_by_default_the_peer_is_the_client_whatever_x_forwarded_for_says(stack: Stack) -> None:
    stack.gateway(auth=True, auth_failures=3, auth_block_s=30)
    url = f"{stack.base_url}/v1/models"
    with through("127.0.0.1") as client:
        answers = [client.get(url, headers={"Authorization": WRONG.format(i), "X-Forwarded-For": f"198.51.100.{i}"})
                   for i in range(6)]
    assert [r.status_code for r in answers] == [401, 401, 429, 429, 429, 429]
    assert answers[-1].json()["error"]["code"] == "rate_limit_exceeded"
    assert clients_logged(stack, answers) == ["127.0.0.1"] * 6


def test_behind_a_trusted_proxy_each_client_has_its_own_failure_budget(stack: Stack) -> None:
    stack.gateway(auth=True, auth_failures=3, auth_block_s=30, trusted_proxies="127.0.0.2")
    fresh = create_key(stack, "never-used-before-the-flood")
    url = f"{stack.base_url}/v1/models"
    with through("127.0.0.2") as proxy:
        # What the proxy forwards: whatever the client sent, then the address it saw.
        flood = [proxy.get(url, headers={"Authorization": WRONG.format(i), "X-Forwarded-For": f"10.9.9.{i}, 203.0.113.7"})
                 for i in range(4)]
        assert [r.status_code for r in flood] == [401, 401, 429, 429]
        # Another client behind the same proxy is not locked out with it ...
        other = proxy.get(url, headers={"Authorization": f"Bearer {fresh}", "X-Forwarded-For": "203.0.113.8"})
        assert other.status_code == 200, other.text
        wrong = proxy.get(url, headers={"Authorization": WRONG.format(9), "X-Forwarded-For": "203.0.113.8"})
        assert wrong.status_code == 401
        # ... and the blocked one cannot become it by naming its address.
        spoof = proxy.get(url, headers={"Authorization": WRONG.format(10), "X-Forwarded-For": "203.0.113.8, 203.0.113.7"})
        assert spoof.status_code == 429
        # A proxy's own request (no header), and a malformed header: the proxy is the client.
        bare = proxy.get(url, headers={"Authorization": WRONG.format(11)})
        junk = proxy.get(url, headers={"Authorization": WRONG.format(12), "X-Forwarded-For": "203.0.113.7, ]junk["})
        assert (bare.status_code, junk.status_code) == (401, 401)
    with through("127.0.0.1") as direct:  # not a trusted proxy: its header is the client's own words
        direct_answer = direct.get(url, headers={"Authorization": WRONG.format(13), "X-Forwarded-For": "203.0.113.9"})
        assert direct_answer.status_code == 401
    assert clients_logged(stack, [flood[0], other, spoof, bare, junk, direct_answer]) == [
        "203.0.113.7", "203.0.113.8", "203.0.113.7", "127.0.0.2", "127.0.0.2", "127.0.0.1"]


def test_an_ipv6_client_is_its_64_for_the_failure_limit(stack: Stack) -> None:
    """One /64 is one client for the failure budget (it may rotate through its addresses); the
    request log still names each address."""
    stack.gateway(auth=True, auth_failures=3, auth_block_s=30, trusted_proxies="127.0.0.2")
    fresh = create_key(stack, "from-the-next-64")
    url = f"{stack.base_url}/v1/models"
    with through("127.0.0.2") as proxy:
        rotated = [proxy.get(url, headers={"Authorization": WRONG.format(i), "X-Forwarded-For": f"2001:db8:0:1::{i:x}"})
                   for i in range(1, 5)]
        assert [r.status_code for r in rotated] == [401, 401, 429, 429]
        neighbour = proxy.get(url, headers={"Authorization": f"Bearer {fresh}",
                                            "X-Forwarded-For": "2001:db8:0:1:ffff:ffff:ffff:ffff"})
        assert neighbour.status_code == 429  # a key this gateway has not verified waits out the block
        other = proxy.get(url, headers={"Authorization": f"Bearer {fresh}", "X-Forwarded-For": "2001:db8:0:2::1"})
        assert other.status_code == 200, other.text
    assert clients_logged(stack, [*rotated[:2], other]) == ["2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:2::1"]
