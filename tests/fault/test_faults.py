"""The fault suite: steady load on two synthetic engines while one fault strikes.

Every test starts its own Redis, gateway(s) and two engines whose tokens are numbered, runs
mixed streaming / non-streaming load (:mod:`tests.fault.load`), injects its fault after a
warm-up, keeps the load on a while, then prints its table row (``-s`` shows it;
``CONDUIT_FAULT_REPORT=path`` appends it to a file). Each asserts that every request ended,
before its deadline, with a complete answer or an OpenAI-shaped error: 0 lost, 0 duplicated.

Faults: (a) kill -9 one engine, (b) restart Redis with jobs queued, (c) SIGTERM a gateway
with streams open, (d) ``DEBUG SLEEP 6`` on Redis, (e) Redis out of memory for 3 s, (f) kill -9
the Redis Cluster master holding the model's job stream (its replica takes over), (g) restart
Redis with many streams mid-answer, (h) kill -9 an engine and a gateway under background responses
(polled to their end instead of a load).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import redis

from engines.contract.keys import Keys
from engines.contract.messages import Codec
from tests.cluster import LocalCluster
from tests.fault.load import COMPLETED, DUPLICATED, LOST, Answer, Load, Outcome, Report, judge
from tests.harness import Proc, RedisServer, Stack

pytestmark = pytest.mark.fault

MODEL = "synthetic"
TOKENS = 30
#: The gateways' request_timeout_s: short, so a lost job shows up (as a 504) within the test.
DEADLINE_S = 15.0
CLIENTS = 16
#: Per engine. Two engines serve 8 jobs at once for 16 clients: about 8 jobs are always queued.
ENGINE_CONCURRENCY = 4
# 30 tokens 20 ms apart: an answer takes ~0.6 s, so faults land on streams mid-answer. A dead
# engine's jobs are reclaimed after 2 s (its heartbeat re-claims live ones every 1 s).
ENGINE_ARGS = ("--numbered", "--tokens", str(TOKENS), "--token-delay", "0.02", "--reclaim-idle-ms", "2000")
WARMUP_S = 3.0
#: Load kept on after the fault: recovery has to happen within it.
AFTER_S = 8.0

T = TypeVar("T")


def start(stack: Stack, gateways: int = 1, concurrency: int = ENGINE_CONCURRENCY
          ) -> tuple[list[tuple[Proc, str]], list[Proc]]:
    """Gateways (with their URLs), then the two engines (each running up to ``concurrency`` jobs)."""
    gws = []
    for _ in range(gateways):
        proc = stack.gateway(request_timeout_s=DEADLINE_S)
        gws.append((proc, stack.base_url))
    engines = [stack.synthetic(MODEL, *ENGINE_ARGS, "--max-concurrency", str(concurrency)) for _ in range(2)]
    return gws, engines


def under_load(urls: list[str], fault: str, inject: Callable[[Load], T], after_s: float = AFTER_S,
               clients: int = CLIENTS) -> tuple[Report, T]:
    """Warm up, ``inject`` the fault, keep the load on ``after_s``, then let every request end."""
    load = Load(urls, model=MODEL, tokens=TOKENS, clients=clients, deadline_s=DEADLINE_S,
                client_timeout_s=DEADLINE_S + 5)
    load.start()
    try:
        time.sleep(WARMUP_S)
        injected = inject(load)
        time.sleep(after_s)
    finally:
        report = load.stop(fault)
    report.publish()
    return report, injected


def problems_of(report: Report) -> list[str]:
    problems = [f"{report.count(kind)} {kind}" for kind in (LOST, DUPLICATED) if report.count(kind)]
    if report.count(COMPLETED) < 20:
        problems.append(f"only {report.count(COMPLETED)} completed: the load did not run")
    return problems


def verdict(report: Report, problems: list[str]) -> None:
    assert not problems, f"{'; '.join(problems)}\n{report.header()}\n{report.table()}"


def test_kill_engine(fault_stack: Stack) -> None:
    """(a) kill -9 one of two engines: its jobs move to the other one.

    Non-streaming requests must all complete: no output of theirs reached anyone, so a dead
    engine's attempt is retried. Streams that had output may end with an error event.
    """
    gws, engines = start(fault_stack)

    def kill(load: Load) -> float:
        at = load.now()
        engines[0].kill()
        return at

    report, killed_at = under_load([url for _, url in gws], "kill -9 one engine", kill)
    problems = problems_of(report)
    if not report.open_at(killed_at):
        problems.append("no request was in flight at the kill")
    failed = [o for o in report.outcomes if not o.stream and o.kind != COMPLETED]
    if failed:
        problems.append(f"{len(failed)} non-streaming requests not completed (not retried): "
                        f"{sorted({o.detail for o in failed})}")
    verdict(report, problems)


def test_restart_redis_with_jobs_queued(fault_stack: Stack, fault_redis: RedisServer) -> None:
    """(b) Redis restarts without persistence while jobs wait in the queue: every key is gone."""
    gws, _ = start(fault_stack)
    keys = Keys(fault_stack.prefix)
    jobs, fair = keys.jobs(MODEL), keys.fair_state(MODEL)

    def restart(load: Load) -> int:
        running = 2 * ENGINE_CONCURRENCY
        with redis.Redis.from_url(fault_redis.url) as r:
            # Jobs start in waves: catch a moment when some wait. The backlog is the stream (queued
            # + running) plus the jobs waiting their turn in fair queueing's lists.
            for _ in range(100):
                backlog = int(r.xlen(jobs)) + int(r.hget(fair, "waiting") or 0)
                if backlog > running:
                    break
                time.sleep(0.02)
        fault_redis.restart()
        return backlog - running

    report, queued = under_load([url for _, url in gws], "restart Redis, jobs queued", restart)
    problems = problems_of(report)
    if queued <= 0:
        problems.append(f"no job was queued when Redis restarted ({queued})")
    verdict(report, problems)


#: (g): many clients, and engines with a slot for each: at any moment many streams are mid-answer.
MANY_CLIENTS = 64
#: Streams that must be mid-answer (output began, not ended) when Redis restarts.
MID_STREAM = 12


def test_restart_redis_with_streams_open(fault_stack: Stack, fault_redis: RedisServer) -> None:
    """(g) Redis restarts without persistence while many streams are mid-answer: every key is gone,
    the gateway's reply stream and the jobs' keys included, but both engines live on and keep running
    their jobs. Not one of those streams may end in an error (their output continues where it was);
    a non-streaming request may be submitted again, but must complete too."""
    gws, _ = start(fault_stack, concurrency=MANY_CLIENTS // 2)

    def restart(load: Load) -> float:
        if load.wait_mid_stream(MID_STREAM, timeout=20) < MID_STREAM:
            raise AssertionError(f"fewer than {MID_STREAM} streams were ever mid-answer at once")
        at = load.now()
        fault_redis.restart()
        return at

    report, restarted_at = under_load([url for _, url in gws], "restart Redis, streams open", restart,
                                      clients=MANY_CLIENTS)
    problems = problems_of(report)
    mid = [o for o in report.open_at(restarted_at) if o.stream and o.first is not None and o.first < restarted_at]
    if len(mid) < MID_STREAM:
        problems.append(f"only {len(mid)} streams were mid-answer when Redis restarted")
    broken = [o for o in mid if o.kind != COMPLETED]
    if broken:
        problems.append(f"{len(broken)} of {len(mid)} streams mid-answer at the restart not completed: "
                        f"{sorted({o.detail for o in broken})}")
    print(f"    {len(mid)} streams mid-answer at the restart, {len(mid) - len(broken)} of them completed")
    # Open at the restart, unless refused at the door (503: no Redis to queue on, or no engine
    # registered in the Redis that came back): run to the end, submitted again if need be.
    waiting = [o for o in report.open_at(restarted_at) if not o.stream and o.kind != COMPLETED
               and not o.detail.startswith("503 ")]
    if waiting:
        problems.append(f"{len(waiting)} non-streaming requests open at the restart not completed: "
                        f"{sorted({o.detail for o in waiting})}")
    verdict(report, problems)


def test_sigterm_gateway_with_streams_open(fault_stack: Stack) -> None:
    """(c) One of two gateways is stopped: its open requests drain (or end cleanly), none hangs.

    Like a load balancer draining it, the load sends it nothing new just before the signal.
    """
    gws, _ = start(fault_stack, gateways=2)
    (stopped, stopped_url), _ = gws

    def sigterm(load: Load) -> float:
        load.drop_target(stopped_url)
        time.sleep(0.3)  # requests already sent to it are still open (each lasts > 0.6 s)
        at = load.now()
        stopped.proc.send_signal(signal.SIGTERM)
        return at

    report, signalled_at = under_load([url for _, url in gws], "SIGTERM a gateway, streams open", sigterm)
    problems = problems_of(report)
    if not [o for o in report.open_at(signalled_at, stopped_url) if o.stream]:
        problems.append("no stream was open on the gateway when it got SIGTERM")
    try:
        stopped.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        problems.append("the stopped gateway did not exit within 20 s of SIGTERM")
    verdict(report, problems)


def test_redis_debug_sleep(fault_stack: Stack, fault_redis: RedisServer) -> None:
    """(d) Redis stops answering for 6 s (``DEBUG SLEEP 6``): every client's reads time out."""
    gws, _ = start(fault_stack)

    def sleep(load: Load) -> None:
        with redis.Redis.from_url(fault_redis.url, socket_timeout=20) as r:
            r.execute_command("DEBUG", "SLEEP", "6")

    report, _ = under_load([url for _, url in gws], "DEBUG SLEEP 6 on Redis", sleep)
    verdict(report, problems_of(report))


