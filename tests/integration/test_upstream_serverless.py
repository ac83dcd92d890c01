"""An upstream engine in front of a serverless endpoint that scales to zero (``--upstream-serverless``,
``engines.upstream_wake``): real Redis, a real gateway and upstream engine processes, the `openai`
SDK as the client, and a scripted endpoint (a thread's HTTP server) that sleeps until a request
wakes it, answers after a wake of a few seconds, and is put back to sleep by the test.

The engine announces its model cold while the endpoint sleeps and warm once it answered; requests
sent while it sleeps are answered after the wake, each once, and counted in the gateway's demand
gauge ``conduit_gateway_requests_cold`` until then; one that never wakes ends in a clean 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import redis

from engines.contract.keys import Keys
from engines.contract.messages import Codec
from tests.harness import RedisServer, Stack, ThreadedServer
from tests.integration.test_telemetry import scrape, value

MODEL = "sleepy"
NEVER = "never-wakes"
WAKE_S = 2.5
IDLE_S = 3


class ServerlessEndpoint(ThreadedServer):
    """Asleep until a chat request arrives; that request starts a wake of :data:`WAKE_S`. While it
    sleeps or wakes it answers as ``mode`` says: ``503`` (no workers), ``reset`` (the connection cut
    unanswered) or ``hold`` (the request held until it is awake). Awake, it streams ``awake``; it
    never wakes for :data:`NEVER`. ``served`` counts the 200s it gave, ``wakes`` the wakes begun."""

    def __init__(self) -> None:
        self.mode = "503"
        self.awake_at: float | None = None
        self.served = 0
        self.wakes = 0
        super().__init__()

    def sleep(self) -> None:
        self.awake_at = None

    def _awake(self) -> bool:
        return self.awake_at is not None and time.monotonic() >= self.awake_at

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = (await r.readuntil(b"\r\n\r\n")).decode()
            length = next(int(h.split(":")[1]) for h in head.split("\r\n") if h.lower().startswith("content-length"))
            model = json.loads(await r.readexactly(length)).get("model")
            if model != NEVER and self.awake_at is None:
                self.awake_at, self.wakes = time.monotonic() + WAKE_S, self.wakes + 1
            while self.mode == "hold" and model != NEVER and not self._awake():
                await asyncio.sleep(0.05)
            if model == NEVER or not self._awake():
                if self.mode == "reset":
                    return  # closed unanswered
                body = json.dumps({"error": {"message": "no workers available", "type": "server_error"}})
                w.write(f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())
                return
            self.served += 1
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            for text, finish in (("awake", None), ("", "stop")):
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model,
                         "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
                w.write(f"data: {json.dumps(chunk)}\n\n".encode())
            w.write(b"data: [DONE]\n\n")
            await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError, StopIteration):
            pass
        finally:
            w.close()


@pytest.fixture(scope="module")
def serverless(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Stack, ServerlessEndpoint]]:
    endpoint = ServerlessEndpoint()
    stack = Stack(redis_server.url, tmp_path_factory.mktemp("serverless"))
    try:
        stack.gateway(request_timeout_s=30)
        base = f"http://127.0.0.1:{endpoint.port}/v1"
        for name, wake_s in ((MODEL, "20"), (NEVER, "2")):
            stack.engine("--kind", "upstream", "--base-url", base, "--served-name", name, "--upstream-serverless",
                         "--upstream-cold-start-s", wake_s, "--upstream-idle-s", str(IDLE_S), model=name)
        yield stack, endpoint
    finally:
        stack.stop()
        endpoint.stop()


def announced_cold(stack: Stack, model: str) -> list[str] | None:
    """What the engine of ``model`` announces cold in its heartbeat (None: no engine of it)."""
    codec = Codec()
    with redis.Redis.from_url(stack.redis_url) as db:
        infos = [codec.decode_info(raw) for raw in db.hvals(Keys(stack.prefix).engine_info)]
    return next((i.cold for i in infos if model in i.models), None)


def demand(stack: Stack, model: str = MODEL) -> float | None:
    return value(scrape(f"{stack.base_url}/metrics"), "conduit_gateway_requests_cold", gen_ai_request_model=model)


def wait_until(what: Callable[[], Any], expected: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (got := what()) != expected:
        assert time.monotonic() < deadline, f"still {got!r}, waited for {expected!r}"
        time.sleep(0.05)


def ask(client: openai.OpenAI, stream: bool, model: str = MODEL) -> str:
    messages = [{"role": "user", "content": "wake up"}]
    if not stream:
        answer = client.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]
        return answer.choices[0].message.content or ""
    chunks = client.chat.completions.create(model=model, messages=messages, stream=True)  # type: ignore[arg-type]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("mode", ["503", "hold", "reset"])
def test_requests_sent_while_the_endpoint_sleeps_wake_it_and_are_answered_once(
        serverless: tuple[Stack, ServerlessEndpoint], mode: str) -> None:
    stack, endpoint = serverless
    endpoint.mode = mode
    wait_until(lambda: announced_cold(stack, MODEL), [MODEL])  # cold at start, and again after idling
    assert demand(stack) == 0
    served, wakes = endpoint.served, endpoint.wakes
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=30)
    n = 3
    with cf.ThreadPoolExecutor(n) as pool:
        started = time.monotonic()
        futures = [pool.submit(ask, client, i == 0) for i in range(n)]
        wait_until(lambda: demand(stack), n)  # each waits for the wake, counted as demand
        assert not any(f.done() for f in futures)
        answers = [f.result(timeout=30) for f in futures]
    assert answers == ["awake"] * n and time.monotonic() - started >= WAKE_S - 0.5
    assert endpoint.served - served == n and endpoint.wakes - wakes == 1  # none lost, none twice, one wake
    assert announced_cold(stack, MODEL) == []  # announced warm at once (well before the idle time)
    wait_until(lambda: demand(stack), 0)
    # Warm: answered at once, never counted as demand.
    assert ask(client, False) == "awake"
    client.close()
    endpoint.sleep()  # scaled down; the engine takes it so once it answered nothing for IDLE_S


def test_an_endpoint_that_never_wakes_ends_in_503_with_retry_after(
        serverless: tuple[Stack, ServerlessEndpoint]) -> None:
    stack, endpoint = serverless
    endpoint.mode = "503"
    assert announced_cold(stack, NEVER) == [NEVER]
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=30)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        ask(client, False, NEVER)
    took = time.monotonic() - started
    assert took < 8, took  # within its 2 s wake window (the next try would pass it), not its 30 s deadline
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"]
    assert info.value.body["code"] == "model_unavailable"  # type: ignore[index]
    assert "did not wake within 2 s" in info.value.body["message"]  # type: ignore[index]
    wait_until(lambda: demand(stack, NEVER), 0)
    assert announced_cold(stack, NEVER) == [NEVER]
    client.close()
