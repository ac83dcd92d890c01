"""The failed-authentication limiter: its bounded memory and who counts as one client (no I/O)."""

from __future__ import annotations

import pytest

from gateway.tenancy import failures
from gateway.tenancy.failures import FailureLimiter, client_of


class Clock:
    """``time.monotonic`` for the limiter, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(failures, "time", clock)
    return clock


def test_failure_limiter_blocks_an_address_past_its_limit_only() -> None:
    lim = FailureLimiter(limit=3, window_s=60, block_s=30)
    for _ in range(2):
        lim.failed("a")
    assert lim.admit("a") == 0 and lim.blocked("a") == 0
    lim.begin("a")  # a check under way counts against the budget
    assert lim.admit("a") > 0
    lim.end("a")
    lim.failed("a")
    assert 29 < lim.blocked("a") <= 30 and lim.admit("a") > 0
    assert lim.admit("b") == 0


def test_a_flood_of_distinct_addresses_inside_one_window_is_bounded() -> None:
    # Pruned only when full and then only of stale entries, the limiter once kept every address
    # that failed inside the window: 5,000 of 5,000 here, and as many as a flood brought.
    lim = FailureLimiter(limit=3, window_s=60, block_s=30, max_tracked=1000, max_blocked=1000)
    for i in range(5000):  # one failure each: none blocked, all inside the window
        lim.failed(f"198.51.{i // 256}.{i % 256}")
    assert len(lim) == 1000
    for i in range(5000):  # each past the limit: blocked
        for _ in range(3):
            lim.failed(f"203.{i // 256}.{i % 256}.1")
    assert len(lim) <= 2000
    assert lim.blocked("203.19.135.1") > 0  # the last one blocked is


def test_the_client_whose_last_failure_is_oldest_is_forgotten_first() -> None:
    lim = FailureLimiter(limit=3, window_s=60, block_s=30, max_tracked=3)
    lim.failed("10.0.0.1")
    lim.failed("10.0.0.2")
    lim.failed("10.0.0.3")
    lim.failed("10.0.0.1")  # .1 failed most recently now: .2 is the oldest
    lim.failed("10.0.0.4")
    lim.failed("10.0.0.1")
    assert lim.blocked("10.0.0.1") > 0  # three failures remembered
    lim.failed("10.0.0.2")
    lim.failed("10.0.0.2")
    assert lim.blocked("10.0.0.2") == 0  # its first failure was forgotten


def test_a_flood_that_blocks_nobody_never_lifts_a_block() -> None:
    lim = FailureLimiter(limit=3, window_s=60, block_s=30, max_tracked=10, max_blocked=10)
    for _ in range(3):
        lim.failed("192.0.2.7")
    for i in range(10_000):
        lim.failed(f"2001:db8:{i:x}::1")  # 10,000 /64s, one failure each
    assert lim.blocked("192.0.2.7") > 0


def test_past_max_blocked_the_block_that_ends_first_is_lifted(clock: Clock) -> None:
    lim = FailureLimiter(limit=1, window_s=60, block_s=30, max_blocked=2)
    for addr in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        lim.failed(addr)
        clock.now += 1
    assert [lim.blocked(a) for a in ("192.0.2.1", "192.0.2.2", "192.0.2.3")] == [0, 28, 29]
    lim.failed("192.0.2.2")  # blocked again: its block now ends last
    lim.failed("192.0.2.4")
    assert [lim.blocked(a) for a in ("192.0.2.2", "192.0.2.3", "192.0.2.4")] == [30, 0, 30]


def test_prune_forgets_quiet_clients_and_ended_blocks(clock: Clock) -> None:
    lim = FailureLimiter(limit=2, window_s=60, block_s=30)
    lim.failed("192.0.2.1")
    lim.failed("192.0.2.2")
    lim.failed("192.0.2.2")
    clock.now += 31
    lim.failed("192.0.2.3")
    lim.prune()
    assert len(lim) == 2  # .1 and .3: in the window; .2's block ended
    clock.now += 30
    lim.prune()
    assert len(lim) == 1  # .3


def test_an_ipv6_client_is_limited_per_64() -> None:
    lim = FailureLimiter(limit=3, window_s=60, block_s=30)
    for addr in ("2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:1:ffff:ffff:ffff:ffff"):  # one /64
        lim.failed(addr)
    assert lim.blocked("2001:db8:0:1::abcd") > 0
    assert lim.blocked("2001:db8:0:2::1") == 0  # the next /64 is another client
    lim.begin("2001:db8:0:2::1")
    lim.end("2001:db8:0:2::2")  # the same client: its check ended


def test_an_ipv4_mapped_address_is_its_ipv4_address() -> None:
    lim = FailureLimiter(limit=2, window_s=60, block_s=30)
    lim.failed("::ffff:192.0.2.1")
    lim.failed("192.0.2.1")
    assert lim.blocked("192.0.2.1") > 0 and lim.blocked("::ffff:c000:201") > 0


@pytest.mark.parametrize(("addr", "client"), [
    ("192.0.2.1", "192.0.2.1"), ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"), ("2001:db8::", "2001:db8::/64"),
    ("::ffff:198.51.100.9", "198.51.100.9"), ("fe80::1%eth0", "fe80::/64"), ("::1", "::/64"),
    ("", ""), ("unix:socket", "unix:socket")])
def test_who_counts_as_one_client(addr: str, client: str) -> None:
    assert client_of(addr) == client


@pytest.mark.parametrize(("addr", "client"), [
    ("64:ff9b::192.0.2.1", "192.0.2.1"), ("64:ff9b::c633:6409", "198.51.100.9"),
    # Outside the well-known /96: an IPv6 /64 as ever.
    ("64:ff9b::1:c000:201", "64:ff9b::/64"), ("64:ff9b:1::c000:201", "64:ff9b:1::/64")])
def test_a_nat64_address_is_the_ipv4_client_it_carries(addr: str, client: str) -> None:
    assert client_of(addr) == client
    lim = FailureLimiter(limit=1, window_s=60, block_s=30)
    lim.failed("64:ff9b::192.0.2.1")
    assert lim.blocked("192.0.2.1") > 0 and lim.blocked("64:ff9b::198.51.100.9") == 0
