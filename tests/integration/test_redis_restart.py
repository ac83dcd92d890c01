"""Redis restarting (without persistence) is survived: engines rejoin, gateways recover."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import pytest
import redis

from engines.contract.keys import Keys
from engines.contract.replies import GONE, generation_key
from gateway.stack import start_redis
from tests.harness import REDIS_USERS, RedisServer, Stack, free_port, redis_user_args

CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_stack_recovers_after_redis_restarts(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    stack = Stack(server.url, tmp_path)
    try:
        stack.gateway()
        stack.synthetic()
        assert httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200

        server.restart()  # every key, stream, group and script is gone

        # Engines re-register and rejoin their groups, the gateway reloads its script:
        # requests succeed again within a few seconds, without restarting anything.
        deadline = time.monotonic() + 20
        statuses = []
        while time.monotonic() < deadline:
            r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=10)
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code in (503, 502), r.text  # unavailable meanwhile, never a 500
            time.sleep(0.2)
        assert statuses[-1] == 200, statuses
        assert r.json()["choices"][0]["message"]["content"] == "tok tok "
    finally:
        stack.stop()
        server.stop()


def test_an_engine_started_before_redis_waits_for_it(tmp_path: Path) -> None:
    """An engine whose Redis is not up yet (containers start in any order; Redis restarting)
    keeps its loaded model and joins once Redis answers, instead of exiting."""
    port, metrics = free_port(), free_port()
    url = f"redis://127.0.0.1:{port}/0"
    stack = Stack(url, tmp_path)
    redis = None
    try:
        # --stall-s 1: waiting for Redis (or loading a model) is not a stalled event loop.
        engine = stack.synthetic("synthetic", "--metrics-port", str(metrics), "--stall-s", "1", wait=False)
        time.sleep(3)
        assert engine.alive(), engine.output()[-2000:]
        assert "not reachable" in engine.output()
        # Alive, not ready: probes (Kubernetes, compose) tell a waiting engine from a serving one.
        assert httpx.get(f"http://127.0.0.1:{metrics}/health").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{metrics}/ready").status_code == 503
        redis = start_redis(port, tmp_path / "redis", redis_user_args() if REDIS_USERS else ())
        stack.gateway()
        stack.wait_for_model("synthetic", engine, timeout=20)
        assert httpx.get(f"http://127.0.0.1:{metrics}/ready").status_code == 200
        assert httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
        assert "took no turn" not in engine.output()
    finally:
        stack.stop()
        if redis is not None:
            redis.terminate()
            redis.wait(timeout=10)


def wait_for(predicate: Callable[[], object], timeout: float) -> object:
    """``predicate()`` once it is truthy, else its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def test_a_stream_open_across_a_redis_restart_ends_complete(tmp_path: Path) -> None:
    """Redis restarts without persistence mid-answer while the stream's gateway is frozen (SIGSTOP),
    so the engine writes the next events before the gateway could re-create its reply stream or look
    for the job's key: the engine re-creates the stream with the expiry it had and restores the job's
    key (with a lease it renews while it runs the job), and the client gets every token once and no
    error, however long the gateway stayed frozen."""
    redis_server = RedisServer(tmp_path / "redis")
    stack = Stack(redis_server.url, tmp_path)
    keys = Keys(stack.prefix)
    numbers: list[int] = []
    errors: list[object] = []
    done = False
    try:
        gateway = stack.gateway()
        # 60 tokens 0.1 s apart: the job outlives the restart and the gateway's freeze by seconds.
        stack.synthetic("synthetic", "--numbered", "--tokens", "60", "--token-delay", "0.1")
        body = {**CHAT, "max_tokens": 60, "stream": True}
        with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=30) as r, \
                redis.Redis.from_url(redis_server.url) as client:
            assert r.status_code == 200
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    numbers += [int(t) for c in event["choices"] for t in (c["delta"].get("content") or "").split()]
                if len(numbers) >= 5:
                    break
            gateway.proc.send_signal(signal.SIGSTOP)
            try:
                redis_server.restart()
                # Only the engine can make these while the gateway is frozen.
                stream = wait_for(lambda: next(client.scan_iter(match=f"{keys.prefix}:replies:*}}"), None), 10)
                stream_ttl = client.pttl(stream) if stream else None
                job_key = wait_for(lambda: next(client.scan_iter(match=keys.job("synthetic", "*")), None), 10)
                job_ttl = client.pttl(job_key) if job_key else None
            finally:
                gateway.proc.send_signal(signal.SIGCONT)
            for line in lines:
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        errors.append(event["error"])
                    for c in event.get("choices", []):
                        numbers += [int(t) for t in (c["delta"].get("content") or "").split()]
        assert not errors, errors
        assert numbers == list(range(60)) and done, numbers
        assert stream is not None, "the engine did not re-create the reply stream"
        assert 0 < stream_ttl <= 60_000, stream_ttl  # type: ignore[operator]
        assert job_key is not None, "the engine did not restore the job's key"
        assert 0 < job_ttl <= 5_000, job_ttl  # type: ignore[operator]  # the engine's lease, not the deadline
    finally:
        stack.stop()
        redis_server.stop()


