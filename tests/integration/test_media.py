"""No server-side request forgery through media URLs: neither a gateway nor an engine makes a
request to an address the media policy refuses (``engines.contract.media``, ``engines.media``).

A real HTTP server on 127.0.0.1 stands for what only the engines' network can reach (a metadata
service, an admin page): every test checks that it was never asked for anything it should not be.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address

import openai
import pytest
import redis

from engines.backend import JobRejected
from engines.contract.keys import Keys
from engines.contract.media import (
    ADDRESS_NOT_ALLOWED,
    FETCHING_OFF,
    MediaPolicy,
    MediaRefused,
    MediaTarget,
)
from engines.contract.messages import Codec, Done, Failed, Job
from engines.media import FETCH_FAILED, REDIRECTED, UNSUPPORTED_PART, MediaGate
from tests.harness import Stack

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


class MediaServer:
    """An HTTP server on 127.0.0.1 that records every path it is asked for."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                path = self.path.partition("?")[0]
                if path == "/img.png":
                    self._answer(200, "image/png", PNG)
                elif path == "/big.png":
                    self._answer(200, "image/png", b"\x89PNG" + b"0" * 300_000)
                elif path == "/page":
                    self._answer(200, "text/html", b"<html></html>")
                elif path == "/moved":
                    self._answer(302, "text/plain", b"", Location=server.url("/secret"))
                else:
                    self._answer(404, "text/plain", b"not here")

            def _answer(self, status: int, media_type: str, body: bytes, **headers: str) -> None:
                self.send_response(status)
                for name, value in {"Content-Type": media_type, "Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


@pytest.fixture
def media_server() -> Iterator[MediaServer]:
    server = MediaServer()
    yield server
    server.close()


def chat(*parts: dict[str, object]) -> dict[str, object]:
    return {"model": "synthetic", "messages": [{"role": "user", "content": [{"type": "text", "text": "what is it"},
                                                                            *parts]}]}


def image(url: str) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": url}}


def test_the_gateway_refuses_an_image_url_before_queueing(stack: Stack, media_server: MediaServer) -> None:
    stack.gateway()
    stack.synthetic()
    client = stack.sdk()
    for url in (media_server.url("/img.png"), "http://2130706433/img.png", "http://169.254.169.254/latest/meta-data/"):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**chat(image(url)))  # type: ignore[call-overload]
        assert (info.value.code, info.value.param) == (FETCHING_OFF, "messages[0].content[1].image_url.url")
    # Inline images pass.
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert client.chat.completions.create(**chat(image(data_url))).choices[0].message.content  # type: ignore[call-overload]
    with redis.Redis.from_url(stack.redis_url) as r:
        assert r.xinfo_stream(Keys(stack.prefix).jobs("synthetic"))["entries-added"] == 1  # the data: one
    assert media_server.hits == []


def direct_job(r: redis.Redis, keys: Keys, body: dict[str, object]) -> tuple[Job, str]:
    """A chat job written straight to the model's stream, as anything that can write to Redis could."""
    reply_to = keys.replies(f"test-{uuid.uuid4().hex[:6]}")
    r.xadd(reply_to, {b"h": b"1"})
    job = Job(id=uuid.uuid4().hex, kind="chat", model="synthetic", body=json.dumps(body).encode(),
              reply_to=reply_to, deadline_ms=int(time.time() * 1000) + 60_000)
    r.xadd(keys.jobs("synthetic"), {b"j": Codec().encode(job)})
    return job, reply_to


