"""``Idempotency-Key`` takeovers: a claim whose gateway stopped refreshing it is taken over by a
retry, and never while the first request's job can still run.

The gateways' Redis connections stall (a proxy that stops carrying bytes), Redis itself stops
(SIGSTOP), or a gateway dies (kill -9), each for longer than the claim's lease; a synthetic
engine's ``conduit_engine_jobs_in_flight`` is sampled throughout: it never shows two jobs.
The last tests drive the claim store's scripts directly on a real Redis.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from engines.contract.keys import FENCED, Keys
from engines.contract.lane import connect
from engines.contract.messages import Job
from gateway.settings import IdempotencySettings
from gateway.tenancy.claims import ABANDONED, HELD, LAPSED, ClaimStore
from gateway.tenancy.idempotency import IdempotencyMiddleware, fingerprint
from tests.cluster import LocalCluster
from tests.harness import Proc, RedisServer, Stack, free_port
from tests.integration.test_idempotency import (
    CHAT,
    Counter,
    call,
    post,
    settle,
    wait_until,
)
from tests.proxy import FlakyProxy

_IN_FLIGHT = re.compile(r"^conduit_engine_jobs_in_flight(?:\{[^}]*\})? ([\d.e+]+)$", re.MULTILINE)


class InFlight:
    """The most jobs an engine ran at once while this was open (its metrics, sampled every 20 ms)."""

    def __init__(self, metrics_port: int) -> None:
        self.port = metrics_port
        self.url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.most = 0.0
        self.now = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(0.02):
                self.now = sum(float(v) for v in _IN_FLIGHT.findall(client.get(self.url).text))
                self.most = max(self.most, self.now)

    def __enter__(self) -> InFlight:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def engine(stack: Stack, tokens: int = 60) -> int:
    """A synthetic engine whose answers take ``tokens`` tenths of a second, once every gateway lists
    it (``wait_for_model`` waits only for those on the stack's Redis, not for one behind the proxy:
    a request sent there first could find no engine and never queue its job); its metrics port."""
    metrics_port = free_port()
    stack.synthetic("synthetic", "--tokens", str(tokens), "--token-delay", "0.1", "--metrics-port", str(metrics_port))
    for url, _, gateway in stack.gateways:
        if gateway.alive():
            wait_until(lambda url=url: "synthetic" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]],
                       f"the gateway at {url} never listed the engine")
    return metrics_port


def gateways(stack: Stack, first_redis_url: str | None = None) -> tuple[Proc, str]:
    """Two gateways whose claims lease for 1 s: the first's process and URL (the second's is
    ``stack.base_url``)."""
    first = stack.gateway(redis_url=first_redis_url, idempotency_lease_s=1)
    url = stack.base_url
    stack.gateway(idempotency_lease_s=1)
    return first, url


@contextmanager
def first_running(stack: Stack, url: str, key: str) -> Iterator[tuple[InFlight, cf.Future[httpx.Response],
                                                                     cf.ThreadPoolExecutor]]:
    """A request sent to ``url`` with ``key``, once its job runs on a new engine: the engine's
    jobs in flight, the response to come, and a pool for another request."""
    with InFlight(engine(stack)) as jobs, cf.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, url, key)
        wait_until(lambda: jobs.now == 1, "the first request's job never ran")
        yield jobs, first, pool


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FlakyProxy]:
    p = FlakyProxy(redis_server.port)
    yield p
    p.resume()
    p.close()


def test_an_owner_cut_off_from_redis_past_its_lease_lets_no_second_generation_start(
        stack: Stack, proxy: FlakyProxy) -> None:
    """The first request's gateway loses Redis (its connections hang) while its job runs: the retry
    on another gateway waits out the lease and a grace, cancels the orphaned job, and runs once
    the job is gone; the first, back, finds its claim taken (409 ``idempotency_key_in_use``)."""
    _, cut_off = gateways(stack, proxy.url)
    with first_running(stack, cut_off, "cut-off") as (jobs, first, _):
        proxy.stall()
        retry = post(stack.base_url, "cut-off")
        proxy.resume()
        lost = first.result()
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers, retry.text
    assert jobs.most == 1
    assert lost.status_code == 409 and lost.json()["error"]["code"] == "idempotency_key_in_use", lost.text
    assert settle(jobs.port, 1) == {"cancelled": 1, "ok": 1}
    assert post(stack.base_url, "cut-off").content == retry.content


def test_a_job_queued_after_its_claim_was_taken_over_never_runs(stack: Stack, proxy: FlakyProxy) -> None:
    """The first request's gateway stalls between naming its job in the claim and queueing it: the
    retry takes the claim over and makes sure that job id can no longer be queued; the job, sent
    when the connection is back, runs nowhere."""
    _, cut_off = gateways(stack, proxy.url)
    metrics_port = engine(stack, tokens=10)
    body = {**CHAT, "messages": [{"role": "user", "content": "held-at-its-submission"}]}
    proxy.stall_on(b"held-at-its-submission")  # only the job carries the prompt
    with cf.ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, cut_off, "unqueued", body)
        wait_until(lambda: proxy.stalled, "the first request never queued its job")
        retry = post(stack.base_url, "unqueued", body)
        proxy.resume()
        lost = first.result()
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers, retry.text
    assert lost.status_code == 409 and lost.json()["error"]["code"] == "idempotency_key_in_use", lost.text
    assert settle(metrics_port, 1) == {"ok": 1}


def test_a_redis_pause_longer_than_the_lease_starts_no_second_generation(tmp_path: Path) -> None:
    """Redis stops (SIGSTOP) for more than a lease while a request runs and its retry arrives: once
    Redis is back the first gateway's refresh renews the claim, the retry waits, and gets the answer."""
    server = RedisServer(tmp_path / "redis")
    stack = Stack(server.url, tmp_path)
    try:
        _, first_url = gateways(stack)
        with first_running(stack, first_url, "paused") as (jobs, first, pool):
            server.proc.send_signal(signal.SIGSTOP)
            try:
                retry = pool.submit(post, stack.base_url, "paused")
                time.sleep(2.5)  # the fault: Redis away for 2.5 leases
            finally:
                server.proc.send_signal(signal.SIGCONT)
            a, b = first.result(), retry.result()
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert a.content == b.content and b.headers["idempotent-replayed"] == "true"
        assert jobs.most == 1
        assert settle(jobs.port, 1) == {"ok": 1}
    finally:
        stack.stop()
        server.stop()


