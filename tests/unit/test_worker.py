"""engines.worker without Redis: cancellation memory and the cancel message format (``engines.cancel``),
and how a job's run ends (``engines.running``)."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

from engines.synthetic import SyntheticBackend, SyntheticSettings
from engines.contract.messages import Failed, Job
from engines.cancel import parse_cancel
from engines.stream_lives import StreamLives
from engines.running import Running, now_ms
from engines.worker import Worker, WorkerSettings
from telemetry.engine_instruments import EngineMetrics
from telemetry.setup import Telemetry


def test_cancel_messages_carry_a_deadline() -> None:
    assert parse_cancel(b"chatcmpl-1 1700000000123") == ("chatcmpl-1", 1_700_000_000_123)
    assert parse_cancel(b"chatcmpl-1") == ("chatcmpl-1", None)  # an older gateway's message


def test_a_reply_streams_life_is_known_from_its_last_write_never_later() -> None:
    """What an engine re-creates a reply stream Redis lost with (``engines.stream_lives.StreamLives``): the
    life it had left at its last write, counted from when that write was sent; nothing for a stream
    never seen, one without an expiry, or once the expiry last seen passed (its gateway is gone)."""
    lives = StreamLives()
    assert lives.left("s", 1_000.0) == 0
    lives.heard("s", 1_000.0, 60_000)
    assert (lives.left("s", 1_000.0), lives.left("s", 31_000.0), lives.left("s", 61_000.0)) == (60_000, 30_000, 0)
    lives.heard("s", 2_000.0, -1)  # no expiry (a gateway of an older version): nothing known
    assert lives.left("s", 2_000.0) == 0
    lives.heard("t", 3_000.0, 5_000)
    lives.heard("t", 4_000.0, -2)  # missing, and left so
    assert lives.left("t", 4_000.0) == 0


def test_a_streams_recent_entries_are_kept_to_be_written_again_once_its_generation_changed() -> None:
    """The entries written in the last ``WINDOW_MS`` before a stream's latest write (at most
    ``WINDOW_ENTRIES`` and ``WINDOW_BYTES``), handed back only after a write found the stream lost or
    made again; the generation named in writes is '' meanwhile (write whatever it is), then the new one."""
    from engines import stream_lives

    lives = StreamLives()
    lives.heard("s", 1_000.0, 60_000, "g1", [b"a", b"b"])
    lives.heard("s", 2_000.0, 60_000, "g1", [b"c"])
    assert (lives.generation("s"), lives.resend("s")) == ("g1", [])  # nothing to resend while it is the same
    lives.changed("s")
    assert (lives.generation("s"), lives.resend("s")) == ("", [b"a", b"b", b"c"])
    lives.heard("s", 3_000.0, 60_000, "g2", [b"d"])  # written again (keeping their times), then the new one
    assert (lives.generation("s"), lives.resend("s"), lives.resending()) == ("g2", [], [])
    lives.heard("s", 2_000.0 + stream_lives.WINDOW_MS + 1, 60_000, "g2", [b"e"])  # the oldest aged out
    lives.changed_all()  # Redis failed a connection: every stream's recent entries go again
    assert lives.resend("s") == [b"d", b"e"] and lives.resending() == ["s"]  # (c, 10 s before e, aged out)
    lives.heard("t", 1.0, 60_000, "", [b"x" * 10] * (stream_lives.WINDOW_ENTRIES + 5))
    lives.changed("t")
    assert len(lives.resend("t")) == stream_lives.WINDOW_ENTRIES
    big = b"y" * (stream_lives.WINDOW_BYTES // 2 + 1)
    lives.heard("u", 1.0, 60_000, "", [big, big, b"z"])
    lives.changed("u")
    assert lives.resend("u") == [big, b"z"]  # the oldest went first
    lives.changed("never-written")
    assert lives.resend("never-written") == [] and lives.generation("never-written") == ""


async def test_a_cancellation_is_remembered_until_its_jobs_deadline() -> None:
    """Not for a fixed 600 s: a job past its deadline is never started, so its cancellation can go."""
    worker = Worker(SyntheticBackend(SyntheticSettings()), WorkerSettings(cancel_memory_s=30))
    try:
        worker.cancel("soon", now_ms() + 50)
        worker.cancel("later", now_ms() + 60_000)
        time.sleep(0.1)
        worker.cancel("old-style")  # no deadline: remembered for cancel_memory_s
        assert "soon" not in worker.cancellations.until
        assert set(worker.cancellations.until) == {"later", "old-style"}
        assert worker.cancellations.until["old-style"] - now_ms() > 25_000
    finally:
        await worker.redis.aclose()


async def test_a_job_the_backend_ends_without_a_result_is_an_error() -> None:
    """The client gets a failure, and the jobs counter says ``error`` (it said ``ok``)."""

    class Silent(SyntheticBackend):
        async def run(self, job: Job, out: object) -> None:
            return None

    telemetry = Telemetry("conduit.engine", "e")
    worker = Worker(Silent(SyntheticSettings()), WorkerSettings(), EngineMetrics(telemetry.meter))
    try:
        run = Running(Job(id="j1", kind="chat", model="m", body=b"{}", reply_to="r", deadline_ms=0), "s", b"1-0", 1)
        await worker.runner.run(run)
        await asyncio.sleep(0)  # call_soon'd metrics run on the next turn
        final = worker.writer._batch.events["r"][-1]
        assert isinstance(final, Failed) and "without a result" in final.message
        text = telemetry.render().decode()
        assert re.search(r'conduit_engine_jobs_total\{[^}]*outcome="error"[^}]*\} 1', text), text
        assert not re.search(r'conduit_engine_jobs_total\{[^}]*outcome="ok"[^}]*\} 1', text), text
    finally:
        await worker.redis.aclose()


async def test_every_job_logs_one_line_with_its_request_and_trace_id(caplog: pytest.LogCaptureFixture) -> None:
    """What joins an engine's logs to the client's request: its ``x-request-id`` and trace id."""

    class Silent(SyntheticBackend):
        async def run(self, job: Job, out: object) -> None:
            return None

    telemetry = Telemetry("conduit.engine", "e")
    worker = Worker(Silent(SyntheticSettings()), WorkerSettings(), EngineMetrics(telemetry.meter))
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    try:
        job = Job(id="j2", kind="chat", model="m", body=b"{}", reply_to="r", deadline_ms=0, traceparent=tp,
                  request_id="req-abc")
        with caplog.at_level(logging.INFO, logger="conduit.engine"):
            await worker.runner.run(Running(job, "s", b"1-0", 1))
        (line,) = [r for r in caplog.records if getattr(r, "job_id", None) == "j2"]
        assert (line.request_id, line.trace_id, line.outcome) == (  # type: ignore[attr-defined]
            "req-abc", "4bf92f3577b34da6a3ce929d0e0e4736", "error")
    finally:
        await worker.redis.aclose()
