"""``/v1/images/edits`` and ``/v1/images/variations`` from outside: real Redis, a keyed gateway and a
diffusers engine on the tiny Stable Diffusion pipeline, asked through the ``openai`` SDK where a client
would (``client.images.edit`` with one and several images, with and without a mask, b64 and url,
streamed with partial images), through httpx where the exact status, envelope, form or raw events
matter. Every answer and event is validated against OpenAI's schemas; every refusal is a 400 naming
its parameter, sent before anything is queued or stored.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.harness import RedisServer, Stack
from tests.integration.test_images import decode, envelope, sse
from tests.keyed import KeyedGateways
from tests.openai_schema import validate

MODEL = "tiny-sd"
CHAT_MODEL = "synthetic"
W, H = 96, 64
FAST = {"num_inference_steps": 4}
#: A small bound on an edit's body, so the 413 is cheap to reach; above the gateway's ``max_body_bytes``,
#: which binds every other request.
MAX_EDIT_BYTES = 1_000_000
MAX_BODY_BYTES = 400_000


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def picture(seed: int = 0, size: tuple[int, int] = (W, H)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def left_half_mask(size: tuple[int, int] = (W, H)) -> bytes:
    """Opaque but for the left half, fully transparent: the part to repaint."""
    m = Image.new("RGBA", size, (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    return png(m)


def bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def rgb(b64: str) -> np.ndarray:
    return np.asarray(decode(b64).convert("RGB"), dtype=np.int16)


class Edits:
    """The module's stack: one keyed gateway (``url``) with a small ``max_edit_bytes``, a tenant key and
    its SDK client, a diffusers engine (tiny SD) and a synthetic chat model (which edits nothing)."""

    def __init__(self, redis: RedisServer, workdir: Path, tiny_sd: Path) -> None:
        self.redis = redis
        self.stack = Stack(redis.url, workdir)
        self.gateways = KeyedGateways(self.stack, admin="admin-" + "e" * 24, count=0)
        self.gateways.procs.append(self.gateways.start(max_edit_bytes=MAX_EDIT_BYTES,
                                                                 max_body_bytes=MAX_BODY_BYTES))
        self.url = self.stack.base_url
        self.gateways.urls.append(self.url)
        self.key = self.stack.api_key = self.gateways.key()
        self.stack.synthetic(CHAT_MODEL)
        self.stack.diffusers(MODEL, path=tiny_sd, timeout=120)
        self.sdk = self.gateways.sdk(self.url, self.key)
        self.auth = {"Authorization": f"Bearer {self.key}"}

    def post(self, path: str = "edits", **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/images/{path}", headers=self.auth, timeout=60, **kwargs)

    def stored_inputs(self) -> list[bytes]:
        """The blob store's input pictures now (``in_`` references), whoever left them."""
        import redis

        with redis.Redis.from_url(self.redis.url) as client:
            return list(client.scan_iter(match=f"{self.stack.prefix}*in_*", count=1000))


@pytest.fixture(scope="module")
def edits(redis_server: RedisServer, tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edits]:
    e = Edits(redis_server, tmp_path_factory.mktemp("edits"), tiny_sd_dir)
    try:
        yield e
    finally:
        e.gateways.close()


# ---- the SDK --------------------------------------------------------------------------------------

def test_sdk_edits_one_image_as_b64_json(edits: Edits) -> None:
    source = png(picture(1))
    res = edits.sdk.images.edit(model=MODEL, image=("photo.png", source, "image/png"), prompt="a red fox",
                                response_format="b64_json", extra_body={**FAST, "seed": 11})
    validate("ImagesResponse", res.model_dump(exclude_none=True))
    (image,) = res.data
    got = decode(image.b64_json)  # type: ignore[arg-type]
    assert (got.format, got.size) == ("PNG", (W, H))  # the picture's size by default
    assert res.usage is not None and res.usage.input_tokens > 0 and res.usage.output_tokens == 0
    again = edits.sdk.images.edit(model=MODEL, image=("photo.png", source, "image/png"), prompt="a red fox",
                                  response_format="b64_json", extra_body={**FAST, "seed": 11})
    assert np.array_equal(rgb(image.b64_json), rgb(again.data[0].b64_json))  # type: ignore[arg-type]
    assert edits.stored_inputs() == []  # the upload is gone with the answer