def test_a_dead_gateways_claim_is_taken_over_and_its_job_cancelled(stack: Stack) -> None:
    """The first gateway is killed (-9) mid-request: once its lease and a grace passed, the retry
    cancels the orphaned job, and runs when the engine has let it go."""
    doomed, doomed_url = gateways(stack)
    with first_running(stack, doomed_url, "orphan") as (jobs, lost, _):
        doomed.kill()
        with pytest.raises(httpx.TransportError):
            lost.result()
        r = post(stack.base_url, "orphan")
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers, r.text
    assert jobs.most == 1
    assert post(stack.base_url, "orphan").headers["idempotent-replayed"] == "true"
    assert settle(jobs.port, 1) == {"cancelled": 1, "ok": 1}


# ---- the claim store alone: a real Redis, a lease of 0.2 s ---------------------------------


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def store() -> ClaimStore:
    return ClaimStore(Keys(f"t{uuid.uuid4().hex[:8]}"), lease_s=0.2, ttl_s=60)


async def look_until(store: ClaimStore, redis_client: aioredis.Redis, key: str, what: int) -> list[int]:
    """A retry's looks at ``key`` (as often as a waiting one's) until one finds ``what``: what each found."""
    seen: list[int] = []
    while not seen or seen[-1] != what:
        found = await store.claim(redis_client, key, "retry", FP, False)
        assert found is not None and len(seen) < 200, seen
        seen.append(found.what)
        await asyncio.sleep(store.grace_ms / 4000)
    return seen


def job(model: str = "m") -> Job:
    return Job(id=f"chatcmpl-{uuid.uuid4().hex}", kind="chat", model=model, body=b"", reply_to="r",
               deadline_ms=int(time.time() * 1000) + 60_000)


FP = b"\x01" * 32


async def claimed(store: ClaimStore, redis_client: aioredis.Redis, name: str, bound: Job | None = None) -> str:
    """A key claimed by "first", its job ``bound`` named in the claim (its key not set: not queued yet)."""
    key = store.keys.idempotency("k", name)
    assert await store.claim(redis_client, key, "first", FP, False) is None
    if bound is not None:
        assert await store.bind(redis_client, key, "first", bound)
    return key


async def test_a_claim_that_named_no_job_lapses_with_its_lease(redis_client: aioredis.Redis,
                                                               store: ClaimStore) -> None:
    """Its owner queued nothing and can no longer (its binding is refused): nothing to wait for."""
    key = await claimed(store, redis_client, "unbound")
    seen: list[int] = []
    while (found := await store.claim(redis_client, key, "retry", FP, False)) is not None:
        seen.append(found.what)
        assert len(seen) < 200, seen
        await asyncio.sleep(store.grace_ms / 4000)
    assert seen and seen[0] == HELD and ABANDONED not in seen
    assert not await store.bind(redis_client, key, "first", job())


async def test_a_lapsed_claim_is_abandoned_only_after_a_grace_under_watch(redis_client: aioredis.Redis,
                                                                           store: ClaimStore) -> None:
    key = await claimed(store, redis_client, "lapsed", job())
    seen = await look_until(store, redis_client, key, ABANDONED)
    assert seen[0] == HELD and LAPSED in seen  # held, then watched while lapsed, then abandoned
    assert seen.index(ABANDONED) > seen.index(LAPSED) + 2  # several looks into the grace


