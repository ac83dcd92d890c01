"""The upstream engine kind against a real upstream: a second Conduit gateway (keys on) with synthetic
engines, in front of which a first gateway's upstream engines forward every job. Each error mapping
is made real at the upstream (a wrong key, a rejected parameter, rate and concurrency limits, a model
it does not serve, no server at all, a hung answer), and a client that leaves closes the upstream's
request (its engine counts the job cancelled)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis

from engines.contract.keys import Keys
from tests.fakes import run_job
from tests.harness import ROOT, RedisServer, Stack, ThreadedServer, free_port, hang_up_after
from tests.integration.test_delivery import engine_jobs, wait_for_jobs
from tests.openai_schema import validate, validate_completion_chunk

CHAT = {"model": "front", "messages": [{"role": "user", "content": "one two three"}]}


class Upstreams:
    """The upstream stack (``up``) and the front stack (``front``) with its upstream engines."""

    up: Stack
    front: Stack
    key: str
    one_key: str
    drip_metrics: int
    front_metrics: int
    engines: dict[str, Any]


def create_key(stack: Stack, name: str, *limits: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "create", "--name", name, "--redis-url",
                           stack.redis_url, "--key-prefix", stack.prefix, *limits], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def u(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    s = Upstreams()
    s.up = Stack(redis_server.url, tmp_path_factory.mktemp("upstream"))
    s.front = Stack(redis_server.url, tmp_path_factory.mktemp("front"))
    try:
        # max_choices: the front's default is higher, so its 400s are the upstream's. up-cold: a model it
        # knows with no engine (503).
        s.up.gateway(auth=True, max_choices=4, models="up-cold")
        s.key = s.up.api_key = create_key(s.up, "conduit-front")
        rpm = create_key(s.up, "tiny-rpm", "--rpm", "1")
        one = s.one_key = create_key(s.up, "one-at-a-time", "--concurrency", "1")
        s.drip_metrics = free_port()
        s.up.synthetic("up", "--tokens", "5")
        s.up.synthetic("up-slow", "--tokens", "3", "--token-delay", "60")
        s.up.synthetic("up-num", "--tokens", "20", "--numbered")
        s.up.synthetic("up-drip", "--tokens", "40", "--token-delay", "0.2", "--metrics-port", str(s.drip_metrics))
        s.front.gateway(request_timeout_s=6)
        base = f"{s.up.base_url}/v1"
        s.engines = {}

        def engine(name: str, upstream_model: str, key: str, *args: str) -> None:
            s.engines[name] = s.front.engine(
                "--kind", "upstream", "--base-url", base, "--served-name", name, "--upstream-model", upstream_model,
                "--upstream-retries", "3", *args, model=name, env={"CONDUIT_UPSTREAM_API_KEY": key})

        engine("front", "up", s.key)
        s.front_metrics = free_port()
        engine("front-drip", "up-drip", s.key, "--metrics-port", str(s.front_metrics))
        engine("front-slow", "up-slow", s.key)
        engine("front-bad-key", "up", "not-the-key")
        engine("front-rpm", "up", rpm)
        # Tries until the deadline (Retry-After 1 s each), and one try only.
        engine("front-one", "up-drip", one, "--upstream-retries", "20")
        engine("front-one-brief", "up-drip", one, "--upstream-retries", "1")
        engine("front-missing", "no-such-model", s.key)
        engine("front-cold", "up-cold", s.key)
        engine("front-num", "up-num", s.key)
        s.engines["front-down"] = s.front.engine(
            "--kind", "upstream", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--served-name", "front-down",
            model="front-down")
        yield s
    finally:
        s.front.stop()
        s.up.stop()


def post(base_url: str, body: dict[str, Any], path: str = "/v1/chat/completions", key: str = "",
         **headers: str) -> httpx.Response:
    h = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base_url}{path}", json=body, headers={**h, **headers}, timeout=30)


def sse(base_url: str, body: dict[str, Any], path: str = "/v1/chat/completions", key: str = "") -> list[Any]:
    h = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.stream("POST", f"{base_url}{path}", json={**body, "stream": True}, headers=h, timeout=30) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def comparable(answer: dict[str, Any]) -> Any:
    """What must be equal between an answer through Conduit's upstream engine and the upstream's own."""
    return answer["choices"], answer["usage"]


def test_answers_equal_the_upstream_s_own(u: Upstreams) -> None:
    for body, path in ((CHAT, "/v1/chat/completions"), ({**CHAT, "n": 2, "max_tokens": 4}, "/v1/chat/completions"),
                       ({"model": "front", "prompt": "a b", "n": 2}, "/v1/completions")):
        through = post(u.front.base_url, body, path)
        direct = post(u.up.base_url, {**body, "model": "up"}, path, key=u.key)
        assert through.status_code == direct.status_code == 200, through.text
        validate("CreateChatCompletionResponse" if "chat" in path else "CreateCompletionResponse", through.json())
        assert comparable(through.json()) == comparable(direct.json())
        assert through.json()["model"] == "front"
    # httpx's request log (every URL, at INFO) is off in the engine.
    assert "HTTP Request" not in u.engines["front"].output()


def test_input_tokens_jobs_are_counted_upstream_of_it_but_never_sent_through_it(u: Upstreams) -> None:
    """The upstream engine never announces ``input_tokens`` (its upstream may have no tokenizer
    endpoint), and a job of that kind sent to it anyway is a clean 501; the synthetic engine behind
    it announces and counts it (``/v1/responses/input_tokens`` jobs, played by ``run_job``)."""
    r = redis.Redis.from_url(u.up.redis_url)
    try:
        def kinds(stack: Stack, model: str) -> list[list[str]]:
            infos = [msgspec.msgpack.decode(v) for v in r.hgetall(Keys(stack.prefix).engine_info).values()]
            return [sorted(i["kinds"]) for i in infos if model in i["models"]]

        assert kinds(u.front, "front") == [["chat", "completion"]]
        assert kinds(u.up, "up") == [["chat", "completion", "input_tokens"]]
        refused = run_job(r, u.front.prefix, "front", "input_tokens", json.dumps(CHAT).encode(), timeout=10)
        assert [(e["t"], e["status"], e["code"]) for e in refused] == [("e", 501, "unsupported_job_kind")], refused
        counted = run_job(r, u.up.prefix, "up", "input_tokens", json.dumps({**CHAT, "model": "up"}).encode(), timeout=10)
        assert [e["t"] for e in counted] == ["s", "f"] and counted[-1]["usage"] == {"prompt_tokens": 3}, counted
    finally:
        r.close()


def test_streams_relay_n_and_usage_only_where_asked(u: Upstreams) -> None:
    body = {**CHAT, "n": 2, "max_tokens": 3}
    hidden = sse(u.front.base_url, body)
    for chunk in hidden:
        validate("CreateChatCompletionStreamResponse", chunk)
    # The engine asked the upstream for usage; the client did not, and sees none.
    assert all("usage" not in c or c["usage"] is None for c in hidden) and all(c["choices"] for c in hidden)
    text = {i: "".join(c["choices"][0]["delta"].get("content") or "" for c in hidden
                       if c["choices"][0]["index"] == i) for i in (0, 1)}
    assert text == {0: "tok tok tok ", 1: "tok tok tok "}
    shown = sse(u.front.base_url, {**body, "stream_options": {"include_usage": True}})
    assert shown[-1]["choices"] == [] and shown[-1]["usage"]["completion_tokens"] == 6
    direct = sse(u.up.base_url, {**body, "model": "up", "stream_options": {"include_usage": True}}, key=u.key)
    assert shown[-1]["usage"] == direct[-1]["usage"]
    completion = sse(u.front.base_url, {"model": "front", "prompt": "a", "max_tokens": 2,
                                        "stream_options": {"include_usage": True}}, "/v1/completions")
    for chunk in completion:
        validate_completion_chunk(chunk)
    assert completion[-1]["usage"]["completion_tokens"] == 2


def test_a_parameter_the_upstream_rejects_is_a_400_with_its_message_and_param(u: Upstreams) -> None:
    r = post(u.front.base_url, {**CHAT, "n": 5})
    direct = post(u.up.base_url, {**CHAT, "model": "up", "n": 5}, key=u.key)
    assert r.status_code == direct.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "n" and error["message"] == direct.json()["error"]["message"]
    assert error["type"] == "invalid_request_error"


def test_a_wrong_upstream_key_is_the_engine_s_error_never_the_client_s(u: Upstreams) -> None:
    r = post(u.front.base_url, {**CHAT, "model": "front-bad-key"})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "engine_error" and "invalid_api_key" not in r.text
    assert "refused this engine's credentials" in u.engines["front-bad-key"].output()


def test_a_model_the_upstream_does_not_serve_is_unavailable(u: Upstreams) -> None:
    r = post(u.front.base_url, {**CHAT, "model": "front-missing"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "model_unavailable"
    # The upstream's own name (--upstream-model) stays in the engine's log, never in the answer.
    assert r.json()["error"]["message"] == "The model is not available from its upstream server."
    assert "no-such-model" in u.engines["front-missing"].output()


def test_an_upstream_rate_limit_is_model_overloaded_with_retry_after(u: Upstreams) -> None:
    assert post(u.front.base_url, {**CHAT, "model": "front-rpm"}).status_code == 200
    r = post(u.front.base_url, {**CHAT, "model": "front-rpm"})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "model_overloaded" and int(r.headers["retry-after"]) >= 1
    # Conduit's words, not the upstream's (its rate limits name its keys); the upstream's are logged.
    assert r.json()["error"]["message"] == "The model's upstream server is rate limited."
    assert "the upstream answered 429" in u.engines["front-rpm"].output()


@contextlib.contextmanager
def holding(u: Upstreams) -> Iterator[None]:
    """The upstream key of concurrency 1 held: a stream straight to the upstream (no 6 s deadline: 40
    tokens, 8 s) whose first token arrived (the upstream holds the key's one slot until that stream
    ends), let go when the block ends (the client leaves)."""
    body = {**CHAT, "model": "up-drip", "stream": True}
    with httpx.stream("POST", f"{u.up.base_url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {u.one_key}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while '"content"' not in next(lines):
            pass
        yield


def wait_until(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_upstream_429_is_retried_while_the_deadline_allows(u: Upstreams) -> None:
    """A key of concurrency 1 at the upstream: while one stream holds it, the engine's tries get 429
    (Retry-After 1 s) and succeed once it is let go; with its tries spent first, the client gets the
    429. Ordered by what is seen (the holder's first token, the engine's retry), never by sleeping."""
    engine = u.engines["front-one"]
    with cf.ThreadPoolExecutor(1) as pool:
        with holding(u):
            asked = pool.submit(post, u.front.base_url, {**CHAT, "model": "front-one", "max_tokens": 2})
            wait_until(lambda: "upstream server is rate limited" in engine.output())
        r = asked.result()
    assert r.status_code == 200, r.text
    assert "trying again" in engine.output()
    with holding(u):
        r = post(u.front.base_url, {**CHAT, "model": "front-one-brief", "max_tokens": 2})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "model_overloaded" and r.headers["retry-after"] == "1"
    assert r.json()["error"]["message"] == "The model's upstream server is rate limited."


def test_no_upstream_is_retried_then_unavailable(u: Upstreams) -> None:
    started = time.monotonic()
    r = post(u.front.base_url, {**CHAT, "model": "front-down"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "model_unavailable" and r.headers["retry-after"] == "1"
    assert time.monotonic() - started > 0.5  # three tries, backing off
    assert u.engines["front-down"].output().count("trying again") >= 3


def test_an_upstream_5xx_before_output_is_retried_then_unavailable(u: Upstreams) -> None:
    r = post(u.front.base_url, {**CHAT, "model": "front-cold"})  # the upstream answers 503: no engine
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "model_unavailable" and int(r.headers["retry-after"]) >= 1
    assert u.engines["front-cold"].output().count("trying again") >= 3


def test_a_connection_cut_after_output_is_a_clean_error_event(u: Upstreams) -> None:
    """The upstream gateway dies mid-stream: the client gets the tokens relayed so far, then one
    error event and [DONE], never a retried (duplicated) answer."""
    saved = u.up.base_url, u.up.port
    doomed = u.up.gateway(auth=True)
    doomed_url = u.up.base_url
    u.up.base_url, u.up.port = saved
    engine = u.front.engine("--kind", "upstream", "--base-url", f"{doomed_url}/v1", "--served-name", "front-cut",
                            "--upstream-model", "up-drip", model="front-cut", env={"CONDUIT_UPSTREAM_API_KEY": u.key})
    try:
        lines: list[str] = []
        with httpx.stream("POST", f"{u.front.base_url}/v1/chat/completions", timeout=30,
                          json={**CHAT, "model": "front-cut", "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 3:
                        doomed.kill()
        assert lines[-1] == "data: [DONE]" and '"engine_error"' in lines[-2], lines[-3:]
        tokens = [json.loads(x[6:])["choices"][0]["delta"].get("content") for x in lines[:-2]]
        assert 3 <= len(tokens) < 40 and set(tokens) <= {"tok ", None}
        assert "after output began" in engine.output()
    finally:
        engine.stop()


def test_many_streams_relay_every_token_once(u: Upstreams) -> None:
    """40 concurrent streams of numbered tokens through the relay: 0 lost, 0 duplicated, in order."""
    body = {**CHAT, "model": "front-num", "stream": True, "stream_options": {"include_usage": True}}

    def ask(_: int) -> tuple[str, int]:
        text, used = "", 0
        for chunk in sse(u.front.base_url, body):
            for c in chunk["choices"]:
                text += c["delta"].get("content") or ""
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
        return text, used

    with cf.ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(ask, range(40)))
    expected = "".join(f"{i} " for i in range(20))
    assert answers == [(expected, 20)] * 40


def test_a_hung_upstream_cannot_hold_a_job_past_its_deadline(u: Upstreams) -> None:
    started = time.monotonic()
    r = post(u.front.base_url, {**CHAT, "model": "front-slow"})
    assert r.status_code == 504, r.text
    assert time.monotonic() - started < 8
    # The engine let go too: its job ended (the upstream request closed) by the deadline.
    deadline = time.monotonic() + 5
    while "job " not in u.engines["front-slow"].output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert " rejected" in u.engines["front-slow"].output() or " cancelled" in u.engines["front-slow"].output()


def test_a_client_that_leaves_closes_the_upstream_request(u: Upstreams) -> None:
    before = engine_jobs(u.drip_metrics).get("cancelled", 0)
    hang_up_after(f"{u.front.base_url}/v1/chat/completions", {**CHAT, "model": "front-drip", "stream": True}, 2)
    # The upstream's engine saw its client (the upstream engine) go: the job it ran is cancelled.
    jobs = wait_for_jobs(u.drip_metrics, "cancelled", before + 1)
    assert jobs.get("cancelled", 0) == before + 1, jobs
    text = httpx.get(f"http://127.0.0.1:{u.front_metrics}/metrics").text
    assert re.search(r"^conduit_engine_backend_aborted_requests_total(\{[^}]*\})? 1(\.0)?$", text, re.M), text
    assert re.search(r"^conduit_engine_backend_unfinished_requests(\{[^}]*\})? 0(\.0)?$", text, re.M)


def test_models_auto_follows_the_upstream_s_list(u: Upstreams, tmp_path: Path) -> None:
    key_file = tmp_path / "upstream-key"
    key_file.write_text(u.key + "\n")
    auto = u.front.engine("--kind", "upstream", "--base-url", f"{u.up.base_url}/v1", "--models", "auto",
                          "--models-refresh-s", "0.5", "--upstream-api-key-file", str(key_file), model="up-drip")
    try:
        assert post(u.front.base_url, {**CHAT, "model": "up"}).json()["choices"][0]["message"]["content"]
        renamed = u.up.synthetic("up-renamed")
        u.front.wait_for_model("up-renamed", timeout=15)
        assert post(u.front.base_url, {**CHAT, "model": "up-renamed"}).status_code == 200
        renamed.stop()
        u.front.wait_for_model("up-renamed", present=False, timeout=20)
    finally:
        auto.stop()


class TlsFront(ThreadedServer):
    """A TLS-terminating TCP proxy (stdlib ``ssl`` + asyncio, on a thread) in front of a plain HTTP server."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self._target = target_port
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        super().__init__(ssl=ctx)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                w.close()

        ur, uw = await asyncio.open_connection("127.0.0.1", self._target)
        await asyncio.gather(pipe(r, uw), pipe(ur, w))


