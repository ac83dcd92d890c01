"""Each fault test gets a Redis of its own: the faults restart it, stall it and fill its memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import RedisServer, Stack


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator[RedisServer]:
    # DEBUG SLEEP is refused unless enabled (Redis 7); "local": from this host only.
    server = RedisServer(tmp_path / "redis", "--enable-debug-command", "local")
    yield server
    server.stop()


@pytest.fixture
def fault_stack(fault_redis: RedisServer, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(fault_redis.url, tmp_path)
    yield s
    s.stop()