# ---- what an engine does when Redis lost a key it writes to (played here by deleting the key) ----

def engine_and_job(stack: Stack, r: redis.Redis, reply_to: str, tokens: int, **job: object) -> str:
    """A synthetic engine writing ``tokens`` numbered tokens 0.05 s apart, and one streaming chat
    job of it replying to ``reply_to`` (which the caller made, as a gateway does); the job's id."""
    stack.synthetic("synthetic", "--numbered", "--tokens", str(tokens), "--token-delay", "0.05", wait=False)
    keys = Keys(stack.prefix)
    jobs = keys.jobs("synthetic")
    assert wait_for(lambda: r.exists(jobs) and r.xinfo_groups(jobs), 20), stack.procs[-1].output()
    now = int(time.time() * 1000)
    body = {"id": "chat-1", "kind": "chat", "model": "synthetic", "reply_to": reply_to, "stream": True,
            "body": msgspec.json.encode({**CHAT, "max_tokens": tokens}), "deadline_ms": now + 60_000,
            "created_ms": now, **job}
    r.xadd(jobs, {b"j": msgspec.msgpack.encode(body)})
    return "chat-1"


def events_of(r: redis.Redis, stream: str) -> list[dict[str, object]]:
    return [e for _id, fields in r.xrange(stream) if b"e" in fields for e in msgspec.msgpack.decode(fields[b"e"])]


def test_an_engine_restores_a_reply_stream_redis_lost_with_the_life_it_had(stack: Stack) -> None:
    """The stream vanishes before its expiry (Redis lost it): the engine's next write makes it again,
    with the expiry it had, not a longer one, and the job's later events are in it."""
    keys = Keys(stack.prefix)
    reply_to = keys.replies("live-gw")
    with redis.Redis.from_url(stack.redis_url) as r:
        r.xadd(reply_to, {b"h": b"1"})
        r.pexpire(reply_to, 30_000)
        made = time.monotonic()
        engine_and_job(stack, r, reply_to, tokens=40)
        assert wait_for(lambda: len(events_of(r, reply_to)) >= 3, 20), stack.procs[-1].output()
        r.delete(reply_to)
        gone = time.monotonic()
        assert wait_for(lambda: r.exists(reply_to), 5), "the engine did not re-create the reply stream"
        ttl = r.pttl(reply_to)
        assert 0 < ttl <= 30_000 - (gone - made) * 1000, ttl
        assert wait_for(lambda: (e := events_of(r, reply_to)) and e[-1]["t"] == "f", 10), events_of(r, reply_to)
        numbers = [e["seq"] for e in events_of(r, reply_to)]
        assert numbers == list(range(numbers[0], numbers[-1] + 1)), numbers  # in order, none lost since


def make_reply_stream(r: redis.Redis, reply_to: str, ttl_ms: int = 30_000, *, replacing: bool = False) -> None:
    """As a gateway makes its reply stream (``ReplyRouter.create_stream``): a marker entry, an expiry, a
    new generation; ``replacing``: in one transaction with deleting the stream and its generation (Redis
    lost them, the gateway made them again before any engine wrote)."""
    pipe = r.pipeline(transaction=True)
    if replacing:
        pipe.delete(reply_to, generation_key(reply_to))
    pipe.xadd(reply_to, {b"h": b"1"})
    pipe.pexpire(reply_to, ttl_ms)
    pipe.set(generation_key(reply_to), os.urandom(8).hex(), px=ttl_ms)
    pipe.execute()


