"""``/v1/images/generations`` and ``/v1/images/files/{ref}`` from outside: real Redis, gateways and a
diffusers engine on the tiny Stable Diffusion pipeline, asked through the ``openai`` SDK where a
client would, and through httpx where the exact status, envelope or raw JSON matters.

Every request uses 64-pixel images and 2-4 steps: the tiny pipeline makes one in milliseconds.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.harness import RedisServer, Stack
from tests.openai_schema import validate

MODEL = "tiny-sd"
CHAT_MODEL = "synthetic"
FAST = {"num_inference_steps": 2}
BODY: dict[str, Any] = {"model": MODEL, "prompt": "a lighthouse at dusk", "size": "64x64", **FAST}
FILES = "/v1/images/files/"
#: Lifetime of url images on the second gateway: long enough for the fetch right after the
#: answer (this machine's 2 cores are shared), short enough to wait out.
SHORT_TTL_S = 2.0


class ImageStack(Stack):
    short_ttl_url: str


@pytest.fixture(scope="module")
def images(redis_server: RedisServer, tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ImageStack]:
    """One diffusers engine (tiny SD) and one synthetic chat engine behind two gateways: the
    second keeps url images for only ``SHORT_TTL_S`` (``base_url`` is the first, normal one)."""
    s = ImageStack(redis_server.url, tmp_path_factory.mktemp("images"))
    try:
        s.gateway(image_url_ttl_s=SHORT_TTL_S)
        s.short_ttl_url = s.base_url
        s.gateway()
        s.synthetic(CHAT_MODEL)
        s.diffusers(MODEL, path=tiny_sd_dir, timeout=120)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def sdk(images: ImageStack) -> openai.OpenAI:
    return images.sdk()


def post(stack: Stack, body: dict[str, Any], base: str | None = None) -> httpx.Response:
    return httpx.post(f"{base or stack.base_url}/v1/images/generations", json=body, timeout=60)


def envelope(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    validate("ErrorResponse", body)
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return image


def pixels(b64: str) -> bytes:
    return decode(b64).convert("RGB").tobytes()


# ---- b64_json and the response body ---------------------------------------------------------

def test_sdk_b64_json_is_a_64x64_png(sdk: openai.OpenAI) -> None:
    res = sdk.images.generate(model=MODEL, prompt="a red fox", response_format="b64_json", size="64x64",
                              extra_body=FAST)
    assert res.data is not None and len(res.data) == 1
    assert res.data[0].b64_json is not None
    image = decode(res.data[0].b64_json)
    assert (image.format, image.size) == ("PNG", (64, 64))
    assert isinstance((res.data[0].model_extra or {}).get("seed"), int)


def test_raw_body_validates_against_images_response(images: ImageStack) -> None:
    r = post(images, {**BODY, "response_format": "b64_json", "n": 2})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    validate("ImagesResponse", body)
    assert abs(body["created"] - time.time()) < 120
    assert len(body["data"]) == 2
    for image in body["data"]:
        assert set(image) == {"b64_json", "seed"}, image
        assert isinstance(image["seed"], int) and 0 <= image["seed"] < 2**63
    assert body["output_format"] == "png" and body["background"] == "opaque"
    # 64x64 is not one of the schema's sizes, and "auto" is not one of its qualities: left out.
    assert "size" not in body and "quality" not in body
    assert body["usage"]["input_tokens"] > 0


def test_reported_quality_is_one_the_schema_allows(images: ImageStack) -> None:
    r = post(images, {**BODY, "response_format": "b64_json", "quality": "low"})
    assert r.status_code == 200, r.text
    validate("ImagesResponse", r.json())
    assert r.json()["quality"] == "low"


# ---- url images -------------------------------------------------------------------------------

def test_sdk_url_serves_the_image(images: ImageStack, sdk: openai.OpenAI) -> None:
    res = sdk.images.generate(model=MODEL, prompt="a red fox", response_format="url", size="64x64", extra_body=FAST)
    assert res.data is not None and res.data[0].url is not None
    url = res.data[0].url
    assert url.startswith(f"{images.base_url}{FILES}"), url
    assert re.fullmatch(r"img_[0-9a-f]{32}\.png", url.rsplit("/", 1)[1]), url
    r = httpx.get(url)
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    assert (image.format, image.size) == ("PNG", (64, 64))


def test_url_is_the_default_and_follows_output_format(images: ImageStack) -> None:
    r = post(images, {**BODY, "output_format": "webp"})
    assert r.status_code == 200, r.text
    body = r.json()
    validate("ImagesResponse", body)
    assert set(body["data"][0]) == {"url", "seed"}
    got = httpx.get(body["data"][0]["url"])
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(got.content)).format == "WEBP"


@pytest.mark.parametrize("name", [
    "img_" + "0123456789abcdef" * 2 + ".png",  # well formed, never made
    "img_" + "0123456789abcdef" * 2 + ".gif",
    "img_" + "g" * 32 + ".png",
    "img_123.png",
    "nothing",
    "conduit:jobs:tiny-sd",  # not a way into other Redis keys
])
def test_unknown_or_malformed_file_is_404(images: ImageStack, name: str) -> None:
    r = httpx.get(f"{images.base_url}{FILES}{name}")
    assert r.status_code == 404, r.text
    envelope(r)


def test_expired_url_is_404(images: ImageStack) -> None:
    r = post(images, {**BODY, "response_format": "url"}, base=images.short_ttl_url)
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    assert url.startswith(f"{images.short_ttl_url}{FILES}"), url
    assert httpx.get(url).status_code == 200
    time.sleep(SHORT_TTL_S + 0.5)
    gone = httpx.get(url)
    assert gone.status_code == 404, gone.text
    envelope(gone)
    # Not only that gateway: the image itself expired, for every replica.
    assert httpx.get(url.replace(images.short_ttl_url, images.base_url)).status_code == 404


# ---- n, seeds, formats, sizes -----------------------------------------------------------------

def test_n3_gives_three_different_images(sdk: openai.OpenAI) -> None:
    res = sdk.images.generate(model=MODEL, prompt="three foxes", n=3, response_format="b64_json", size="64x64",
                              extra_body=FAST)
    assert res.data is not None and len(res.data) == 3
    images = [base64.b64decode(d.b64_json or "") for d in res.data]
    assert len(set(images)) == 3
    seeds = [(d.model_extra or {}).get("seed") for d in res.data]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == 3, seeds


def test_seed_makes_the_same_images_with_consecutive_seeds(images: ImageStack) -> None:
    seed = 1234567
    body = {**BODY, "response_format": "b64_json", "n": 3, "seed": seed}
    first, second = post(images, body).json(), post(images, body).json()
    assert [d["seed"] for d in first["data"]] == [seed, seed + 1, seed + 2]
    assert [d["seed"] for d in second["data"]] == [seed, seed + 1, seed + 2]
    assert [pixels(d["b64_json"]) for d in first["data"]] == [pixels(d["b64_json"]) for d in second["data"]]
    assert len({pixels(d["b64_json"]) for d in first["data"]}) == 3
    other = post(images, {**body, "n": 1, "seed": seed + 100}).json()
    assert pixels(other["data"][0]["b64_json"]) != pixels(first["data"][0]["b64_json"])


def test_seed_through_the_sdk(sdk: openai.OpenAI) -> None:
    def once() -> tuple[int, bytes]:
        res = sdk.images.generate(model=MODEL, prompt="a fox", response_format="b64_json", size="64x64",
                                  extra_body={**FAST, "seed": 42})
        assert res.data is not None
        return (res.data[0].model_extra or {})["seed"], pixels(res.data[0].b64_json or "")

    assert once() == once()


@pytest.mark.parametrize(("output_format", "pil_format", "compression"), [
    ("jpeg", "JPEG", None), ("jpeg", "JPEG", 30), ("webp", "WEBP", None), ("webp", "WEBP", 80), ("png", "PNG", 100),
])
def test_output_format(sdk: openai.OpenAI, output_format: str, pil_format: str, compression: int | None) -> None:
    extra = {"output_compression": compression} if compression is not None else {}
    res = sdk.images.generate(model=MODEL, prompt="a fox", response_format="b64_json", size="64x64",
                              output_format=output_format, extra_body=FAST, **extra)  # type: ignore[arg-type]
    assert res.data is not None and res.output_format == output_format
    image = decode(res.data[0].b64_json or "")
    assert (image.format, image.size) == (pil_format, (64, 64))


def test_jpeg_compression_changes_the_bytes(images: ImageStack) -> None:
    body = {**BODY, "response_format": "b64_json", "output_format": "jpeg", "seed": 7}
    small = post(images, {**body, "output_compression": 5}).json()["data"][0]["b64_json"]
    large = post(images, {**body, "output_compression": 95}).json()["data"][0]["b64_json"]
    assert len(base64.b64decode(small)) < len(base64.b64decode(large))


@pytest.mark.parametrize(("size", "expected"), [("64x128", (64, 128)), ("128x64", (128, 64)), ("auto", (64, 64))])
def test_size_is_width_by_height(images: ImageStack, size: str, expected: tuple[int, int]) -> None:
    r = post(images, {**BODY, "size": size, "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    validate("ImagesResponse", r.json())
    assert decode(r.json()["data"][0]["b64_json"]).size == expected


# ---- streaming ----------------------------------------------------------------------------------

def test_sdk_streams_partial_images_then_the_image(sdk: openai.OpenAI) -> None:
    stream = sdk.images.generate(model=MODEL, prompt="a fox", stream=True, partial_images=2, size="64x64",
                                 extra_body={"num_inference_steps": 4})
    with stream:
        events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [getattr(e, "partial_image_index", None) for e in events[:2]] == [0, 1]
    for event in events:
        image = decode(event.b64_json)
        assert (image.format, image.size) == ("PNG", (64, 64))
    assert events[-1].type == "image_generation.completed" and events[-1].usage.input_tokens > 0


def sse(r: httpx.Response) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE event in a response."""
    out: list[tuple[str | None, str]] = []
    name: str | None = None
    data: list[str] = []
    for line in r.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif not line and data:
            out.append((name, "\n".join(data)))
            name, data = None, []
    if data:
        out.append((name, "\n".join(data)))
    return out


