"""Images through the upstream engine kind: a second Conduit gateway (keys on) with a diffusers engine
on the tiny Stable Diffusion pipeline is the upstream, and a first gateway (keys on) reaches it only
through upstream engines. Asked through the ``openai`` SDK where a client would, through httpx where
the exact status or raw events matter: answers equal the upstream's own, previews stream, ``url``
answers are the first gateway's own, the upstream's 400 maps to a 400, and an upstream engine not
declared an image engine (``--upstream-kinds``) gets no image jobs. Every request is answered once."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.harness import RedisServer, Stack, free_port
from tests.integration.test_delivery import engine_jobs, wait_for_jobs
from tests.integration.test_images import not_supported, sse
from tests.integration.test_upstream import create_key
from tests.openai_schema import validate

FAST = {"num_inference_steps": 2}
BODY: dict[str, Any] = {"model": "front-sd", "prompt": "a lighthouse at dusk", "size": "64x64", **FAST}


class Upstreams:
    """The upstream stack (``up``, its key ``up_key``) and the front stack (``front``, its key ``key``)."""

    up: Stack
    front: Stack
    up_key: str
    key: str
    up_metrics: int
    front_metrics: int


@pytest.fixture(scope="module")
def u(redis_server: RedisServer, tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    s = Upstreams()
    s.up = Stack(redis_server.url, tmp_path_factory.mktemp("upstream"))
    s.front = Stack(redis_server.url, tmp_path_factory.mktemp("front"))
    try:
        s.up.gateway(auth=True)
        s.up_key = s.up.api_key = create_key(s.up, "conduit-front")
        s.up_metrics, s.front_metrics = free_port(), free_port()
        s.up.diffusers("up-sd", "--metrics-port", str(s.up_metrics), path=tiny_sd_dir, timeout=120)
        s.front.gateway(auth=True)
        s.key = s.front.api_key = create_key(s.front, "client")
        base = f"{s.up.base_url}/v1"
        env = {"CONDUIT_UPSTREAM_API_KEY": s.up_key}
        s.front.engine("--kind", "upstream", "--base-url", base, "--served-name", "front-sd", "--upstream-model",
                       "up-sd", "--upstream-kinds", "image", "--metrics-port", str(s.front_metrics),
                       model="front-sd", env=env)
        # The same upstream model, declared by its operator as chat only (the default).
        s.front.engine("--kind", "upstream", "--base-url", base, "--served-name", "front-chat", "--upstream-model",
                       "up-sd", model="front-chat", env=env)
        yield s
    finally:
        s.front.stop()
        s.up.stop()


@pytest.fixture(scope="module")
def sdk(u: Upstreams) -> openai.OpenAI:
    return u.front.sdk()


def post(base_url: str, body: dict[str, Any], key: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60)


def image(b64: str) -> Image.Image:
    decoded = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    decoded.load()
    return decoded


def test_b64_json_equals_the_upstream_s_own_answer(u: Upstreams, sdk: openai.OpenAI) -> None:
    res = sdk.images.generate(model="front-sd", prompt="a red fox", n=2, size="64x64", response_format="b64_json",
                              extra_body={**FAST, "seed": 1234})
    direct = post(u.up.base_url, {"model": "up-sd", "prompt": "a red fox", "n": 2, "size": "64x64",
                                  "response_format": "b64_json", **FAST, "seed": 1234}, u.up_key)
    assert direct.status_code == 200, direct.text
    through = res.model_dump(exclude_unset=True)
    validate("ImagesResponse", through)
    want = direct.json()
    # The same seeds make the same images: byte for byte, in the same order, with the same usage.
    assert [(d["b64_json"], d["seed"]) for d in through["data"]] == [(d["b64_json"], d["seed"]) for d in want["data"]]
    assert [d["seed"] for d in want["data"]] == [1234, 1235]
    assert through["usage"] == want["usage"] and through["usage"]["input_tokens"] > 0
    assert (through["output_format"], through["background"]) == ("png", "opaque")
    for d in through["data"]:
        assert (image(d["b64_json"]).format, image(d["b64_json"]).size) == ("PNG", (64, 64))


def test_other_formats_and_sizes_are_reported_from_the_images(u: Upstreams) -> None:
    r = post(u.front.base_url, {**BODY, "size": "128x64", "output_format": "webp", "response_format": "b64_json"},
             u.key)
    assert r.status_code == 200, r.text
    validate("ImagesResponse", r.json())
    got = image(r.json()["data"][0]["b64_json"])
    assert (got.format, got.size, r.json()["output_format"]) == ("WEBP", (128, 64), "webp")


def test_previews_stream_through(u: Upstreams, sdk: openai.OpenAI) -> None:
    stream = sdk.images.generate(model="front-sd", prompt="a fox", stream=True, partial_images=2, size="64x64",
                                 extra_body={"num_inference_steps": 4})
    with stream:
        events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [getattr(e, "partial_image_index", None) for e in events[:2]] == [0, 1]
    assert all(image(e.b64_json).size == (64, 64) for e in events)
    assert events[-1].type == "image_generation.completed" and events[-1].usage.input_tokens > 0
    # Raw, n=2: two previews of each image, then both images, each event as OpenAI's schema has it.
    with httpx.stream("POST", f"{u.front.base_url}/v1/images/generations", timeout=60,
                      headers={"Authorization": f"Bearer {u.key}"},
                      json={**BODY, "n": 2, "stream": True, "partial_images": 2, "num_inference_steps": 4}) as r:
        assert r.status_code == 200, r.read()
        raw = sse(r)
    for name, data in raw:
        validate("ImageGenStreamEvent", json.loads(data))
        assert name == json.loads(data)["type"]
    assert [name for name, _ in raw].count("image_generation.partial_image") == 4
    assert [name for name, _ in raw][-2:] == ["image_generation.completed"] * 2


def test_url_answers_are_the_front_gateway_s_own(u: Upstreams, sdk: openai.OpenAI) -> None:
    res = sdk.images.generate(model="front-sd", prompt="a red fox", n=2, size="64x64", response_format="url",
                              extra_body=FAST)
    assert res.data is not None and len(res.data) == 2
    for d in res.data:
        assert d.url is not None and d.url.startswith(f"{u.front.base_url}/v1/images/files/"), d.url
        got = httpx.get(d.url, headers={"Authorization": f"Bearer {u.key}"}, timeout=30)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(got.content)).size == (64, 64)
        # Conduit keeps the image: the upstream was asked for b64_json and holds no file of it.
        name = d.url.rsplit("/", 1)[1]
        assert httpx.get(f"{u.up.base_url}/v1/images/files/{name}", timeout=30).status_code == 404


def test_the_upstream_s_400_is_a_400_with_its_message_and_param(u: Upstreams, sdk: openai.OpenAI) -> None:
    # 8 pixels wide passes both gateways' syntax check; the upstream's engine refuses it.
    r = post(u.front.base_url, {**BODY, "size": "8x64"}, u.key)
    direct = post(u.up.base_url, {**BODY, "model": "up-sd", "size": "8x64"}, u.up_key)
    assert r.status_code == direct.status_code == 400, r.text
    err, want = r.json()["error"], direct.json()["error"]
    assert (err["param"], err["message"], err["type"]) == ("size", want["message"], "invalid_request_error")
    with pytest.raises(openai.BadRequestError):
        sdk.images.generate(model="front-sd", prompt="a fox", size="8x64", extra_body=FAST)


def test_an_engine_not_declared_for_images_gets_no_image_jobs(u: Upstreams, sdk: openai.OpenAI) -> None:
    before = engine_jobs(u.up_metrics)
    # Answered as for any model without an image engine: a 404 at admission, no job.
    assert "v1/images/generations" in not_supported(post(u.front.base_url, {**BODY, "model": "front-chat"}, u.key))
    with pytest.raises(openai.NotFoundError):
        sdk.images.generate(model="front-chat", prompt="a fox", size="64x64")
    # And the image engine is not a chat engine.
    r = httpx.post(f"{u.front.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {u.key}"},
                   json={"model": "front-sd", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert "not a chat model" in not_supported(r)
    assert engine_jobs(u.up_metrics) == before


def test_every_request_is_answered_once(u: Upstreams) -> None:
    front, up = engine_jobs(u.front_metrics), engine_jobs(u.up_metrics)
    bodies = [{**BODY, "response_format": "b64_json"}, {**BODY, "response_format": "url", "n": 2},
              {**BODY, "stream": True, "partial_images": 1}] * 3

    def ask(body: dict[str, Any]) -> int:
        if not body.get("stream"):
            r = post(u.front.base_url, body, u.key)
            assert r.status_code == 200, r.text
            return len(r.json()["data"])
        with httpx.stream("POST", f"{u.front.base_url}/v1/images/generations", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {u.key}"}) as r:
            assert r.status_code == 200, r.read()
            return [name for name, _ in sse(r)].count("image_generation.completed")

    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        images = list(pool.map(ask, bodies))
    assert images == [1, 2, 1] * 3
    # One job each on both engines, every one ok: none tried twice, none failed.
    for port, jobs in ((u.front_metrics, front), (u.up_metrics, up)):
        ok = jobs.get("ok", 0) + len(bodies)
        assert wait_for_jobs(port, "ok", ok) == {**jobs, "ok": ok}
