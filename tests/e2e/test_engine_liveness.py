"""No request takes a model offline: while the largest job the bounds allow runs on the real vLLM
engine, other requests keep getting 200s, the model never leaves ``/v1/models``, and the big
job's client hanging up stops it within a second.

The largest jobs at the door (``gateway.common.bounds``): ``n`` x (1 + logprob candidates) at most
``max_step_candidates`` (256) per engine step, ``n`` at most half the engine's batch (the tiny
engine runs 128 sequences), each choice running to the context (1024 here).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import MODEL, VllmStack
from tests.e2e.test_chat import _metric

#: (n, top_logprobs): 64 x (1 + 3) and 12 x (1 + 20) candidates a step, the most the bounds allow.
LARGEST = [(64, 3), (12, 20)]


class Probe:
    """Small requests every 0.3 s and ``/v1/models`` every 0.2 s, in threads, until stopped."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.stop = threading.Event()
        self.answers: list[tuple[int, float]] = []
        self.listed: list[bool] = []
        self._threads = [threading.Thread(target=self._chat, daemon=True),
                         threading.Thread(target=self._models, daemon=True)]

    def __enter__(self) -> Probe:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _chat(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        with httpx.Client(timeout=110) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    status = client.post(f"{self.base_url}/v1/chat/completions", json=body).status_code
                except httpx.TimeoutException:
                    status = 0
                self.answers.append((status, time.monotonic() - started))
                self.stop.wait(0.3)

    def _models(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                data = client.get(f"{self.base_url}/v1/models").json()["data"]
                self.listed.append(MODEL in {m["id"] for m in data})
                self.stop.wait(0.2)


def _aborted_within(vllm_stack: VllmStack, before: float, hung_up: float) -> float:
    """Seconds from the hang-up until the engine aborted the job in vLLM (its counter moved)."""
    deadline = hung_up + 30
    while time.monotonic() < deadline:
        if _metric(vllm_stack, "conduit_engine_backend_aborted_requests_total") > before:
            return time.monotonic() - hung_up
        time.sleep(0.02)
    pytest.fail("the engine never aborted the job")


@pytest.mark.parametrize(("stream", "shape"), [(True, LARGEST[0]), (False, LARGEST[1])])
def test_the_largest_job_allowed_takes_no_model_offline(vllm_stack: VllmStack, stream: bool,
                                                        shape: tuple[int, int]) -> None:
    n, top = shape
    big: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": n,
                           "logprobs": True, "top_logprobs": top, "ignore_eos": True, "stream": stream}
    url = f"{vllm_stack.base_url}/v1/chat/completions"
    aborted = _metric(vllm_stack, "conduit_engine_backend_aborted_requests_total")
    with Probe(vllm_stack.base_url) as probe:
        time.sleep(1)
        # Hang up 5 s in: the job (every choice runs to the 1,024-token context) is far from done.
        if stream:
            with httpx.stream("POST", url, json=big, timeout=60) as r:
                assert r.status_code == 200, r.read()
                until = time.monotonic() + 5
                for _ in r.iter_bytes():
                    if time.monotonic() > until:
                        break
                assert _metric(vllm_stack, "conduit_engine_backend_unfinished_requests") >= 1
            hung_up = time.monotonic()
        else:
            with ThreadPoolExecutor(1) as pool:
                collected = pool.submit(httpx.post, url, json=big, timeout=5)
                time.sleep(4.5)
                assert _metric(vllm_stack, "conduit_engine_backend_unfinished_requests") >= 1
                with pytest.raises(httpx.ReadTimeout):
                    collected.result()
            hung_up = time.monotonic()
        took = _aborted_within(vllm_stack, aborted, hung_up)
        time.sleep(1)
    latencies = sorted(t for _, t in probe.answers)
    print(f"\n{'stream' if stream else 'collect'} n={n} top_logprobs={top}: abort {took * 1000:.0f} ms after the "
          f"hang-up; {len(latencies)} other requests, p50 {latencies[len(latencies) // 2]:.2f}s max "
          f"{latencies[-1]:.2f}s; listed {sum(probe.listed)}/{len(probe.listed)}")
    assert took < 1.0, f"the hang-up was acted on {took:.2f}s late"
    assert all(probe.listed) and len(probe.listed) > 20, probe.listed
    statuses = [s for s, _ in probe.answers]
    assert statuses and set(statuses) == {200}, probe.answers
    assert max(t for _, t in probe.answers) < 10, probe.answers
    # vLLM holds nothing of it any more.
    deadline = time.monotonic() + 10
    while _metric(vllm_stack, "conduit_engine_backend_unfinished_requests") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(vllm_stack, "conduit_engine_backend_unfinished_requests") == 0