@pytest.mark.parametrize("who", ["engine", "gateway"])
def test_what_a_lost_stream_held_is_written_again_whoever_makes_it_again(stack: Stack, who: str) -> None:
    """Redis loses a reply stream (and its generation) with events in it its gateway had not read yet.
    Whether the engine's next write makes the stream again or its gateway did first (a new generation),
    the engine writes its recent entries again ahead of the new ones: the new stream holds every event
    of the job from the first, in order, so the gateway, which drops repeats by number, misses none."""
    keys = Keys(stack.prefix)
    reply_to = keys.replies(f"{who}-gw")
    with redis.Redis.from_url(stack.redis_url) as r:
        make_reply_stream(r, reply_to)
        engine_and_job(stack, r, reply_to, tokens=40)
        assert wait_for(lambda: len(events_of(r, reply_to)) >= 5, 20), stack.procs[-1].output()
        if who == "gateway":
            make_reply_stream(r, reply_to, replacing=True)
        else:
            r.delete(reply_to, generation_key(reply_to))
            assert wait_for(lambda: r.exists(reply_to), 5), "the engine did not re-create the reply stream"
        assert wait_for(lambda: (e := events_of(r, reply_to)) and e[-1]["t"] == "f", 10), events_of(r, reply_to)
        numbers = [e["seq"] for e in events_of(r, reply_to)]
        assert numbers == list(range(1, numbers[-1] + 1)), numbers  # from the first event: nothing lost
        assert r.get(generation_key(reply_to)), "the stream has no generation"


def test_an_engine_never_revives_the_stream_of_a_gateway_that_is_gone(stack: Stack) -> None:
    """A gateway that stopped refreshing its stream is gone: once the stream expires, the engine
    running one of its jobs drops the job's events rather than make the stream again."""
    keys = Keys(stack.prefix)
    reply_to = keys.replies("gone-gw")
    with redis.Redis.from_url(stack.redis_url) as r:
        r.xadd(reply_to, {b"h": b"1"})
        r.pexpire(reply_to, 1500)  # and never refreshed
        engine_and_job(stack, r, reply_to, tokens=60)  # 3 s of tokens
        assert wait_for(lambda: events_of(r, reply_to), 20), stack.procs[-1].output()
        assert wait_for(lambda: not r.exists(reply_to), 5)
        jobs = keys.jobs("synthetic")
        assert wait_for(lambda: not r.xlen(jobs), 10), "the job was not acked"
        assert not r.exists(reply_to), f"re-created, TTL {r.pttl(reply_to)}"


def test_an_engine_restores_the_key_of_a_job_it_runs_with_a_lease(stack: Stack) -> None:
    """Redis lost the key of a job an engine runs: the engine's heartbeat makes it again (saying the
    output began), with a lease it renews, not the job's deadline: when that engine dies, the key
    lapses within the lease, so its gateway finds the job lost instead of waiting for its deadline."""
    keys = Keys(stack.prefix)
    reply_to = keys.replies("live-gw")
    with redis.Redis.from_url(stack.redis_url) as r:
        r.xadd(reply_to, {b"h": b"1"})
        r.pexpire(reply_to, 60_000)
        job_id = engine_and_job(stack, r, reply_to, tokens=1200)  # 60 s of tokens: it runs till killed
        job_key = keys.job("synthetic", job_id)
        r.set(job_key, b"q", px=60_000)  # the gateway's submit script makes it
        assert wait_for(lambda: r.get(job_key) == b"o", 20), stack.procs[-1].output()  # output began
        r.delete(job_key)
        assert wait_for(lambda: r.exists(job_key), 10), "the engine did not restore the job's key"
        assert r.get(job_key) == b"o"
        assert 0 < r.pttl(job_key) <= 5_000  # the lease (engine_ttl_s), not the 60 s the job had
        # Renewed by the next beats (one a second): its time to live runs down, then goes up again.
        assert wait_for(lambda: r.pttl(job_key) < 4_500, 10)
        assert wait_for(lambda: r.pttl(job_key) > 4_500, 10), "the lease was not renewed"
        stack.procs[-1].kill()
        # Gone within the 5 s lease (generous on a loaded machine), far before the 60 s deadline.
        assert wait_for(lambda: not r.exists(job_key), 20), "the key outlived the engine's lease"


def test_a_quiet_streams_last_events_are_written_again_when_redis_restarts(tmp_path: Path) -> None:
    """A job ended (its events all written, acked) and Redis restarts before its gateway read them: the
    engine, which has nothing more to write to that stream, learns of the restart from its other
    connections and writes the stream's recent entries again all the same, into the stream its gateway
    made again: every event of the job is there."""
    server = RedisServer(tmp_path / "redis")
    stack = Stack(server.url, tmp_path)
    reply_to = Keys(stack.prefix).replies("quiet-gw")
    try:
        with redis.Redis.from_url(server.url) as r:
            make_reply_stream(r, reply_to)
            engine_and_job(stack, r, reply_to, tokens=5)
            assert wait_for(lambda: (e := events_of(r, reply_to)) and e[-1]["t"] == "f", 20), stack.procs[-1].output()
            written = [e["seq"] for e in events_of(r, reply_to)]
        server.restart()  # every key gone, the unread events with them
        with redis.Redis.from_url(server.url) as r:
            make_reply_stream(r, reply_to)  # as its gateway does once it sees the stream gone
            assert wait_for(lambda: [e["seq"] for e in events_of(r, reply_to)] == written, 15), \
                (events_of(r, reply_to), stack.procs[-1].output()[-2000:])
    finally:
        stack.stop()
        server.stop()


