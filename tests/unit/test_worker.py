"""engines.worker without Redis: cancellation memory and the cancel message format."""

from __future__ import annotations

import time

from engines.synthetic import SyntheticBackend, SyntheticSettings
from engines.worker import Worker, WorkerSettings, now_ms, parse_cancel


def test_cancel_messages_carry_a_deadline() -> None:
    assert parse_cancel(b"chatcmpl-1 1700000000123") == ("chatcmpl-1", 1_700_000_000_123)
    assert parse_cancel(b"chatcmpl-1") == ("chatcmpl-1", None)  # an older gateway's message


async def test_a_cancellation_is_remembered_until_its_jobs_deadline() -> None:
    """Not for a fixed 600 s: a job past its deadline is never started, so its cancellation can go."""
    worker = Worker(SyntheticBackend(SyntheticSettings()), WorkerSettings(cancel_memory_s=30))
    try:
        worker.cancel("soon", now_ms() + 50)
        worker.cancel("later", now_ms() + 60_000)
        time.sleep(0.1)
        worker.cancel("old-style")  # no deadline: remembered for cancel_memory_s
        assert "soon" not in worker._cancelled
        assert set(worker._cancelled) == {"later", "old-style"}
        assert worker._cancelled["old-style"] - now_ms() > 25_000
    finally:
        await worker.redis.aclose()
