"""Image jobs through the whole stack (real Redis, gateway and diffusers engines on the tiny
pipeline): a client that leaves stops its denoising, a request joins a running batch, a job
whose engine dies is finished by another, and the directory image store.

Engine behaviour is read from the engine's own Prometheus metrics (``--metrics-port``):
``conduit_engine_denoise_steps_total`` (UNet calls), ``conduit_engine_images_total`` by
``joined``, ``conduit_engine_jobs_total`` by outcome.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from engines.contract.store import valid_ref
from tests.harness import Stack, free_port

MODEL = "tiny-sd"


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of one counter's samples whose labels include ``labels``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    total = 0.0
    for m in re.finditer(rf"^{name}(?:\{{([^}}]*)\}})? ([\d.e+]+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def max_diff(a: str, b: str) -> int:
    """Largest per-pixel difference (uint8 levels) of two base64 images."""
    import io

    import numpy as np
    from PIL import Image

    def pixels(b64: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)

    return int(np.abs(pixels(a) - pixels(b)).max())


def wait_until(predicate: object, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def generate(stack: Stack, timeout: float = 60, **body: object) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/images/generations", timeout=timeout,
                      json={"model": MODEL, "prompt": "a lighthouse", "size": "64x64", **body})


def test_a_client_that_leaves_stops_its_denoising(stack: Stack, tiny_sd_dir: Path) -> None:
    port = free_port()
    stack.gateway()
    stack.diffusers(MODEL, "--metrics-port", str(port), path=tiny_sd_dir, timeout=120)
    # 10 images of 150 steps at 128 px: seconds of work, far more than the client waits.
    with pytest.raises(httpx.ReadTimeout):
        generate(stack, timeout=1.0, n=10, size="128x128", num_inference_steps=150, response_format="b64_json")
    wait_until(lambda: metric(port, "conduit_engine_jobs_total", outcome="cancelled") == 1, what="the cancel")
    time.sleep(0.3)  # a step under way when the cancel came may still finish
    steps = metric(port, "conduit_engine_denoise_steps_total")
    time.sleep(1.0)
    assert metric(port, "conduit_engine_denoise_steps_total") == steps, "denoising went on after the client left"
    assert 0 < steps < 150
    # The engine is free again: a new request is answered at once.
    assert generate(stack, num_inference_steps=2).status_code == 200


def test_a_request_joins_a_running_batch(stack: Stack, tiny_sd_dir: Path) -> None:
    port = free_port()
    stack.gateway()
    stack.diffusers(MODEL, "--metrics-port", str(port), path=tiny_sd_dir, timeout=120)
    results: dict[str, httpx.Response] = {}
    long = threading.Thread(target=lambda: results.setdefault(
        "long", generate(stack, num_inference_steps=150, size="128x128", seed=1)))
    long.start()
    wait_until(lambda: metric(port, "conduit_engine_denoise_steps_total") >= 3, what="the long job to run")
    short = generate(stack, num_inference_steps=3, size="128x128", seed=2, response_format="b64_json")
    long.join()
    assert short.status_code == 200 and results["long"].status_code == 200
    assert results["long"].elapsed > short.elapsed  # it finished within the long one's run
    assert metric(port, "conduit_engine_images_total", joined="true") == 1
    assert metric(port, "conduit_engine_images_total", joined="false") == 1
    # The image that joined midway is the one its seed makes alone (see test_diffusers_engine for
    # the tolerance: exact on this CPU).
    alone = generate(stack, num_inference_steps=3, size="128x128", seed=2, response_format="b64_json")
    assert metric(port, "conduit_engine_images_total", joined="false") == 2
    assert max_diff(short.json()["data"][0]["b64_json"], alone.json()["data"][0]["b64_json"]) <= 2


def test_an_image_job_whose_engine_dies_is_finished_by_another(stack: Stack, tiny_sd_dir: Path) -> None:
    port = free_port()
    stack.gateway()
    doomed = stack.diffusers(MODEL, "--metrics-port", str(port), "--reclaim-idle-ms", "1000", path=tiny_sd_dir,
                             timeout=120)
    results: dict[str, httpx.Response] = {}
    client = threading.Thread(target=lambda: results.setdefault("r", generate(
        stack, n=2, size="128x128", num_inference_steps=150, seed=5, response_format="b64_json")))
    client.start()
    wait_until(lambda: metric(port, "conduit_engine_denoise_steps_total") >= 2, what="the job to start")
    doomed.kill()
    stack.diffusers(MODEL, "--reclaim-idle-ms", "1000", path=tiny_sd_dir, timeout=120)
    client.join(timeout=120)
    r = results["r"]
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [5, 6]
    assert all(base64.b64decode(d["b64_json"]).startswith(b"\x89PNG") for d in data)


def test_the_directory_store_serves_urls_and_forgets_b64_images(stack: Stack, tiny_sd_dir: Path,
                                                                tmp_path: Path) -> None:
    shared = tmp_path / "images"
    stack.gateway(image_store=str(shared))
    stack.diffusers(MODEL, "--image-store", str(shared), path=tiny_sd_dir, timeout=120)
    r = generate(stack, num_inference_steps=2, output_format="webp")
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    name = url.rpartition("/")[2]
    assert valid_ref(name) and (shared / name).is_file()
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    assert got.content == (shared / name).read_bytes()
    # b64_json answers read their images once and delete them.
    r = generate(stack, num_inference_steps=2, response_format="b64_json", n=2)
    assert r.status_code == 200, r.text
    wait_until(lambda: sorted(p.name for p in shared.iterdir()) == [name], timeout=5, what="b64 images deleted")
