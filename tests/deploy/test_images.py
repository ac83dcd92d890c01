"""The images build from compose/docker/ as they are, and run as their Dockerfiles say."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.deploy import images
from tests.deploy.conftest import ImageBuilder
from tests.harness import ROOT

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(2400)]


def inspect(tag: str) -> dict:
    done = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)[0]["Config"]


def run(tag: str, *args: str, entrypoint: str | None = None,
        user: str | None = None) -> subprocess.CompletedProcess[str]:
    extra = (["--entrypoint", entrypoint] if entrypoint else []) + (["--user", user] if user else [])
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


# ---- the CUDA images, up to their CUDA wheels ---------------------------------------------------
# A full build downloads ~10 GB (compose/README.md, "Building the CUDA images"); these build the
# stages before that download, which is everything of the image but its Python packages.

#: A C program, compiled the way Triton compiles its launcher (gcc + libc headers).
C_PROGRAM = "#include <stdio.h>\\nint main(void) { return ferror(stdout); }\\n"
CXX_PROGRAM = "#include <iostream>\\nint main() { return std::cout.fail(); }\\n"
WHEEL_REPORT = """
import glob, json, zipfile
[path] = glob.glob("/wheels/*")
wheel = zipfile.ZipFile(path)
names = wheel.namelist()
info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
print(json.dumps({"path": path, "names": names,
                  "entry_points": wheel.read(info + "/entry_points.txt").decode(),
                  "metadata": wheel.read(info + "/METADATA").decode()}))
"""


@pytest.mark.parametrize("kind", sorted(images.CUDA_WHEELS))
def test_cuda_image_builds_conduits_own_wheel(build_image: ImageBuilder, kind: str) -> None:
    """The conduit-wheel stage: one wheel, no dependency, with the `conduit` command and every
    module of the build context (the .dockerignore lets them all in)."""
    image = images.CUDA_WHEELS[kind]
    build_image(image)
    done = run(image.tag, "-c", WHEEL_REPORT, entrypoint="python")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["path"] == f"/wheels/conduit_gateway-{images.VERSION}-py3-none-any.whl"
    [script] = [ln for ln in report["entry_points"].split("[console_scripts]")[1].splitlines() if ln.strip()][:1]
    assert script.replace(" ", "") == "conduit=gateway.cli:main"
    assert "gateway/cli.py" in report["names"]
    ours = {str(p.relative_to(ROOT)) for c in ("gateway", "engines", "telemetry") for p in (ROOT / c).rglob("*.py")
            if "__pycache__" not in p.parts}
    assert ours == {n for n in report["names"] if n.endswith(".py")}
    assert "Provides-Extra: gpu" in report["metadata"]
    assert 'Requires-Dist: vllm<0.33,>=0.32; extra == "gpu"' in report["metadata"]


@pytest.mark.parametrize("kind", sorted(images.CUDA_BASES))
def test_cuda_runtime_base_is_the_image_but_its_python_packages(build_image: ImageBuilder, kind: str) -> None:
    """runtime-base: the engine's entrypoint, health check and environment, gcc, the conduit user
    owning the cache and model folders, and an empty venv the image's wheels go into."""
    image = images.CUDA_BASES[kind]
    build_image(image)
    config = inspect(image.tag)
    assert config["Entrypoint"] == ["conduit", "engine", "--kind", kind]
    assert config["Cmd"] == ["--model", "/models/model", "--metrics-port", "9100"]
    probe = config["Healthcheck"]["Test"]
    assert probe[:3] == ["CMD", "python", "-c"] and "http://127.0.0.1:9100/ready" in probe[3]
    assert config["StopSignal"] == "SIGTERM" and list(config["ExposedPorts"]) == ["9100/tcp"]
    env = dict(e.split("=", 1) for e in config["Env"])
    caches = {"XDG_CACHE_HOME": "/var/cache/conduit", "HF_HOME": "/var/cache/conduit/huggingface",
              "TRITON_CACHE_DIR": "/var/cache/conduit/triton"}
    if kind == "diffusers":
        caches["TORCHINDUCTOR_CACHE_DIR"] = "/var/cache/conduit/inductor"
    assert {k: env.get(k) for k in caches} == caches
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert env["VIRTUAL_ENV"] == "/opt/conduit" and env["PATH"].startswith("/opt/conduit/bin:")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1" and env["DO_NOT_TRACK"] == "1"

    folders = ["/var/cache/conduit", "/models"] + (["/var/lib/conduit/images"] if kind == "diffusers" else [])
    script = (f"id -u conduit; id -g conduit; stat -c %u:%g:%a {' '.join(folders)}; command -v pip; "
              "python -c 'import importlib.util as u; print([m for m in (\"gateway\", \"torch\", \"vllm\", "
              "\"diffusers\") if u.find_spec(m)])'; "
              f"cd /tmp && printf '{C_PROGRAM}' > t.c && gcc t.c -o t && ./t && echo compiled")
    if kind == "diffusers":  # Inductor's C++ wrappers
        script += f" && printf '{CXX_PROGRAM}' > t.cpp && g++ t.cpp -o tpp && ./tpp && echo compiled"
    done = run(image.tag, "-c", script, entrypoint="sh", user="10001:10001")  # as the final image runs
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.split()
    assert lines[:2] == ["10001", "10001"], "the conduit user and group are 10001"
    assert lines[2:2 + len(folders)] == ["10001:10001:755"] * len(folders)
    assert lines[2 + len(folders):] == ["/opt/conduit/bin/pip", "[]", *["compiled"] * (1 + (kind == "diffusers"))]
    # Triton's launcher and Inductor's wrappers build against Python's headers.
    done = run(image.tag, "-c", "import pathlib, sysconfig; print(pathlib.Path(sysconfig.get_paths()['include'], "
               "'Python.h').is_file())", entrypoint="python", user="10001:10001")
    assert done.stdout.strip() == "True", done.stdout + done.stderr
    # Each cache the environment names is one the engine's user can make.
    done = run(image.tag, "-c", f"mkdir -p {' '.join(caches.values())}", entrypoint="sh", user="10001:10001")
    assert done.returncode == 0, done.stderr