def test_sdk_edits_several_images_n_times_each_as_urls(edits: Edits) -> None:
    files = [(f"p{i}.png", png(picture(i)), "image/png") for i in range(3)]
    res = edits.sdk.images.edit(model=MODEL, image=files, prompt="watercolor", n=2, size="64x64",
                                extra_body={**FAST, "seed": 3, "strength": 0.5})
    body = res.model_dump(exclude_none=True)
    validate("ImagesResponse", body)
    assert len(res.data) == 6 and [d.seed for d in res.data] == [3, 4, 5, 6, 7, 8]  # type: ignore[attr-defined]
    for image in res.data:
        assert image.url is not None and image.url.startswith(f"{edits.url}/v1/images/files/img_")
        got = httpx.get(image.url, timeout=10)  # the capability URL needs no key
        assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (64, 64)


def test_sdk_inpainting_keeps_every_unmasked_pixel_and_repaints_the_rest(edits: Edits) -> None:
    source = picture(2)
    res = edits.sdk.images.edit(model=MODEL, image=("photo.png", png(source), "image/png"),
                                mask=("mask.png", left_half_mask(), "image/png"), prompt="a moon",
                                response_format="b64_json", extra_body=FAST)
    validate("ImagesResponse", res.model_dump(exclude_none=True))
    got, original = rgb(res.data[0].b64_json), np.asarray(source, dtype=np.int16)  # type: ignore[arg-type]
    assert np.array_equal(got[:, W // 2:], original[:, W // 2:])
    assert np.abs(got[:, :W // 2] - original[:, :W // 2]).mean() > 10


def test_sdk_streams_partial_images_then_the_edit(edits: Edits) -> None:
    stream = edits.sdk.images.edit(model=MODEL, image=("photo.png", png(picture(3)), "image/png"), prompt="a fox",
                                   stream=True, partial_images=2, extra_body={"num_inference_steps": 6})
    with stream:
        events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [getattr(e, "partial_image_index", None) for e in events[:2]] == [0, 1]
    assert all(decode(e.b64_json).size == (W, H) for e in events)
    assert events[-1].usage.input_tokens > 0  # type: ignore[union-attr]


def test_raw_stream_events_validate_against_image_edit_stream_event(edits: Edits) -> None:
    files = [("image[]", ("a.png", png(picture(4)), "image/png")), ("image[]", ("b.png", png(picture(5)), "image/png")),
             ("mask", ("m.png", left_half_mask(), "image/png"))]
    data = {"model": MODEL, "prompt": "a fox", "stream": "true", "partial_images": "1", "output_format": "webp",
            "num_inference_steps": "4", "quality": "low"}
    with httpx.stream("POST", f"{edits.url}/v1/images/edits", files=files, data=data, headers=edits.auth,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    objs = [json.loads(data) for _, data in events]
    for (name, _), obj in zip(events, objs, strict=True):
        validate("ImageEditStreamEvent", obj)
        assert name == obj["type"] and obj["output_format"] == "webp" and obj["quality"] == "low"
        assert decode(obj["b64_json"]).format == "WEBP"
    kinds = [o["type"] for o in objs]
    assert kinds.count("image_edit.partial_image") == 2 and kinds.count("image_edit.completed") == 2
    assert kinds[-1] == "image_edit.completed"


def test_the_json_form_with_data_urls_edits_as_the_multipart_form_does(edits: Edits) -> None:
    source, mask = png(picture(6)), left_half_mask()
    url = "data:image/png;base64," + base64.b64encode(source).decode()
    mask_url = "data:image/png;base64," + base64.b64encode(mask).decode()
    r = edits.post(json={"model": MODEL, "prompt": "a boat", "images": [{"image_url": url}],
                         "mask": {"image_url": mask_url}, "seed": 21, "response_format": "b64_json", **FAST})
    assert r.status_code == 200, r.text
    validate("ImagesResponse", r.json())
    form = edits.post(files={"image": ("a.png", source, "image/png"), "mask": ("m.png", mask, "image/png")},
                      data={"model": MODEL, "prompt": "a boat", "seed": "21", "response_format": "b64_json",
                            "num_inference_steps": "4"})
    assert form.status_code == 200, form.text
    assert np.array_equal(rgb(r.json()["data"][0]["b64_json"]), rgb(form.json()["data"][0]["b64_json"]))


def test_sdk_variations_are_edits_without_a_prompt(edits: Edits) -> None:
    with pytest.warns(DeprecationWarning):  # the SDK marks dall-e-2's endpoint deprecated; it still sends it
        res = edits.sdk.images.create_variation(model=MODEL, image=("photo.png", png(picture(7)), "image/png"), n=2,
                                                response_format="b64_json", extra_body=FAST)
    validate("ImagesResponse", res.model_dump(exclude_none=True))
    assert len(res.data) == 2
    assert not np.array_equal(rgb(res.data[0].b64_json), rgb(res.data[1].b64_json))  # type: ignore[arg-type]


# ---- refusals -------------------------------------------------------------------------------------

def form(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "x", **fields}


PNG = png(picture(8))


@pytest.mark.parametrize("files, data, param, code", [
    ({"image": ("a.png", b"hello", "image/png")}, form(), "image", "invalid_image_format"),
    ({"image": ("a.gif", b"GIF89a" + bytes(32), "image/gif")}, form(), "image", "invalid_image_format"),
    ({"image": ("a.png", bomb(100_000, 100_000), "image/png")}, form(), "image", "image_too_large"),
    ({"image": ("a.png", PNG, "image/png"), "mask": ("m.png", PNG, "image/png")}, form(), "mask", "invalid_mask"),
    ({"image": ("a.png", PNG, "image/png"), "mask": ("m.png", left_half_mask((64, 64)), "image/png")}, form(),
     "mask", "invalid_mask"),
    ({"image": ("a.png", PNG, "image/png"), "mask": ("m.jpg", png(picture(9), "JPEG"), "image/jpeg")}, form(),
     "mask", "invalid_mask"),
    ({}, form(), "image", "missing_required_parameter"),
    ({"image": ("a.png", PNG, "image/png")}, {"model": MODEL}, "prompt", "missing_required_parameter"),
    ({"image": ("a.png", PNG, "image/png")}, form(n="11"), "n", "invalid_value"),
    ({"image": ("a.png", PNG, "image/png")}, form(n="two"), "n", "invalid_value"),
    ({"image": ("a.png", PNG, "image/png")}, form(strength="0"), "strength", "invalid_value"),
    ({"image": ("a.png", PNG, "image/png")}, form(size="100x100"), "size", "invalid_value"),
    ({"image": ("a.png", PNG, "image/png")}, form(partial_images="2"), "partial_images", None),
    ({"image": ("a.png", PNG, "image/png"), "photo": ("b.png", PNG, "image/png")}, form(), "photo", "invalid_value"),
])
def test_bad_multipart_edits_are_400_naming_the_parameter(edits: Edits, files: dict[str, Any], data: dict[str, str],
                                                          param: str, code: str | None) -> None:
    if not files:  # fields only, still as multipart/form-data
        files, data = {name: (None, value) for name, value in data.items()}, {}
    r = edits.post(files=files, data=data)
    assert r.status_code == 400, r.text
    err = envelope(r)
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert edits.stored_inputs() == []


def test_too_many_images_and_n_times_images_are_bounded(edits: Edits) -> None:
    many = [("image[]", (f"{i}.png", PNG, "image/png")) for i in range(17)]
    r = edits.post(files=many, data=form())
    assert r.status_code == 400 and envelope(r)["param"] == "image", r.text
    r = edits.post(files=many[:4], data=form(n="5"))  # 20 images: over 16
    assert r.status_code == 400 and envelope(r)["param"] == "n", r.text


@pytest.mark.parametrize("body, param, code", [
    ({"images": [{"file_id": "file-123"}]}, "images[0].file_id", "invalid_value"),
    ({"images": [{"image_url": "https://example.com/a.png"}]}, "images[0].image_url", "media_url_not_allowed"),
    ({"images": [{"image_url": "data:image/png,notbase64"}]}, "images[0].image_url", "invalid_value"),
    ({"images": [{"image_url": "data:image/png;base64,@@@"}]}, "images[0].image_url", "invalid_value"),
    ({"images": []}, "images", "missing_required_parameter"),
    ({"images": [{"image_url": "data:image/png;base64," + base64.b64encode(PNG).decode()}], "prompt": ""},
     "prompt", "missing_required_parameter"),
    ({"images": [{"image_url": "data:image/png;base64," + base64.b64encode(PNG).decode()}],
      "mask": {"image_url": "data:image/png;base64," + base64.b64encode(PNG).decode()}}, "mask", "invalid_mask"),
    ({"images": "a.png"}, "images", "invalid_value"),
])
def test_bad_json_edits_are_400_naming_the_parameter(edits: Edits, body: dict[str, Any], param: str, code: str) -> None:
    r = edits.post(json={"model": MODEL, "prompt": "x", **body})
    assert r.status_code == 400, r.text
    err = envelope(r)
    assert (err["param"], err["code"]) == (param, code), err


def test_malformed_and_unbounded_forms_are_refused(edits: Edits) -> None:
    boundary = "b0undary"
    head = {"Content-Type": f"multipart/form-data; boundary={boundary}", **edits.auth}

    def part(name: str, value: str) -> str:
        return f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"

    url = f"{edits.url}/v1/images/edits"
    unclosed = part("model", MODEL) + part("prompt", "x")  # no closing boundary
    twice = part("model", MODEL) + part("prompt", "x") + part("prompt", "y") + f"--{boundary}--\r\n"
    parts = "".join(part(f"f{i}", "1") for i in range(70)) + f"--{boundary}--\r\n"
    long_field = part("model", MODEL) + part("prompt", "x" * 200_000) + f"--{boundary}--\r\n"
    for body, param in ((unclosed, None), (twice, "prompt"), (parts, None), (long_field, "prompt")):
        r = httpx.post(url, content=body.encode(), headers=head, timeout=30)
        assert r.status_code == 400, r.text
        assert envelope(r)["param"] == param
    r = httpx.post(url, content=b"{}", headers={"Content-Type": "text/plain", **edits.auth}, timeout=30)
    assert r.status_code == 400 and envelope(r)["code"] == "invalid_content_type"
    r = edits.post("variations", json={"model": MODEL})  # variations take the form only
    assert r.status_code == 400 and envelope(r)["code"] == "invalid_content_type"


def test_a_body_over_max_edit_bytes_is_413_in_either_form(edits: Edits) -> None:
    big = bytes(MAX_EDIT_BYTES + 1)
    r = edits.post(files={"image": ("a.png", big, "image/png")}, data=form())
    assert r.status_code == 413 and envelope(r)["code"] == "request_too_large", r.text
    r = edits.post(json={"model": MODEL, "prompt": "x", "images": [{"image_url": "data:image/png;base64,"
                                                                    + base64.b64encode(big).decode()}]})
    assert r.status_code == 413, r.text
    # An edit may be larger than every other request's bound (max_body_bytes), up to its own.
    large = png(picture(10, (420, 400)))
    assert MAX_BODY_BYTES < len(large) < MAX_EDIT_BYTES
    r = edits.post(files={"image": ("a.png", large, "image/png")}, data=form(size="64x64", num_inference_steps="2"))
    assert r.status_code == 200, r.text
    r = httpx.post(f"{edits.url}/v1/images/generations", json=form(size="64x64", negative_prompt="x" * len(large)),
                   headers=edits.auth, timeout=30)
    assert r.status_code == 413, r.text
    assert edits.stored_inputs() == []


def test_edits_need_a_key_in_every_spelling_and_a_model_that_edits(edits: Edits) -> None:
    files = {"image": ("a.png", PNG, "image/png")}
    for path in ("/v1/images/edits", "//v1/images/edits", "/v1//images/edits", "/v1/images/variations"):
        r = httpx.post(f"{edits.url}{path}", files=files, data=form(), timeout=30)
        assert r.status_code in (401, 404), (path, r.status_code, r.text)
        assert r.status_code == 401 or envelope(r)["code"] != "model_not_found", (path, r.text)
    r = edits.post(files=files, data=form(model=CHAT_MODEL))
    assert r.status_code == 404 and envelope(r)["code"] == "model_not_supported", r.text
    with pytest.raises(openai.NotFoundError):
        edits.sdk.images.edit(model="no-such-model", image=("a.png", PNG, "image/png"), prompt="x")
    assert edits.stored_inputs() == []


def test_a_key_over_its_image_limit_is_429_and_stores_nothing(edits: Edits) -> None:
    admin = {"Authorization": f"Bearer {edits.gateways.admin}"}
    made = httpx.post(f"{edits.url}/admin/keys", json={"name": "ipm", "limits": {"ipm": 2}}, headers=admin, timeout=10)
    assert made.status_code == 201, made.text
    headers = {"Authorization": f"Bearer {made.json()['key']}"}
    files = [("image[]", ("a.png", PNG, "image/png")), ("image[]", ("b.png", PNG, "image/png"))]
    ok = httpx.post(f"{edits.url}/v1/images/edits", files=files, data=form(num_inference_steps="2"), headers=headers,
                    timeout=60)
    assert ok.status_code == 200, ok.text  # two pictures: two images, the key's minute
    r = httpx.post(f"{edits.url}/v1/images/edits", files=files[:1], data=form(num_inference_steps="2"),
                   headers=headers, timeout=60)
    assert r.status_code == 429 and envelope(r)["code"] == "rate_limit_exceeded", r.text
    assert edits.stored_inputs() == []


def test_odd_but_valid_and_odd_and_invalid_form_parts(edits: Edits) -> None:
    """A picture sent with only ``filename*`` is still a file; a text part in another charset is refused
    as malformed (the form's fields are UTF-8), never a 500; a variation takes no mask."""
    boundary = "b0undary"
    head = {"Content-Type": f"multipart/form-data; boundary={boundary}", **edits.auth}
    url = f"{edits.url}/v1/images/edits"

    def part(disposition: str, value: bytes, extra: str = "") -> bytes:
        return (f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n{extra}\r\n").encode() + value + b"\r\n"

    fields = part('name="model"', MODEL.encode()) + part('name="num_inference_steps"', b"2")
    star = part('name="image"; filename*=UTF-8\'\'b%C3%A9.png', PNG, "Content-Type: image/png\r\n")
    ok = httpx.post(url, content=fields + part('name="prompt"', b"x") + star + f"--{boundary}--\r\n".encode(),
                    headers=head, timeout=60)
    assert ok.status_code == 200, ok.text
    bogus = part('name="prompt"', "é".encode("latin-1"), "Content-Type: text/plain; charset=bogus\r\n")
    r = httpx.post(url, content=fields + bogus + star + f"--{boundary}--\r\n".encode(), headers=head, timeout=30)
    assert r.status_code == 400 and envelope(r)["code"] == "invalid_multipart", r.text
    r = edits.post("variations", files={"image": ("a.png", PNG, "image/png"), "mask": ("m.png", left_half_mask(),
                                                                                       "image/png")}, data=form())
    assert r.status_code == 400 and envelope(r)["param"] == "mask", r.text


def test_the_gateway_holds_a_bounded_amount_of_upload_bytes_at_once(edits: Edits) -> None:
    """Slow uploads hold what they sent, never more than 4 x max_edit_bytes together: past that an edit
    is a 503 ``server_busy`` at once; once they go, edits are served again."""
    import socket

    port = int(edits.url.rsplit(":", 1)[1])
    chunk = bytes(MAX_EDIT_BYTES - 100_000)
    head = (f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {edits.key}\r\n"
            f"Content-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: {MAX_EDIT_BYTES - 1}\r\n\r\n")
    part = b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    slow = []
    try:
        for _ in range(4):  # 4 x 0.9 of the bound: nearly all of the gateway's 4 x max_edit_bytes, and unfinished
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head.encode() + part + chunk)
            slow.append(s)
        deadline = time.monotonic() + 20
        while True:
            r = edits.post(files={"image": ("a.png", png(picture(13, (420, 400))), "image/png")},
                           data=form(size="64x64"))
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # (the slow uploads' bytes still on their way in)
        assert r.status_code == 503 and envelope(r)["code"] == "server_busy", r.text
    finally:
        for s in slow:
            s.close()
    deadline = time.monotonic() + 20
    while (r := edits.post(files={"image": ("a.png", PNG, "image/png")}, data=form(num_inference_steps="2"))
           ).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    assert edits.stored_inputs() == []


def test_uploads_count_in_the_backlogs_bytes(edits: Edits) -> None:
    """An edit's pictures count in its model's backlog as its job's bytes do (they are held in Redis while
    it is queued): a key's share of a small backlog refuses an edit whose pictures alone exceed it."""
    gateway = edits.gateways.start(max_backlog_bytes=600_000, max_edit_bytes=MAX_EDIT_BYTES)
    url = edits.stack.base_url
    try:
        edits.stack.wait_for_model(MODEL)
        small = httpx.post(f"{url}/v1/images/edits", files={"image": ("a.png", PNG, "image/png")},
                           data=form(num_inference_steps="2"), headers=edits.auth, timeout=60)
        assert small.status_code == 200, small.text
        big = png(picture(14, (420, 400)))  # more than the key's share (half of 600,000 bytes)
        r = httpx.post(f"{url}/v1/images/edits", files={"image": ("a.png", big, "image/png")},
                       data=form(size="64x64"), headers=edits.auth, timeout=60)
        assert r.status_code == 413 and envelope(r)["code"] == "request_too_large", r.text
        assert edits.stored_inputs() == []
    finally:
        gateway.stop()