async def test_a_renewal_ends_the_watch_and_a_gap_in_it_starts_the_grace_again(redis_client: aioredis.Redis,
                                                                              store: ClaimStore) -> None:
    key = await claimed(store, redis_client, "renewed", job())
    await look_until(store, redis_client, key, LAPSED)
    assert await store.renew(redis_client, key, "first")
    found = await store.claim(redis_client, key, "retry", FP, False)
    assert found is not None and found.what == HELD
    await look_until(store, redis_client, key, LAPSED)
    # No look for longer than a grace (as across a Redis pause): the next starts the grace again.
    await asyncio.sleep(store.grace_ms * 1.5 / 1000)
    found = await store.claim(redis_client, key, "retry", FP, False)
    assert found is not None and found.what == LAPSED


async def test_a_takeover_waits_for_the_job_and_fences_it(redis_client: aioredis.Redis, store: ClaimStore) -> None:
    await takeover_waits_for_the_job_and_fences_it(redis_client, store)


async def test_a_takeover_on_a_cluster(redis_cluster: LocalCluster, store: ClaimStore) -> None:
    """The claim's scripts run in its API key's slot, the fence in the job's model's (another
    master here): each script touches one key."""
    client = connect(redis_cluster.conduit_url)
    try:
        assert (redis_cluster.master_for_key(store.keys.idempotency("k", "fenced")).port
                != redis_cluster.master_for_key(store.keys.jobs("beta3")).port)
        await takeover_waits_for_the_job_and_fences_it(client, store, model="beta3")
    finally:
        await client.aclose()


async def takeover_waits_for_the_job_and_fences_it(redis_client: Any, store: ClaimStore, model: str = "m") -> None:
    first = job(model)
    key = await claimed(store, redis_client, "fenced", first)
    job_key = store.keys.job(first.model, first.id)
    await redis_client.set(job_key, b"q")  # queued (as the submit script marks it)
    await look_until(store, redis_client, key, ABANDONED)
    found = await store.claim(redis_client, key, "retry", FP, False)
    assert found is not None and found.what == ABANDONED and found.job == first.id
    assert not await store.fence(redis_client, found, cancel=True)  # the job may run: no takeover
    assert await redis_client.get(job_key) == b"q"
    await redis_client.delete(job_key)  # acked
    assert await store.fence(redis_client, found, cancel=True)
    assert await redis_client.get(job_key) == FENCED  # a late submission of that id queues nothing
    assert await store.claim(redis_client, key, "retry", FP, False, takeover=found) is None
    assert not await store.bind(redis_client, key, "first", job(model))  # the first's next job is refused
    assert not await store.renew(redis_client, key, "first")


async def test_a_claim_that_changed_since_it_was_found_abandoned_is_not_taken(redis_client: aioredis.Redis,
                                                                             store: ClaimStore) -> None:
    key = await claimed(store, redis_client, "changed", job())
    await look_until(store, redis_client, key, ABANDONED)
    found = await store.claim(redis_client, key, "retry", FP, False)
    assert found is not None and found.what == ABANDONED
    assert await store.fence(redis_client, found, cancel=False)  # its job never queued: fenced
    assert await store.bind(redis_client, key, "first", job())  # the first queues another one meanwhile
    again = await store.claim(redis_client, key, "retry", FP, False, takeover=found)
    assert again is not None and again.what == HELD and again.job != found.job


async def test_a_streaming_retry_waits_for_an_abandoned_claim_and_takes_it_over(redis_client: aioredis.Redis,
                                                                               store: ClaimStore) -> None:
    """A stream cannot wait for another's answer (409 while the holder renews), but it waits out an
    abandoned claim: its holder is gone, and the stream runs once the holder's job is fenced."""
    body = b'{"model": "m", "stream": true}'
    key = store.keys.idempotency("", hashlib.sha256(b"k").hexdigest())
    first = job()
    assert await store.claim(redis_client, key, "first", fingerprint("POST", "/v1/chat/completions", body), True) is None
    assert await store.bind(redis_client, key, "first", first)
    inner = Counter()
    app = IdempotencyMiddleware(inner, IdempotencySettings(idempotency_lease_s=0.2), lambda: redis_client,
                                keys=store.keys, max_body_bytes=1024, request_timeout_s=60)
    status, _, answer = await call(app, b"k", None, body)
    assert status == 409 and b"idempotency_key_in_use" in answer and inner.calls == 0  # held: a fresh lease
    await look_until(store, redis_client, key, LAPSED)  # the holder never renews: its lease lapsed
    status, _, _ = await call(app, b"k", None, body)
    assert status == 200 and inner.calls == 1
    assert await redis_client.get(store.keys.job(first.model, first.id)) == FENCED
