"""The images build from compose/docker/ as they are, and run as their Dockerfiles say."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.deploy import images
from tests.deploy.conftest import ImageBuilder

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(2400)]


def inspect(tag: str) -> dict:
    done = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)[0]["Config"]


def run(tag: str, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--entrypoint", entrypoint] if entrypoint else []
    return subprocess.run(["docker", "run", "--rm", *extra, tag, *args], capture_output=True, text=True, timeout=120)


def test_gateway_image_builds_and_runs_as_conduit(build_image: ImageBuilder) -> None:
    build_image(images.GATEWAY)
    tag = images.GATEWAY.tag
    config = inspect(tag)
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["conduit"] and config["Cmd"] == ["gateway"]
    assert "/health" in " ".join(config["Healthcheck"]["Test"]), "the HEALTHCHECK was lost in the build"
    done = run(tag, "-c", "import importlib.util, os, sys, gateway; print(os.getuid()); "
               "sys.exit(any(importlib.util.find_spec(m) for m in ('torch', 'vllm', 'diffusers')))",
               entrypoint="python")
    assert done.returncode == 0 and done.stdout.split() == ["10001"], done.stdout + done.stderr
    # The image's own `conduit`: what `docker compose exec gateway conduit keys ...` runs.
    done = run(tag, "keys", "--help")
    assert done.returncode == 0 and "create" in done.stdout, done.stderr