@pytest.mark.parametrize("quality", ["high", "hd"])  # "hd" is not one of the stream events' qualities
def test_raw_stream_validates_against_image_gen_stream_event(images: ImageStack, quality: str) -> None:
    body = {**BODY, "stream": True, "partial_images": 2, "n": 2, "num_inference_steps": 4,
            "output_format": "webp", "quality": quality}
    with httpx.stream("POST", f"{images.base_url}/v1/images/generations", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert all(data != "[DONE]" for _, data in events)
    objs = [json.loads(data) for _, data in events]
    for (name, _), obj in zip(events, objs):
        validate("ImageGenStreamEvent", obj)
        assert name == obj["type"]
        assert obj["output_format"] == "webp" and obj["size"] == "auto"
        assert obj["quality"] == quality or quality == "hd"
        assert decode(obj["b64_json"]).format == "WEBP"
    kinds = [o["type"] for o in objs]
    assert kinds.count("image_generation.partial_image") == 4  # two previews of each of two images
    assert kinds.count("image_generation.completed") == 2
    assert kinds[-1] == "image_generation.completed"


def test_stream_without_partial_images_sends_only_the_image(images: ImageStack) -> None:
    with httpx.stream("POST", f"{images.base_url}/v1/images/generations", json={**BODY, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = sse(r)
    assert [name for name, _ in events] == ["image_generation.completed"]
    validate("ImageGenStreamEvent", json.loads(events[0][1]))


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "param"), [
    ({"size": "65x64"}, "size"),
    ({"size": "abc"}, "size"),
    ({"size": "0x64"}, "size"),
    ({"n": 0}, "n"),
    ({"n": 11}, "n"),
    ({"response_format": "gif"}, "response_format"),
    ({"output_format": "bmp"}, "output_format"),
    ({"quality": "ultra"}, "quality"),
    ({"background": "transparent"}, "background"),  # the engine's answer: SD pipelines draw no alpha
    ({"stream": True, "partial_images": 4}, "partial_images"),
    ({"output_compression": 101}, "output_compression"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 10000}, "num_inference_steps"),
    ({"guidance_scale": 51}, "guidance_scale"),
    ({"seed": -1}, "seed"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
])
def test_bad_field_is_400_naming_it(images: ImageStack, change: dict[str, Any], param: str) -> None:
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
    r = post(images, body)
    assert r.status_code == 400, r.text
    err = envelope(r)
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


def test_sdk_raises_bad_request(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(model=MODEL, prompt="a fox", n=11, size="64x64", extra_body=FAST)
    assert info.value.body["param"] == "n"  # type: ignore[index]


def test_unknown_model_is_404(images: ImageStack, sdk: openai.OpenAI) -> None:
    r = post(images, {**BODY, "model": "dall-e-99"})
    assert r.status_code == 404, r.text
    err = envelope(r)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        sdk.images.generate(model="dall-e-99", prompt="a fox", size="64x64")


def not_supported(r: httpx.Response) -> str:
    """The 404 OpenAI answers for a model that exists but not on this endpoint; its message."""
    assert r.status_code == 404, r.text
    err = envelope(r)
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "model", "model_not_supported"), err
    return str(err["message"])


def test_chat_with_the_image_model_is_404_before_any_job(images: ImageStack) -> None:
    """Refused at admission (the engines announce what they run), as OpenAI refuses a chat request
    for a model that is not a chat model: a 404 naming ``model``, not a job the engine answers 501."""
    r = httpx.post(f"{images.base_url}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert "not a chat model" in not_supported(r)
    r = httpx.post(f"{images.base_url}/v1/completions", timeout=60, json={"model": MODEL, "prompt": "hi"})
    assert "v1/completions" in not_supported(r)


def test_images_from_the_chat_model_is_404_before_any_job(images: ImageStack, sdk: openai.OpenAI) -> None:
    r = post(images, {**BODY, "model": CHAT_MODEL})
    assert "v1/images/generations" in not_supported(r)
    with pytest.raises(openai.NotFoundError):
        sdk.images.generate(model=CHAT_MODEL, prompt="a fox", size="64x64")
