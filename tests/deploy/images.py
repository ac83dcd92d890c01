"""Conduit's images built from ``compose/docker/`` as they are, the way a user without BuildKit can.

Debian's docker 20.10 has no BuildKit (no ``RUN --mount``), so ``buildah bud --isolation chroot``
builds each Dockerfile (``--format docker`` keeps the HEALTHCHECK), then ``buildah push IMG
docker-daemon:IMG`` hands the image to dockerd. Not with ``--layers``: buildah 1.28's layer cache
mishandles ``RUN --mount=type=bind,from=<stage>`` (a cached stage's files are missing from the
mount, containers/buildah#4375; a changed stage does not invalidate the layer, #4522: a stale
image). Instead the whole image is the cache: it is labelled with a hash of its inputs (the
Dockerfile, the files its .dockerignore lets through, target, base image), and an image in
dockerd with the same label is not built again. The base images are the stand-ins
(``tests/deploy/bases.py``), copied from dockerd into buildah's storage under their own names.

CPU torch comes from PyTorch's CPU index in a user's build; here that index may be out of reach,
so ``torch_index()`` serves the wheel this machine's pip finds (its local wheel store, or
wherever ``.ci/install`` got it) as a one-package index on 127.0.0.1, passed as
``TORCH_INDEX_URL`` (a chroot build shares the host's network).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import http.server
import json
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
LABEL = "org.conduit.build-inputs"
#: What the build context holds (every .dockerignore of compose/docker/ lets in just these).
CONTEXT = ("pyproject.toml", "README.md", "gateway", "engines", "telemetry")


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
#: The CUDA images' stages before their CUDA wheels (~10 GB to download): what CI builds of them,
#: each under a tag of its own. Engine kind → Conduit's wheel (``conduit-wheel``), and the runtime
#: without its Python packages (``runtime-base``).
CUDA_WHEELS = {kind: Image(f"{kind}-engine-wheel", f"{kind}-engine.Dockerfile", target="conduit-wheel")
               for kind in ("vllm", "diffusers")}
CUDA_BASES = {kind: Image(f"{kind}-engine-base", f"{kind}-engine.Dockerfile", target="runtime-base")
              for kind in ("vllm", "diffusers")}


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


def inputs(image: Image) -> str:
    """A hash of everything the image is built from (bar the torch index's address)."""
    h = hashlib.sha256(json.dumps([image.name, image.dockerfile, image.target, image.build_args,
                                   docker_id(PYTHON_BASE)]).encode())
    docker = ROOT / "compose" / "docker"
    for path in [docker / image.dockerfile, docker / f"{image.dockerfile}.dockerignore",
                 *sorted(p for c in CONTEXT for p in ([ROOT / c] if (ROOT / c).is_file() else (ROOT / c).rglob("*"))
                         if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"))]:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def current_inputs(tag: str) -> str:
    return _image_id(["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{LABEL}"}}}}', tag])


@contextmanager
def _build_lock() -> Iterator[None]:
    """One build at a time on this machine (builds of several checkouts share buildah's storage)."""
    with open("/tmp/conduit-deploy-build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(image: Image, log: Path, build_args: dict[str, str] | None = None, timeout: float = 1800) -> Built | None:
    """Build ``image`` with buildah and put it into dockerd; None when dockerd has it from the same inputs."""
    label = inputs(image)
    if current_inputs(image.tag) == label:
        return None
    t = time.monotonic()
    args = ["buildah", "bud", "--isolation", "chroot", "--pull=false", "--format", "docker",
            "-f", f"compose/docker/{image.dockerfile}", "--label", f"{LABEL}={label}",
            "--ignorefile", f"compose/docker/{image.dockerfile}.dockerignore", "-t", image.tag]
    if image.target:
        args += ["--target", image.target]
    for k, v in {**image.build_args, **(build_args or {})}.items():
        args += ["--build-arg", f"{k}={v}"]
    with _build_lock():
        _run([*args, str(ROOT)], log, timeout)
        built = time.monotonic()
        superseded = docker_id(image.tag)
        _run(["buildah", "push", image.tag, f"docker-daemon:{image.tag}"], log, 900)
        # buildah keeps its copy only until dockerd has one: the label check above is dockerd's.
        _run(["buildah", "rmi", image.tag], log, 300)
        # Its untagged stage images too (a multi-stage build commits each stage); under the lock, so
        # no build of another checkout on this machine loses a stage it is about to use.
        subprocess.run(["buildah", "rmi", "--prune"], capture_output=True, timeout=300, check=False)
    # What a rebuild leaves behind would fill the disk within days (a vLLM image is 4 GB): the image
    # the tag named before, once nothing names it (by id, Docker would drop a tag of yours with it;
    # a container using it still keeps it).
    if superseded and superseded != docker_id(image.tag) and not _image_id(
            ["docker", "image", "inspect", "--format", "{{len .RepoTags}}{{len .RepoDigests}}", superseded]).strip("0"):
        subprocess.run(["docker", "image", "rm", superseded], capture_output=True, timeout=300, check=False)
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