FILLER = "fault:filler"


def test_redis_out_of_memory(fault_stack: Stack, fault_redis: RedisServer) -> None:
    """(e) Redis refuses writes (maxmemory reached, noeviction) for 3 s, then has room again."""
    gws, _ = start(fault_stack)

    def exhaust(load: Load) -> None:
        with redis.Redis.from_url(fault_redis.url) as r:
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + (4 << 20))
            chunk = b"x" * (1 << 20)
            for _ in range(64):
                try:
                    r.append(FILLER, chunk)
                except redis.exceptions.OutOfMemoryError:
                    break
            else:
                raise AssertionError("Redis never refused a write")
            time.sleep(3)
            r.delete(FILLER)
            r.config_set("maxmemory", 0)

    report, _ = under_load([url for _, url in gws], "maxmemory exhausted for 3 s", exhaust)
    verdict(report, problems_of(report))


def test_cluster_master_failover(redis_cluster: LocalCluster, tmp_path: Path) -> None:
    """(f) On a Redis Cluster, the master holding the model's job stream and job keys dies."""
    stack = Stack(redis_cluster.conduit_url, tmp_path)
    try:
        gws, _ = start(stack)
        jobs = Keys(stack.prefix).jobs(MODEL)

        def kill_master(load: Load) -> float:
            redis_cluster.kill_master(redis_cluster.master_for_key(jobs).port)
            return redis_cluster.wait_failover()

        report, _ = under_load([url for _, url in gws], "kill a Cluster master (failover)", kill_master)
        verdict(report, problems_of(report))
    finally:
        stack.stop()
        redis_cluster.heal()