def final_event(r: redis.Redis, reply_to: str, timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, fields in r.xrange(reply_to, "-", "+"):
            if b"e" in fields:
                events = Codec().decode_events(fields[b"e"])[0]
                if events and isinstance(events[-1], (Done, Failed)):
                    return events[-1]
        time.sleep(0.05)
    raise TimeoutError(f"no final event on {reply_to}")


def test_an_engine_reached_directly_fetches_nothing_by_default(stack: Stack, media_server: MediaServer) -> None:
    """A job that never went through a gateway: the engine refuses its URL before the backend sees it,
    and the part shapes vLLM would read a URL from that no gateway lets through."""
    keys = Keys(stack.prefix)
    stack.synthetic(wait=False)
    with redis.Redis.from_url(stack.redis_url) as r:
        deadline = time.monotonic() + 30
        while not r.exists(keys.jobs("synthetic")) or not r.xinfo_groups(keys.jobs("synthetic")):
            assert time.monotonic() < deadline, "the engine never joined its stream"
            time.sleep(0.05)
        cases = [
            (image(media_server.url("/img.png")), FETCHING_OFF, "messages[0].content[1].image_url.url"),
            ({"type": "video_url", "video_url": {"url": media_server.url("/clip.mp4")}}, UNSUPPORTED_PART,
             "messages[0].content[1].type"),
            ({"image_url": media_server.url("/bare.png"), "uuid": "u1"}, UNSUPPORTED_PART,
             "messages[0].content[1].type"),
        ]
        for part, code, param in cases:
            _, reply_to = direct_job(r, keys, chat(part))
            event = final_event(r, reply_to)
            assert isinstance(event, Failed), event
            assert (event.status, event.code, event.param) == (400, code, param), event
        # A text part carrying a URL field vLLM would read beside a uuid: the field never reaches it.
        _, reply_to = direct_job(r, keys, chat({"type": "text", "text": "hi", "uuid": "u2",
                                                "image_url": media_server.url("/smuggled.png")}))
        assert isinstance(final_event(r, reply_to), Done)
    assert media_server.hits == []


# ---- the engine's gate, in this process ---------------------------------------------------------


def loopback_too(host: str, address: str) -> None:
    """An address check that lets this test's server on 127.0.0.1 be fetched (the real one never does)."""


async def test_a_name_that_resolves_to_loopback_is_refused_when_connecting(media_server: MediaServer) -> None:
    """The policy cannot know what a name resolves to (nor what it will resolve to later: DNS rebinding);
    the engine's resolver checks each address at connect time, and connects only to those."""
    gate = MediaGate(MediaPolicy(["localhost"]))
    try:
        job = Job(id="j", kind="chat", model="m", reply_to="r", deadline_ms=0,
                  body=json.dumps(chat(image(media_server.url("/img.png", host="localhost")))).encode())
        with pytest.raises(JobRejected) as info:
            await gate.prepare(job)
        assert (info.value.code, info.value.param) == (ADDRESS_NOT_ALLOWED, "messages[0].content[1].image_url.url")
        # A target that never went through the policy: the socket is refused all the same.
        with pytest.raises(MediaRefused) as refused:
            await gate.fetch(MediaTarget(url=media_server.url("/img.png"), host="127.0.0.1", port=media_server.port,
                                         address=IPv4Address("127.0.0.1")))
        assert refused.value.code == ADDRESS_NOT_ALLOWED
    finally:
        await gate.close()
    assert media_server.hits == []


async def test_an_allowed_image_is_fetched_once_and_inlined(media_server: MediaServer) -> None:
    gate = MediaGate(MediaPolicy(["localhost"]), max_bytes=200_000, address_check=loopback_too)
    try:
        body = chat(image(media_server.url("/img.png", host="localhost")),
                    {"type": "text", "text": "and", "cache_control": {"type": "ephemeral"}})
        job = Job(id="j", kind="chat", model="m", reply_to="r", deadline_ms=0, body=json.dumps(body).encode())
        prepared = json.loads((await gate.prepare(job)).body)
        assert prepared["messages"][0]["content"] == [
            {"type": "text", "text": "what is it"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}},
            {"type": "text", "text": "and"}]
        assert media_server.hits == ["/img.png"]
        # Several images of one request are fetched together, within one budget: the first refusal
        # refuses the request.
        two = chat(image(media_server.url("/img.png", host="localhost")),
                   image(media_server.url("/img.png?again", host="localhost")))
        prepared = json.loads((await gate.prepare(Job(id="j", kind="chat", model="m", reply_to="r", deadline_ms=0,
                                                      body=json.dumps(two).encode()))).body)
        assert [p["image_url"]["url"][:22] for p in prepared["messages"][0]["content"][1:]] == \
            ["data:image/png;base64,"] * 2
        mixed = chat(image(media_server.url("/img.png", host="localhost")),
                     image(media_server.url("/big.png", host="localhost")))
        with pytest.raises(JobRejected) as info:
            await gate.prepare(Job(id="j", kind="chat", model="m", reply_to="r", deadline_ms=0,
                                   body=json.dumps(mixed).encode()))
        assert (info.value.code, info.value.param) == (FETCH_FAILED, "messages[0].content[2].image_url.url")
        for path, code in (("/moved", REDIRECTED), ("/big.png", FETCH_FAILED), ("/page", FETCH_FAILED),
                           ("/missing.png", FETCH_FAILED)):
            job = Job(id="j", kind="chat", model="m", reply_to="r", deadline_ms=0,
                      body=json.dumps(chat(image(media_server.url(path, host="localhost")))).encode())
            with pytest.raises(JobRejected) as info:
                await gate.prepare(job)
            assert info.value.code == code, info.value.message
        assert "/secret" not in media_server.hits  # the redirect was not followed
    finally:
        await gate.close()