def test_a_stopped_gateways_stream_is_never_made_again(stack: Stack) -> None:
    """A gateway that stops deletes its stream and marks its generation gone: an engine still running one
    of its jobs drops the job's events (nobody reads them) rather than make the stream again."""
    keys = Keys(stack.prefix)
    reply_to = keys.replies("stopped-gw")
    with redis.Redis.from_url(stack.redis_url) as r:
        make_reply_stream(r, reply_to, ttl_ms=60_000)
        engine_and_job(stack, r, reply_to, tokens=40)
        assert wait_for(lambda: len(events_of(r, reply_to)) >= 5, 20), stack.procs[-1].output()
        r.delete(reply_to)
        r.set(generation_key(reply_to), GONE, px=60_000)  # as ReplyRouter.close_stream does
        assert wait_for(lambda: not r.xlen(keys.jobs("synthetic")), 10), "the job was not acked"
        assert not r.exists(reply_to), f"made again: {r.xlen(reply_to)} entries"


def test_an_engine_under_redis_users_of_an_older_release_still_delivers(tmp_path: Path) -> None:
    """Engines upgraded before Redis's users (which then lack the generation's name): the engine writes
    without generations, as before them, rather than have every write refused."""
    import tests.harness as h
    from engines.contract.acl import user_rules

    def old_rules(prefix: str, role: str) -> list[str]:
        return [rule for rule in user_rules(prefix, role) if not rule.endswith(":gen")]

    args = [a for role, pw in h.USER_PASSWORDS.items() for a in ("--user", role, "on", f">{pw}", *old_rules("t*", role))]
    server = RedisServer(tmp_path / "redis", *args)
    s = Stack(server.url, tmp_path)
    s.users = {role: (role, pw) for role, pw in h.USER_PASSWORDS.items()}
    try:
        reply_to = Keys(s.prefix).replies("old-acl-gw")
        with redis.Redis.from_url(server.url) as r:
            r.xadd(reply_to, {b"h": b"1"})
            r.pexpire(reply_to, 60_000)  # a gateway of an older version: no generation
            engine_and_job(s, r, reply_to, tokens=5)
            assert wait_for(lambda: (e := events_of(r, reply_to)) and e[-1]["t"] == "f", 20), s.procs[-1].output()
            assert [e["seq"] for e in events_of(r, reply_to)] == list(range(1, 8))
    finally:
        s.stop()
        server.stop()


async def test_a_gateway_keeps_its_stream_without_trimming_or_replacing_what_engines_made(redis_server: RedisServer
                                                                                           ) -> None:
    """The gateway's keep-alive finds its stream made again by an engine (with the entries it wrote again
    and a generation): it only renews it, trimming nothing and keeping that generation; a missing one it
    makes with a new generation; a live one without a generation (an older engine made it) gets one; at
    shutdown its generation says it is gone."""
    import redis.asyncio as aioredis

    from engines.contract.messages import Codec
    from gateway.queue import ReplyRouter

    r = aioredis.Redis.from_url(redis_server.url)
    stream = Keys(f"t{os.urandom(3).hex()}").replies("gw")
    router = ReplyRouter(r, stream, Codec())
    try:
        for i in range(1500):  # several engines' recent entries, written again into the stream one made
            await r.xadd(stream, {b"e": b"%d" % i})
        await r.set(generation_key(stream), "made-by-an-engine", px=60_000)
        assert await router.create_stream() is True
        assert await r.xlen(stream) == 1500 and await r.get(generation_key(stream)) == b"made-by-an-engine"
        await r.delete(generation_key(stream))
        assert await router.create_stream() is True
        assert await r.get(generation_key(stream)) not in (None, b"made-by-an-engine")
        await r.delete(stream, generation_key(stream))
        assert await router.create_stream() is False
        assert await r.xlen(stream) == 1 and 0 < await r.pttl(stream) <= 60_000 and await r.get(generation_key(stream))
        await router.close_stream()
        assert not await r.exists(stream) and await r.get(generation_key(stream)) == GONE.encode()
    finally:
        await r.aclose()
