"""The upstream engine's image relay without a server: the body it sends, the kinds it announces,
the upstream's answer (JSON or SSE) read with bounds into images and usage (engines/upstream_images.py).
tests/integration/test_upstream_images.py runs it against a second Conduit gateway."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from PIL import Image

from engines.backend import JobRejected
from engines.cli import build_parser, upstream_settings
from engines.contract.messages import Job, Usage
from engines.upstream import UpstreamBackend, UpstreamSettings
from engines.upstream_images import IMAGE_FIELDS, ImageRelay, body_bound, image_header, image_request
from engines.upstream_reads import Retryable
from engines.upstream_relay import StreamBroke


class Out:
    """A JobOutput that records images."""

    def __init__(self) -> None:
        self.started_calls = 0
        self.images: list[dict[str, Any]] = []
        self.usage: Usage | None = None

    def started(self) -> None:
        self.started_calls += 1

    def delta(self, *args: Any) -> None:
        raise AssertionError("no deltas")

    async def image(self, data: bytes, **kw: Any) -> None:
        self.images.append({"data": data, **kw})

    def done(self, usage: Usage) -> None:
        self.usage = usage


def png(width: int = 16, height: int = 8, fmt: str = "PNG", mode: str = "RGB", **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), (200, 10, 10)).save(buf, format=fmt, **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def test_the_body_keeps_the_allowlist_and_asks_for_b64_json_or_a_stream() -> None:
    client = {"model": "front", "prompt": "a fox", "n": 2, "size": "16x8", "seed": 7, "num_inference_steps": 2,
              "response_format": "url", "user": "u-1", "metadata": {"a": "b"}, "store": True, "extra": 1}
    body = image_request(client, "up")
    assert body == {"model": "up", "prompt": "a fox", "n": 2, "size": "16x8", "seed": 7, "num_inference_steps": 2,
                    "response_format": "b64_json"}
    # A stream without previews is answered by one JSON body all the same (the gateway streams it).
    assert "stream" not in image_request({**client, "stream": True}, "up")
    streamed = image_request({**client, "stream": True, "partial_images": 2}, "up")
    assert streamed["stream"] is True and streamed["partial_images"] == 2 and "response_format" not in streamed
    assert {"prompt", "n", "size", "seed", "negative_prompt", "guidance_scale", "output_format"} <= IMAGE_FIELDS
    assert not {"model", "response_format", "stream", "user", "metadata"} & IMAGE_FIELDS


@pytest.mark.parametrize(("fmt", "mode", "save"), [
    ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("JPEG", "RGB", {"quality": 50}), ("JPEG", "RGB", {"progressive": True}),
    ("WEBP", "RGB", {}), ("WEBP", "RGB", {"lossless": True}), ("WEBP", "RGBA", {}), ("WEBP", "RGBA", {"exif": b"x"}),
])
def test_the_header_says_what_pil_reads(fmt: str, mode: str, save: dict[str, Any]) -> None:
    for width, height in ((64, 64), (1536, 8), (8, 1024)):
        data = png(width, height, fmt, mode, **save)
        assert image_header(data) == (fmt.lower(), width, height)
    for other in (b"", b"GIF89a" + bytes(40), b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBPVP8 "):
        assert image_header(other) == ("", 0, 0)


def test_the_body_bound_follows_n_and_size() -> None:
    small = body_bound({"prompt": "x", "size": "64x64"})
    assert small < body_bound({"prompt": "x", "size": "64x64", "n": 2}) < body_bound({"prompt": "x"})
    assert small < 2 * 1024 * 1024


def test_the_engine_announces_the_kinds_its_operator_declares() -> None:
    parse = build_parser().parse_args
    base = ["serve", "--kind", "upstream", "--served-name", "m", "--base-url", "https://up/v1"]
    assert UpstreamBackend(upstream_settings(parse(base))).kinds == {"chat", "completion"}
    s = upstream_settings(parse([*base, "--upstream-kinds", "image"]))
    assert UpstreamBackend(s).kinds == {"image"}
    assert UpstreamBackend(upstream_settings(parse([*base, "--upstream-kinds", "chat, image"]))).kinds == \
        {"chat", "image"}
    for bad in ("embedding", "chat,", ""):
        with pytest.raises(ValueError, match="--upstream-kinds"):
            upstream_settings(parse([*base, "--upstream-kinds", bad]))


async def test_a_json_answer_becomes_final_images_with_the_upstream_s_usage() -> None:
    out = Out()
    relay = ImageRelay(out, {"prompt": "a fox", "n": 2, "size": "16x8"}, "up")
    answer = {"created": 1, "data": [{"b64_json": b64(png()), "seed": 11}, {"b64_json": b64(png(fmt="JPEG"))}],
              "usage": {"input_tokens": 5, "output_tokens": 0, "total_tokens": 5}}
    await relay.read(chunks(json.dumps(answer).encode()), "application/json")
    assert [(i["index"], i["format"], i["width"], i["height"], i["seed"], i["partial"]) for i in out.images] == \
        [(0, "png", 16, 8, 11, None), (1, "jpeg", 16, 8, 0, None)]
    assert out.images[0]["data"] == png()
    assert out.usage == Usage(prompt_tokens=5) and out.started_calls >= 1 and relay.produced


async def test_without_the_upstream_s_seed_the_request_s_is_reported_and_usage_estimated() -> None:
    out = Out()
    relay = ImageRelay(out, {"prompt": "a fox at dusk", "n": 2, "seed": 40}, "up")
    answer = {"data": [{"b64_json": b64(png())}, {"b64_json": b64(png())}]}
    await relay.read(chunks(json.dumps(answer).encode()), "application/json")
    assert [i["seed"] for i in out.images] == [40, 41]
    assert out.usage == Usage(prompt_tokens=4)  # 13 characters, 4 a token, rounded up


@pytest.mark.parametrize(("answer", "why"), [
    ({"data": [{"url": "https://up/img.png"}]}, "without b64_json"),
    ({"data": [{"b64_json": "not base64!"}]}, "not base64"),
    ({"data": [{"b64_json": b64(b"GIF89a....")}]}, "not a PNG, JPEG or WebP"),
    ({"data": [{"b64_json": b64(png())}] * 3}, "3 images for n=2"),
    ({"data": []}, "no images"),
])
async def test_a_wrong_answer_is_a_clean_502_before_any_output(answer: dict[str, Any], why: str) -> None:
    out = Out()
    relay = ImageRelay(out, {"prompt": "a fox", "n": 2}, "up")
    with pytest.raises((Retryable, JobRejected)) as failed:
        await relay.read(chunks(json.dumps(answer).encode()), "application/json")
    error = failed.value.final if isinstance(failed.value, Retryable) else failed.value
    assert error.status == 502 and why in error.message
    assert out.images == [] and not relay.produced


async def test_a_body_past_the_bound_is_refused_without_reading_it_all() -> None:
    out = Out()
    relay = ImageRelay(out, {"prompt": "a fox", "size": "64x64"}, "up")
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 1
            yield b" " * 65536

    with pytest.raises(JobRejected, match="more than"):
        await relay.read(endless(), "application/json")
    assert sent * 65536 <= body_bound({"prompt": "a fox", "size": "64x64"}) + 65536


def event(kind: str, **data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


async def test_a_stream_relays_partials_then_finals_in_order() -> None:
    out = Out()
    relay = ImageRelay(out, {"prompt": "a fox", "n": 2, "stream": True, "partial_images": 1, "seed": 3}, "up")
    usage = {"input_tokens": 6, "output_tokens": 0, "total_tokens": 6, "input_tokens_details": {"text_tokens": 6}}
    stream = [event("image_generation.partial_image", b64_json=b64(png()), partial_image_index=0),
              event("image_generation.partial_image", b64_json=b64(png()), partial_image_index=0),
              event("image_generation.completed", b64_json=b64(png()), usage=usage),
              event("image_generation.completed", b64_json=b64(png(8, 8)), usage=usage)]
    await relay.read(chunks(*stream), "text/event-stream; charset=utf-8")
    assert [(i["index"], i["partial"], i["seed"]) for i in out.images] == \
        [(0, 0, 3), (1, 0, 4), (0, None, 3), (1, None, 4)]
    assert (out.images[-1]["width"], out.images[-1]["height"]) == (8, 8)
    assert out.usage == Usage(prompt_tokens=6)


async def test_a_stream_s_error_event_maps_before_output_and_breaks_after() -> None:
    error = b'event: error\ndata: {"error": {"message": "bad size", "type": "invalid_request_error", ' \
            b'"param": "size", "code": "invalid_value"}}\n\n'
    relay = ImageRelay(Out(), {"prompt": "a fox", "stream": True, "partial_images": 1}, "up")
    with pytest.raises(JobRejected) as refused:
        await relay.read(chunks(error), "text/event-stream")
    assert (refused.value.status, refused.value.param) == (400, "size") and "bad size" in refused.value.message
    relay = ImageRelay(Out(), {"prompt": "a fox", "stream": True, "partial_images": 1}, "up")
    with pytest.raises(StreamBroke):
        await relay.read(chunks(event("image_generation.partial_image", b64_json=b64(png()), partial_image_index=0),
                                error), "text/event-stream")
    # A stream that ends without its image.
    relay = ImageRelay(Out(), {"prompt": "a fox", "stream": True, "partial_images": 1}, "up")
    with pytest.raises(StreamBroke):
        await relay.read(chunks(event("image_generation.partial_image", b64_json=b64(png()), partial_image_index=0)),
                         "text/event-stream")


async def test_run_tries_again_before_output_and_never_after() -> None:
    answers = [httpx.Response(503, json={"error": {"message": "loading"}}, headers={"Retry-After": "0"}),
               httpx.Response(200, json={"data": [{"b64_json": b64(png())}]})]
    sent: list[dict[str, Any]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/images/generations"
        sent.append(json.loads(request.content))
        return answers.pop(0)

    backend = UpstreamBackend(UpstreamSettings(base_url="http://up/v1", served_names=["m"], upstream_model="up",
                                               kinds=["image"]))
    backend.client = httpx.AsyncClient(base_url="http://up/v1", transport=httpx.MockTransport(upstream))
    job = Job(id="j", kind="image", model="m", body=json.dumps({"model": "m", "prompt": "a fox", "user": "u"}).encode(),
              reply_to="", deadline_ms=int(time.time() * 1000) + 30_000)
    out = Out()
    await backend.run(job, out)
    assert len(sent) == 2 and sent[0] == {"model": "up", "prompt": "a fox", "response_format": "b64_json"}
    assert len(out.images) == 1 and out.usage == Usage(prompt_tokens=2)
    # A stream that breaks after a preview reached the job: a clean error, never a second try.
    answers[:] = [httpx.Response(200, headers={"content-type": "text/event-stream"}, content=event(
        "image_generation.partial_image", b64_json=b64(png()), partial_image_index=0))]
    sent.clear()
    stream = json.dumps({"model": "m", "prompt": "a fox", "stream": True, "partial_images": 1}).encode()
    with pytest.raises(StreamBroke):
        await backend.run(Job(id="k", kind="image", model="m", body=stream, reply_to="",
                              deadline_ms=job.deadline_ms), Out())
    assert len(sent) == 1 and sent[0]["stream"] is True
    with pytest.raises(JobRejected) as refused:
        await backend.run(Job(id="c", kind="chat", model="m", body=b"{}", reply_to="", deadline_ms=0), Out())
    assert refused.value.status == 501
    await backend.close()


def test_an_upstream_s_input_tokens_are_bounded_as_chat_s() -> None:
    from engines.upstream_images import _input_tokens
    from engines.upstream_relay import MAX_REPORTED_TOKENS

    assert _input_tokens({"input_tokens": 2**70}) == MAX_REPORTED_TOKENS
    assert _input_tokens({"input_tokens": 2**40}) == MAX_REPORTED_TOKENS
    assert _input_tokens({"input_tokens": 12}) == 12
    assert _input_tokens({"input_tokens": -3}) is None
