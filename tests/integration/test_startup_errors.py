"""What ``conduit`` says when Redis refuses it, cannot be reached, or the model is not there.

Each case runs the real command against a real redis-server (``--requirepass``) and reads its
stderr: one or two lines naming what to fix, a non-zero exit, never a Python traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT, RedisServer, free_port

PASSWORD = "s3cret-redis-password"


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis that requires a password (its default user's)."""
    server = RedisServer(tmp_path_factory.mktemp("locked"), "--requirepass", PASSWORD)
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=10)


def conduit(*args: str, env: dict[str, str] | None = None, timeout: float = 30,
            program: str = "gateway.cli") -> subprocess.CompletedProcess[str]:
    """``conduit args`` (``program``: ``engines`` runs the engine's own program, as ``conduit engine`` does)
    with no ``CONDUIT_*`` variable but ``env``'s."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONDUIT_")}
    return subprocess.run([sys.executable, "-P", "-m", program, *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=timeout, env={**clean, "PYTHONUNBUFFERED": "1", **(env or {})})


def assert_clear(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A non-zero exit, no traceback, at most two lines on stderr holding every needle."""
    err = done.stderr
    assert done.returncode != 0, (done.returncode, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, err
    for needle in needles:
        assert needle in err, (needle, err)


# ---- a Redis that wants a password ----------------------------------------------------------------


@pytest.mark.parametrize("command", [["list"], ["create", "--name", "x"], ["show", "0123456789ab"],
                                     ["usage", "0123456789ab"]])
def test_keys_without_the_password_names_the_variables(locked: RedisServer, command: list[str]) -> None:
    done = conduit("keys", *command, "--redis-url", locked.url)
    assert_clear(done, "CONDUIT_REDIS_PASSWORD", "CONDUIT_REDIS_USERNAME", locked.url)


def test_keys_with_a_wrong_password_says_it_was_refused(locked: RedisServer) -> None:
    done = conduit("keys", "list", "--redis-url", locked.url, env={"CONDUIT_REDIS_PASSWORD": "wrong"})
    assert_clear(done, "refused", "CONDUIT_REDIS_PASSWORD", "CONDUIT_REDIS_USERNAME")
    assert "wrong" not in done.stderr.replace("WRONGPASS", "")


def test_keys_with_the_password_work(locked: RedisServer) -> None:
    done = conduit("keys", "list", "--redis-url", locked.url, env={"CONDUIT_REDIS_PASSWORD": PASSWORD})
    assert done.returncode == 0, done.stderr


def test_gateway_without_the_password_exits_at_startup(locked: RedisServer) -> None:
    done = conduit("gateway", "--port", str(free_port()), "--redis-url", locked.url, timeout=20)
    assert_clear(done, "CONDUIT_REDIS_PASSWORD", "CONDUIT_REDIS_USERNAME", locked.url)


def test_engine_without_the_password_exits_before_loading(locked: RedisServer) -> None:
    done = conduit("serve", "--kind", "synthetic", "--redis-url", locked.url, program="engines", timeout=20)
    assert_clear(done, "CONDUIT_REDIS_PASSWORD", "--redis-username", locked.url)


def test_engine_with_a_wrong_user_says_it_was_refused(locked: RedisServer) -> None:
    done = conduit("serve", "--kind", "synthetic", "--redis-url", locked.url, "--redis-username", "engine",
                   env={"CONDUIT_REDIS_PASSWORD": PASSWORD}, program="engines")
    assert_clear(done, "refused", "'engine'", "--redis-username")
    assert PASSWORD not in done.stderr


# ---- an unreachable Redis -------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-host.invalid"])
def test_keys_on_an_unreachable_redis_fail_fast_naming_the_url(host: str) -> None:
    url = f"redis://:{PASSWORD}@{host}:{free_port()}/0"
    started = time.monotonic()
    done = conduit("keys", "list", "--redis-url", url, timeout=60)
    assert time.monotonic() - started < 30
    assert_clear(done, url.replace(PASSWORD, "***"), "not reachable")
    assert PASSWORD not in done.stderr


def test_gateway_waits_for_an_unreachable_redis_saying_so_once(tmp_path: Path) -> None:
    """A gateway outlives Redis (it may start first, or restart): it keeps trying, and says so in one
    line naming the URL, not a line per retry."""
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    log = tmp_path / "gateway.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONDUIT_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "gateway.cli", "gateway", "--port", str(free_port()),
                                 "--redis-url", url], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=clean)
        try:
            time.sleep(8)
            assert proc.poll() is None, log.read_text()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    text = log.read_text()
    assert "Traceback" not in text and PASSWORD not in text, text
    about = [line for line in text.splitlines() if "WARNING" in line or "ERROR" in line]
    assert any(url.replace(PASSWORD, "***") in line for line in about), text
    assert len(about) <= 6, text  # one per component that outlives Redis; per retry it was ~80


# ---- a model path that is not there ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vllm", "diffusers"])
def test_engine_with_a_missing_model_path_names_it(kind: str) -> None:
    started = time.monotonic()
    done = conduit("serve", "--kind", kind, "--model", "/models/model", "--redis-url",
                   f"redis://127.0.0.1:{free_port()}/0", program="engines", timeout=120)
    assert_clear(done, "/models/model", "--model", "CONDUIT_MODELS_DIR")
    assert time.monotonic() - started < 15, "it loaded something heavy first"
