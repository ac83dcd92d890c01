"""Fixtures shared by every test: a real redis-server per session, stacks per test."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import LocalCluster
from tests.harness import ROOT, RedisServer, Stack


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real Redis Cluster (3 masters, 3 replicas) per session. A test that kills a master
    restarts it before it ends (it rejoins as a replica), so the next test finds 6 nodes."""
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def stack(redis_server: RedisServer, tmp_path: Path) -> Iterator[Stack]:
    """A gateway/engine set of this test's own (own key prefix) on the shared Redis."""
    s = Stack(redis_server.url, tmp_path)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def shared_stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway + synthetic engine shared by a module's tests that only read from it."""
    s = Stack(redis_server.url, tmp_path_factory.mktemp("shared"))
    s.gateway(max_body_bytes=4096)
    s.synthetic()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Stable Diffusion pipeline, built once per session into a temporary folder (never
    ~/.cache), by ``conduit models build-tiny`` in a child process: the test process itself
    never imports torch or diffusers."""
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "models", "build-tiny", "--only", "sd",
                           "--sd-path", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(path)], done.stdout
    return path


#: An API key's text (``gateway.tenancy.keys``): public id, then the 43-character secret.
_KEY_TEXT = re.compile(rb"cdt-[0-9a-f]{12}-[A-Za-z0-9_-]{43}")


@pytest.fixture(scope="session", autouse=True)
def no_key_material_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole run: no log any gateway, engine or CLI process of any test wrote (every
    ``*.log`` under the session's temporary folder) holds an API key's text. Keys are made in
    many tests (CLI, admin API, two-gateway limits); none may ever be logged."""
    yield
    root = tmp_path_factory.getbasetemp()
    leaks = [str(p) for p in root.rglob("*.log") if p.is_file() and _KEY_TEXT.search(p.read_bytes())]
    assert not leaks, f"API key text found in logs: {leaks}"
