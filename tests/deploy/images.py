"""Conduit's images built from ``compose/docker/`` as they are, the way a user without BuildKit can.

Debian's docker 20.10 has no BuildKit (no ``RUN --mount``), so ``buildah bud --isolation chroot``
builds each Dockerfile (``--layers``: a second build reuses every unchanged layer; ``--format
docker`` keeps the HEALTHCHECK), then ``buildah push IMG docker-daemon:IMG`` hands the image to
dockerd, skipped when dockerd already has that very image. The base images are the stand-ins
(``tests/deploy/bases.py``), copied from dockerd into buildah's storage under their own names.

CPU torch comes from PyTorch's CPU index in a user's build; here that index may be out of reach,
so ``torch_index()`` serves the wheel this machine's pip finds (its local wheel store, or
wherever ``.ci/install`` got it) as a one-package index on 127.0.0.1, passed as
``TORCH_INDEX_URL`` (a chroot build shares the host's network).
"""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import ROOT

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PYTHON_BASE = "python:3.11.14-slim-bookworm"
TORCH = "torch==2.13.0+cpu"


@dataclass(frozen=True)
class Image:
    """One image: its tag (as compose names it), Dockerfile, target stage and build arguments."""

    name: str
    dockerfile: str
    target: str | None = None
    build_args: dict[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"conduit/{self.name}:{VERSION}"


GATEWAY = Image("gateway", "gateway.Dockerfile")
DIFFUSERS_CPU = Image("diffusers-engine-cpu", "engine-cpu.Dockerfile", target="diffusers-engine-cpu")
VLLM_CPU = Image("vllm-engine-cpu", "engine-cpu.Dockerfile", target="vllm-engine-cpu")


@dataclass
class Built:
    """What one build took and made: seconds building, seconds handing to dockerd, bytes."""

    image: Image
    build_s: float
    push_s: float
    size: int


def _run(args: list[str], log: Path, timeout: float) -> None:
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(args)}\n".encode())
        f.flush()
        done = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{args[:3]} failed ({done.returncode}):\n{log.read_text(errors='replace')[-4000:]}")


def _image_id(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return done.stdout.strip().removeprefix("sha256:") if done.returncode == 0 else ""


def docker_id(ref: str) -> str:
    return _image_id(["docker", "image", "inspect", "--format", "{{.Id}}", ref])


def buildah_id(ref: str) -> str:
    return _image_id(["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", ref])


def hand_base_to_buildah(ref: str, log: Path) -> None:
    """The stand-in ``ref`` from dockerd into buildah's storage, unless buildah has it already."""
    if docker_id(ref) != buildah_id(ref):
        _run(["buildah", "pull", "-q", f"docker-daemon:{ref}"], log, 300)


def build(image: Image, log: Path, build_args: dict[str, str] | None = None, timeout: float = 1800) -> Built:
    """Build ``image`` with buildah and put it into dockerd."""
    t = time.monotonic()
    args = ["buildah", "bud", "--isolation", "chroot", "--layers", "--pull=false", "--format", "docker",
            "-f", f"compose/docker/{image.dockerfile}",
            "--ignorefile", f"compose/docker/{image.dockerfile}.dockerignore", "-t", image.tag]
    if image.target:
        args += ["--target", image.target]
    for k, v in {**image.build_args, **(build_args or {})}.items():
        args += ["--build-arg", f"{k}={v}"]
    _run([*args, str(ROOT)], log, timeout)
    built = time.monotonic()
    if docker_id(image.tag) != buildah_id(image.tag):
        _run(["buildah", "push", image.tag, f"docker-daemon:{image.tag}"], log, 900)
    size = int(_image_id(["docker", "image", "inspect", "--format", "{{.Size}}", image.tag]) or 0)
    return Built(image, built - t, time.monotonic() - built, size)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


@contextmanager
def torch_index(workdir: Path) -> Iterator[str]:
    """A package index on 127.0.0.1 holding the CPU torch wheel this machine's pip finds."""
    (workdir / "torch").mkdir(parents=True, exist_ok=True)
    if not list((workdir / "torch").glob("torch-*.whl")):
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                               str(workdir / "torch"), TORCH], capture_output=True, text=True, timeout=900)
        if done.returncode:
            raise RuntimeError(f"pip download {TORCH} failed:\n{done.stderr[-2000:]}")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(workdir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
