"""A serverless upstream's wake state (engines/upstream_wake.py), on a clock of the test's own:
cold at start and after idling, warm after an answer, and which failures mean "not up yet".
tests/integration/test_upstream_serverless.py runs it against a scripted serverless endpoint."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from engines.backend import JobRejected
from engines.cli import build_parser, upstream_settings
from engines.contract.messages import Job
from engines.upstream import UpstreamBackend, UpstreamSettings
from engines.upstream_http import HttpxTransport
from engines.upstream_wake import PAUSE_CAP_S, Wake
from tests.unit.test_upstream import Out


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
    w, clock, _ = wake(idle_s=60)
    w.answered()
    clock.now += 120
    assert w.expire(busy=True) == 60 and not w.cold  # a long stream is still an answer
    assert w.expire(busy=False) == 60 and w.cold


def test_not_up_yet_is_a_503_or_429_and_a_warm_endpoint_refusing_so_past_its_retries_goes_cold() -> None:
    w, _, flips = wake()
    assert w.not_up_yet(unavailable(503), 0, 3) and w.not_up_yet(unavailable(429), 0, 3)
    assert not w.not_up_yet(unavailable(502), 0, 3)  # a 5xx page is a failure, not a sleeping endpoint
    w.answered()
    assert not w.not_up_yet(unavailable(502), 3, 3) and not w.cold
    # Warm, a 429 is a rate limit (retried as any, then 429 to the client), never a sleeping endpoint;
    # a 503 is an ordinary failure for the retries, and only past them a sign it scaled down under us.
    assert not w.not_up_yet(unavailable(429), 3, 3) and not w.cold
    assert not w.not_up_yet(unavailable(503), 2, 3) and not w.cold
    assert w.not_up_yet(unavailable(503), 3, 3)
    assert w.cold and flips == [False, True]  # announced cold again


def test_a_wake_waits_its_window_with_pauses_capped() -> None:
    w, _, _ = wake(cold_start_s=30)
    assert w.window(10.0) == 40.0
    pauses = [w.pause(attempt, 0.5, None) for attempt in range(12)]
    assert all(0 < p <= PAUSE_CAP_S for p in pauses) and max(pauses) > 2
    assert w.pause(0, 0.5, 120.0) == PAUSE_CAP_S  # a Retry-After past the cap: asked again sooner
    assert w.pause(0, 0.5, 1.5) == 1.5


# ---- the upstream engine's tries while its endpoint sleeps (httpx's MockTransport, no server) ----


def backend(answers: list[int], **settings: Any) -> tuple[UpstreamBackend, list[int]]:
    """An upstream backend whose endpoint answers each request with the next status of ``answers``
    (200: one streamed chunk and [DONE]); the statuses it gave are recorded."""
    given: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        status = answers.pop(0)
        given.append(status)
        if status == 0:
            raise httpx.ConnectError("refused", request=request)
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "no workers"}})
        text = (
            'data: {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
        )
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    b = UpstreamBackend(UpstreamSettings(base_url="http://up/v1", served_names=["m"], backoff_s=0.01, **settings))
    client = HttpxTransport(b.settings)  # the --upstream-http2 transport, its httpx client on the mock
    client._client = httpx.AsyncClient(base_url="http://up/v1", transport=httpx.MockTransport(answer))
    b.client = client
    return b, given


def job(deadline_s: float = 30) -> Job:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    return Job(
        id="j", kind="chat", model="m", body=body, reply_to="r", deadline_ms=int((time.time() + deadline_s) * 1000)
    )


async def test_a_sleeping_endpoint_is_tried_past_the_retries_until_it_answers_then_announced_warm() -> None:
    b, given = backend([0, 503, 429, 0, 503, 200], serverless=True, retries=1)
    flips: list[list[str]] = []
    b.on_cold = lambda: flips.append(b.cold_models)
    assert b.cold_models == ["m"]
    out = Out()
    await b.run(job(), out)
    assert given == [0, 503, 429, 0, 503, 200] and out.usage is not None
    assert b.cold_models == [] and flips == [[]]


async def test_a_warm_endpoint_keeps_its_retries_and_one_that_never_wakes_fails_at_its_window() -> None:
    b, given = backend([200, 502, 502, 502], serverless=True, retries=1)
    await b.run(job(), Out())
    with pytest.raises(JobRejected) as failed:
        await b.run(job(), Out())
    assert given == [200, 502, 502] and failed.value.status == 502  # not "not up yet": retries as before
    b, _ = backend([503] * 1000, serverless=True, cold_start_s=0.3)
    started = time.monotonic()
    with pytest.raises(JobRejected) as failed:
        await b.run(job(), Out())
    assert failed.value.status == 503 and failed.value.code == "model_unavailable"
    assert "did not wake within 0.3 s" in failed.value.message and failed.value.retry_after_s >= 1
    assert time.monotonic() - started < 1


async def test_without_serverless_nothing_changes() -> None:
    b, given = backend([503, 503, 503], retries=2)
    assert b.cold_models == []
    with pytest.raises(JobRejected) as failed:
        await b.run(job(), Out())
    assert given == [503, 503, 503] and "unavailable" in failed.value.message


def test_the_flags_make_the_settings() -> None:
    base = ["serve", "--kind", "upstream", "--served-name", "m", "--base-url", "https://up/v1"]
    s = upstream_settings(build_parser().parse_args(base))
    assert (s.serverless, s.cold_start_s, s.idle_s) == (False, 300, 300)
    s = upstream_settings(
        build_parser().parse_args(
            [*base, "--upstream-serverless", "--upstream-cold-start-s", "90", "--upstream-idle-s", "600"]
        )
    )
    assert (s.serverless, s.cold_start_s, s.idle_s) == (True, 90, 600)
    auto = ["serve", "--kind", "upstream", "--models", "auto", "--base-url", "https://up/v1", "--upstream-serverless"]
    with pytest.raises(ValueError, match="needs --served-name"):
        upstream_settings(build_parser().parse_args(auto))