BACKGROUND = 48


def test_background_responses_survive_kill_9_of_an_engine_and_their_gateway(fault_stack: Stack) -> None:
    """(h) Background responses (``background: true``) sent to two gateways; mid-way, kill -9 one engine
    and one gateway. Each is then polled on the gateway left until it ends: every one must complete,
    its numbered tokens each once (an engine's lost attempt runs again from scratch elsewhere; a dead
    gateway's responses are finished by their engines into their records)."""
    gws, engines = start(fault_stack, gateways=2)
    urls = [url for _, url in gws]
    began = time.monotonic()
    made = []
    with httpx.Client(timeout=DEADLINE_S) as client:
        for i in range(BACKGROUND):
            body = {"model": MODEL, "input": f"background {i}", "background": True}
            r = client.post(f"{urls[i % 2]}/v1/responses", json=body)
            assert r.status_code == 200 and r.json()["status"] == "queued", r.text
            made.append((r.json()["id"], urls[i % 2], time.monotonic() - began))
        time.sleep(0.5)  # (8 of 48 run at once, each ~0.6 s: most are still queued or running)
        unfinished = [rid for rid, url, _ in made[-16:] if url == urls[0] and client.get(
            f"{urls[1]}/v1/responses/{rid}").json()["status"] in ("queued", "in_progress")]
        engines[0].kill()
        gws[0][0].kill()
        outcomes = []
        for rid, url, start_at in made:
            deadline = time.monotonic() + DEADLINE_S + 5
            while True:
                body = client.get(f"{urls[1]}/v1/responses/{rid}").json()
                if body.get("status") not in ("queued", "in_progress") or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            text = [p["text"] for item in body.get("output", []) if item["type"] == "message" for p in item["content"]]
            answer = Answer(stream=False, status=200, text=text, finish_reason="stop",
                            error=body.get("error") if body.get("status") == "failed" else None)
            if body.get("status") == "failed" and isinstance(answer.error, dict):
                answer.error = {**answer.error, "type": "server_error", "param": None}
            failure = None if body.get("status") in ("completed", "failed") else f"status {body.get('status')}"
            kind, detail = judge(answer, failure, TOKENS)
            outcomes.append(Outcome(False, url, start_at, time.monotonic() - began, kind, detail))
    report = Report("background: kill -9 engine + gateway", outcomes)
    report.publish()
    problems = problems_of(report)
    if not unfinished:
        problems.append("every response of the killed gateway had ended before the kill")
    r, codec = redis.Redis.from_url(fault_stack.redis_url), Codec()
    keys = Keys(fault_stack.prefix)
    rerun = sum(any(e.attempt > 1 for _, f in r.xrange(keys.result(rid)) if b"e" in f
                    for e in codec.decode_events(f[b"e"])[0]) for rid, _, _ in made)
    r.close()
    if not rerun:
        problems.append("no job was run again after its engine died")
    print(f"    {len(unfinished)} of the killed gateway's last 8 were unfinished at the kill; {rerun} jobs ran again")
    verdict(report, problems)
