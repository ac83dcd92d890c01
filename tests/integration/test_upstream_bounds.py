"""The upstream engine kind against an upstream that misbehaves on purpose (a scripted HTTP server on a
thread, since no real server sends these): a stream line that never ends, an error body that never
ends, a quota that is out, and a ``/v1/models`` that lists too many models, bad names, or none for a
while. Each is bounded or ridden out; see tests/integration/test_upstream.py for real upstreams."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import RedisServer, Stack, ThreadedServer

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class ScriptedUpstream(ThreadedServer):
    """An OpenAI-shaped HTTP/1.1 server whose answer depends on the request's ``model``; ``models`` is what
    its ``/v1/models`` lists (``reads``: how often it was asked)."""

    def __init__(self) -> None:
        self.models: list[str] = []
        self.reads = 0
        self.requests: dict[str, int] = {}
        super().__init__()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = (await r.readuntil(b"\r\n\r\n")).decode()
            length = int(next((h.split(":")[1] for h in head.split("\r\n") if h.lower().startswith("content-length")),
                              "0"))
            body = json.loads(await r.readexactly(length)) if length else {}
            if head.startswith("GET /v1/models"):
                self.reads += 1
                data = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})
                w.write(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                        f"Connection: close\r\n\r\n{data}".encode())
            else:
                model = body.get("model", "")
                self.requests[model] = self.requests.get(model, 0) + 1
                await self._answer(model, w)
            await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def _answer(self, model: str, w: asyncio.StreamWriter) -> None:
        if model == "quota":
            data = json.dumps({"error": {"message": "You exceeded your current quota (org-secret).",
                                         "type": "insufficient_quota", "code": "insufficient_quota"}})
            w.write(f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n{data}".encode())
            return
        status = "400 Bad Request" if model == "endless-error" else "200 OK"
        w.write(f"HTTP/1.1 {status}\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n".encode())
        w.write(b'{"error": {"message": "' if model == "endless-error" else b"data: ")
        ends = time.monotonic() + 40  # never a line's or a body's end (past the 20 s deadline): the reader stops
        while time.monotonic() < ends:
            w.write(b"x" * 65536)
            await w.drain()
            await asyncio.sleep(0.001)



@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Any]]:
    upstream = ScriptedUpstream()
    front = Stack(redis_server.url, tmp_path_factory.mktemp("front"))
    try:
        front.gateway(request_timeout_s=20)
        base = f"http://127.0.0.1:{upstream.port}/v1"
        engines = {name: front.engine("--kind", "upstream", "--base-url", base, "--served-name", name,
                                      "--upstream-retries", "3", model=name)
                   for name in ("quota", "long-line", "endless-error")}
        yield front, (upstream, engines, base)
    finally:
        front.stop()
        upstream.stop()


def ask(front: Stack, model: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = httpx.post(f"{front.base_url}/v1/chat/completions", json={**CHAT, "model": model}, timeout=60)
    return r, time.monotonic() - started


def test_a_stream_line_that_never_ends_fails_the_job_cleanly(stack: tuple[Stack, Any]) -> None:
    front, (upstream, _, _) = stack
    r, took = ask(front, "long-line")
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "engine_error" and "1024 KiB" in r.json()["error"]["message"]
    assert took < 10 and upstream.requests["long-line"] == 1  # at once (never the 20 s deadline), never retried


def test_an_error_body_that_never_ends_is_read_64_kib_deep(stack: tuple[Stack, Any]) -> None:
    front, _ = stack
    r, took = ask(front, "endless-error")
    assert r.status_code == 400, r.text
    assert len(r.json()["error"]["message"]) <= 500 and took < 10


def test_an_exhausted_quota_is_not_retried(stack: tuple[Stack, Any]) -> None:
    front, (upstream, engines, _) = stack
    r, _ = ask(front, "quota")
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "engine_error" and "org-secret" not in r.text
    assert upstream.requests["quota"] == 1 and "trying again" not in engines["quota"].output()
    assert "quota is exhausted" in engines["quota"].output()


def test_models_auto_is_bounded_and_rides_out_an_empty_list(stack: tuple[Stack, Any], tmp_path: Path) -> None:
    front, (upstream, _, base) = stack
    upstream.models = ["m-b", "m-a", "m-c", "bad name", "x{tag}"]
    auto = front.engine("--kind", "upstream", "--base-url", base, "--models", "auto", "--models-refresh-s", "0.2",
                        "--upstream-models-max", "2", model="m-b")
    try:
        def served() -> set[str]:
            return {m["id"] for m in httpx.get(f"{front.base_url}/v1/models").json()["data"]} & {"m-a", "m-b", "m-c"}

        def until(condition: Any) -> None:
            deadline = time.monotonic() + 20
            while not condition():
                assert time.monotonic() < deadline, auto.output()
                time.sleep(0.05)

        def reads(n: int) -> None:  # n more reads of the upstream's list
            target = upstream.reads + n
            until(lambda: upstream.reads >= target)

        assert served() >= {"m-a", "m-b"} and "m-c" not in served()  # the first 2 valid names, sorted
        assert "MORE THAN --upstream-models-max" in auto.output() and "'x{tag}'" in auto.output()
        upstream.models = []  # an upstream restarting: every model kept
        reads(5)
        assert "models changed" not in auto.output()
        before = upstream.reads
        upstream.models = ["m-a"]  # m-b dropped only once two reads in a row lack it
        until(lambda: "models changed" in auto.output())
        assert upstream.reads >= before + 2
        front.wait_for_model("m-b", present=False, timeout=20)
        assert served() == {"m-a"}
    finally:
        auto.stop()