def test_tls_is_verified_against_the_ca_bundle(u: Upstreams, tmp_path: Path) -> None:
    """An upstream behind TLS with a private CA: with ``--upstream-ca-bundle`` it serves, without it
    the certificate is refused (verification is on by default) and the request fails cleanly."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                           str(cert), "-days", "1", "-subj", "/CN=localhost",
                           "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr
    proxy = TlsFront(u.up.port, cert, key)
    base = f"https://127.0.0.1:{proxy.port}/v1"
    env = {"CONDUIT_UPSTREAM_API_KEY": u.key}
    trusted = u.front.engine("--kind", "upstream", "--base-url", base, "--served-name", "front-tls",
                             "--upstream-model", "up", "--upstream-ca-bundle", str(cert), model="front-tls", env=env)
    untrusted = u.front.engine("--kind", "upstream", "--base-url", base, "--served-name", "front-tls-untrusted",
                               "--upstream-model", "up", "--upstream-retries", "1", model="front-tls-untrusted",
                               env=env)
    try:
        r = post(u.front.base_url, {**CHAT, "model": "front-tls"})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "tok tok tok tok tok "
        r = post(u.front.base_url, {**CHAT, "model": "front-tls-untrusted"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable", r.text
        assert "ConnectError" in untrusted.output() or "certificate" in untrusted.output()
    finally:
        trusted.stop()
        untrusted.stop()
        proxy.stop()
