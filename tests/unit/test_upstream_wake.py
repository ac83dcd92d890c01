"""A serverless upstream's wake state (engines/upstream_wake.py), on a clock of the test's own:
cold at start and after idling, warm after an answer, and which failures mean "not up yet".
tests/integration/test_upstream_serverless.py runs it against a scripted serverless endpoint."""

from __future__ import annotations

from engines.backend import JobRejected
from engines.upstream_wake import PAUSE_CAP_S, Wake


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def wake(cold_start_s: float = 300, idle_s: float = 60) -> tuple[Wake, Clock, list[bool]]:
    clock = Clock()
    w = Wake(cold_start_s, idle_s, clock=clock)
    flips: list[bool] = []
    w.on_change = lambda: flips.append(w.cold)
    return w, clock, flips


def unavailable(status: int) -> JobRejected:
    return JobRejected("x", status=status, code="model_unavailable", type="server_error")


def test_cold_at_start_warm_after_an_answer_cold_again_after_idling() -> None:
    w, clock, flips = wake(idle_s=60)
    assert w.cold and flips == []  # announced cold from the first beat: nothing to flip
    w.answered()
    assert not w.cold and flips == [False]
    w.answered()  # no flip, no announcement
    assert flips == [False]
    clock.now += 59
    assert w.expire(busy=False) == 1 and not w.cold
    clock.now += 2
    assert w.expire(busy=False) == 60 and w.cold and flips == [False, True]


def test_an_answer_in_flight_keeps_it_warm() -> None:
    w, clock, flips = wake(idle_s=60)
    w.answered()
    clock.now += 120
    assert w.expire(busy=True) == 60 and not w.cold  # a long stream is still an answer
    assert w.expire(busy=False) == 60 and w.cold


def test_not_up_yet_is_a_503_or_429_and_a_warm_endpoint_refusing_so_goes_cold() -> None:
    w, _, flips = wake()
    assert w.not_up_yet(unavailable(503)) and w.not_up_yet(unavailable(429))
    assert not w.not_up_yet(unavailable(502))  # a 5xx page is a failure, not a sleeping endpoint
    w.answered()
    assert not w.not_up_yet(unavailable(502)) and not w.cold
    assert w.not_up_yet(unavailable(503))
    assert w.cold and flips == [False, True]  # scaled down under us: announced cold again


def test_a_wake_waits_its_window_with_pauses_capped() -> None:
    w, _, _ = wake(cold_start_s=30)
    assert w.window(10.0) == 40.0
    pauses = [w.pause(attempt, 0.5, None) for attempt in range(12)]
    assert all(0 < p <= PAUSE_CAP_S for p in pauses) and max(pauses) > 2
    assert w.pause(0, 0.5, 120.0) == PAUSE_CAP_S  # a Retry-After past the cap: asked again sooner
    assert w.pause(0, 0.5, 1.5) == 1.5
