"""Every file in ``examples/`` run as a user would, against the live stack: a gateway with API
keys on, the real vLLM engine on the tiny Llama and a diffusers engine on the tiny pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import MODEL, VllmStack
from tests.harness import ROOT

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def env(vllm_stack: VllmStack, tiny_sd_dir: Path) -> Iterator[dict[str, str]]:
    """A keyed gateway beside the suite's open one (same Redis prefix, same engines), a key made
    with `conduit keys create`, and the environment the examples read."""
    images = vllm_stack.diffusers("tiny-sd", path=tiny_sd_dir, timeout=120)
    open_url, open_port = vllm_stack.base_url, vllm_stack.port
    vllm_stack.gateway(auth=True)
    keyed_url = vllm_stack.base_url
    vllm_stack.base_url, vllm_stack.port = open_url, open_port  # the other e2e tests keep the open one
    made = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "create", "--name", "examples",
                           "--redis-url", vllm_stack.redis_url, "--key-prefix", vllm_stack.prefix],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    yield {**os.environ, "CONDUIT_URL": f"{keyed_url}/v1", "OPENAI_API_KEY": made.stdout.strip(), "MODEL": MODEL,
           "IMAGE_MODEL": "tiny-sd"}
    # The suite's stack is as it was: its last test stops the vLLM engine and expects no live engine.
    images.stop()
    vllm_stack.procs.remove(images)


def run(env: dict[str, str], *argv: str) -> str:
    done = subprocess.run(list(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_openai_sdk_example(env: dict[str, str]) -> None:
    out = run(env, sys.executable, str(EXAMPLES / "openai_sdk.py"))
    assert "CompletionUsage(" in out and "get_weather" in out


def test_images_example(env: dict[str, str]) -> None:
    out = run(env, sys.executable, str(EXAMPLES / "images.py"))
    assert "image 0:" in out and "seed 7" in out and "image 1:" in out and "seed 8" in out
    assert "-> image/jpeg" in out
    assert out.count("stream: image_generation.partial_image") == 2
    assert out.count("stream: image_generation.completed") == 1
    assert "edit: the right half kept pixel for pixel: True" in out


def test_errors_example(env: dict[str, str]) -> None:
    out = run(env, sys.executable, str(EXAMPLES / "errors.py"))
    assert "401: invalid_api_key" in out
    assert "404: model_not_found param model" in out
    assert "400: invalid_value param temperature" in out


def test_langchain_example(env: dict[str, str]) -> None:
    out = run(env, sys.executable, str(EXAMPLES / "langchain_chat.py"))
    assert out.strip()


def test_curl_example(env: dict[str, str]) -> None:
    out = run(env, "bash", str(EXAMPLES / "curl.sh"))
    assert '"object":"list"' in out and '"chat.completion"' in out and "data: [DONE]" in out
    assert '"text_completion"' in out and "/v1/images/files/img_" in out
