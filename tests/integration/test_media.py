"""No server-side request forgery through media URLs: neither a gateway nor an engine makes a
request to an address the media policy refuses (``engines.contract.media``, ``engines.media``).

A real HTTP server on 127.0.0.1 stands for what only the engines' network can reach (a metadata
service, an admin page): every test checks that it was never asked for anything it should not be.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address

import openai
import pytest
import redis

from engines import media
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
        #: ``/slow.png`` answers after this long; ``slow_busy``: how many it is answering now, per
        #: ``?job=`` (``slow_most``: the most at once).
        self.slow_s = 0.5
        self.slow_busy: dict[str, int] = {}
        self.slow_most: dict[str, int] = {}
        lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                path = self.path.partition("?")[0]
                if path == "/img.png":
                    self._answer(200, "image/png", PNG)
                elif path == "/big.png":
                    self._answer(200, "image/png", b"\x89PNG" + b"0" * 300_000)
                elif path == "/slow.png":
                    job = self.path.partition("job=")[2].partition("&")[0]
                    with lock:
                        server.slow_busy[job] = server.slow_busy.get(job, 0) + 1
                        server.slow_most[job] = max(server.slow_most.get(job, 0), server.slow_busy[job])
                    try:
                        time.sleep(server.slow_s)
                        self._answer(200, "image/png", PNG)
                    finally:
                        with lock:
                            server.slow_busy[job] -= 1
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

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256  # many fetches at once are all accepted, none left to a SYN retry

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that gave up (a fetch past its time limit) is no error here

        self._httpd = Server(("127.0.0.1", 0), Handler)
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


def direct_job(r: redis.Redis, keys: Keys, body: dict[str, object], kind: str = "chat") -> tuple[Job, str]:
    """A chat job (or another kind with a chat body) written straight to the model's stream, as
    anything that can write to Redis could."""
    reply_to = keys.replies(f"test-{uuid.uuid4().hex[:6]}")
    r.xadd(reply_to, {b"h": b"1"})
    job = Job(id=uuid.uuid4().hex, kind=kind, model="synthetic", body=json.dumps(body).encode(),
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
    and the part shapes vLLM would read a URL from that no gateway lets through; an ``input_tokens``
    job's chat body too (vLLM renders it as a chat job's, fetching its images)."""
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
        for (part, code, param), kind in itertools.product(cases, ("chat", "input_tokens")):
            _, reply_to = direct_job(r, keys, chat(part), kind)
            event = final_event(r, reply_to)
            assert isinstance(event, Failed), (kind, event)
            assert (event.status, event.code, event.param) == (400, code, param), (kind, event)
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


async def test_one_job_with_many_images_neither_outlives_its_limit_nor_holds_up_other_jobs(
        media_server: MediaServer) -> None:
    """A job's whole fetch step, waiting for a slot included, is bounded by the gate's timeout and the
    job's deadline, and one job fetches only a few images at once: a request with many images on a
    slow allowed host neither runs on past its limit nor makes other jobs' images wait behind its own."""
    gate = MediaGate(MediaPolicy(["localhost"]), timeout_s=1.0, address_check=loopback_too)
    many = chat(*(image(media_server.url(f"/slow.png?job=many&n={n}", host="localhost")) for n in range(128)))
    one = chat(image(media_server.url("/slow.png?job=one", host="localhost")))

    async def timed(body: dict[str, object], deadline_ms: int) -> tuple[float, object]:
        started = time.monotonic()
        try:
            outcome: object = await gate.prepare(Job(id="j", kind="chat", model="m", reply_to="r",
                                                     deadline_ms=deadline_ms, body=json.dumps(body).encode()))
        except JobRejected as exc:
            outcome = exc
        return time.monotonic() - started, outcome

    try:
        first = asyncio.create_task(timed(many, int(time.time() * 1000) + 1000))
        await asyncio.sleep(0.1)  # the many-image job has taken what it can
        (one_s, one_outcome), (many_s, many_outcome) = await asyncio.gather(timed(one, 0), first)
    finally:
        await gate.close()
    print(f"job with 128 images took {many_s:.2f} s ({type(many_outcome).__name__}); "
          f"another job's single image took {one_s:.2f} s; most at once {media_server.slow_most}")
    # 128 images at 0.5 s each, 16 at a time, would take at least 4 s: the job is refused at its
    # limit (1 s) instead, naming an image it had not fetched.
    assert isinstance(many_outcome, JobRejected) and many_outcome.code == FETCH_FAILED, many_outcome
    assert many_outcome.param is not None and many_outcome.param.endswith(".image_url.url")
    assert many_s < 3.0
    # The other job's image did not wait behind the first job's (at least 4.5 s if it had).
    assert isinstance(one_outcome, Job), one_outcome
    assert one_s < 3.0
    assert media_server.slow_most["many"] <= media.MAX_FETCHES_PER_JOB < media.MAX_FETCHES
