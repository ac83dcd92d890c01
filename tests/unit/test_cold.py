"""The cold-start duty's bookkeeping (``gateway.cold``) against a scripted queue: a withdrawal that
races the run's end, and one that must be tried again after its client left. (The whole path, with
real Redis and processes: ``tests/integration/test_cold_start.py``.)"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from engines.contract.messages import Job
from engines.contract.withdraw import GONE, TAKEN, WITHDRAWN
from gateway.cold import RECHECK_S, ColdStarts
from gateway.settings import QueueSettings
from telemetry.instruments import GatewayMetrics


class Registry:
    """No engine live (``models``: the live ones; ``cold``: those all their engines announce cold); ``cold``
    declared."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.cold: set[str] = set()
        self.redis_ok = True

    def is_live(self, model: str) -> bool:
        return model in self.models

    def is_declared(self, model: str) -> bool:
        return True

    def known(self) -> set[str]:
        return {"cold"}


class Queue:
    """Answers each withdrawal with the next of ``outcomes`` (an exception is raised), after ``gate``."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.tried: list[str] = []
        self.cancelled: list[str] = []
        self.gate: asyncio.Event | None = None

    async def cancel(self, job_id: str, deadline_ms: int) -> None:
        self.cancelled.append(job_id)

    async def withdraw(self, job: Job, entry: bytes) -> int:
        self.tried.append(job.id)
        if self.gate is not None:
            await self.gate.wait()
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return int(outcome)


class Run:
    def __init__(self, deadline_ms: int | None = None) -> None:
        self.model = "cold"
        deadline_ms = deadline_ms or int(time.time() * 1000) + 60_000
        self.job = Job(id="chatcmpl-1", kind="chat", model="cold", body=b"{}", reply_to="r", deadline_ms=deadline_ms)
        self.entry = b""
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.ended = self.closed = self.withdrawn = self.output = False
        self.deadline = float("inf")  # the request's own (loop time): far past the cold-start deadline


def cold(queue: Queue, *runs: Run, timeout_s: float = 1) -> ColdStarts:
    return ColdStarts(QueueSettings(cold_start_timeout_s=timeout_s), Registry(), queue, GatewayMetrics.noop(),  # type: ignore[arg-type]
                      runs=lambda: runs)  # type: ignore[arg-type,return-value]


def waiting(starts: ColdStarts) -> int:
    return dict(starts.counts()).get("cold", 0)


async def test_a_run_answered_while_its_withdrawal_was_on_its_way_is_not_withdrawn() -> None:
    run, queue = Run(), Queue(WITHDRAWN)
    starts = cold(queue, run)
    starts.track(run, 0.0)  # type: ignore[arg-type]
    queue.gate = asyncio.Event()
    look = asyncio.create_task(starts._look(1.0))
    await asyncio.sleep(0)
    run.ended = True  # its Done was taken meanwhile: the answer is delivered, and charged
    queue.gate.set()
    await look
    assert not run.withdrawn and run.events.empty()


async def test_a_run_that_left_has_its_withdrawal_tried_again_until_settled(caplog: pytest.LogCaptureFixture) -> None:
    run, queue = Run(), Queue(TAKEN, ConnectionError("down"), GONE)
    starts = cold(queue, run)
    starts.track(run, 0.0)  # type: ignore[arg-type]
    run.closed = True  # its client left
    starts.left(run)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, "conduit.gateway"):
        for now in (0.1, 0.1 + RECHECK_S, 0.1 + 2 * RECHECK_S, 0.1 + 3 * RECHECK_S):
            await starts._look(now)
    assert len(queue.tried) == 3  # TAKEN, an error, then GONE: settled, not asked again
    assert queue.cancelled == queue.tried[:1]  # TAKEN: the engine that has it is told again
    assert len([r for r in caplog.records if "could not withdraw" in r.message]) == 1


async def test_a_run_that_left_while_its_withdrawal_was_on_its_way_is_tried_again() -> None:
    run, queue = Run(), Queue(TAKEN, WITHDRAWN)
    starts = cold(queue, run)
    starts.track(run, 0.0)  # type: ignore[arg-type]
    queue.gate = asyncio.Event()
    look = asyncio.create_task(starts._look(1.0))
    await asyncio.sleep(0)
    run.closed = True  # its client left: nothing of it is counted waiting any more
    starts.left(run)  # type: ignore[arg-type]
    queue.gate.set()
    await look
    await starts._look(1.0 + RECHECK_S)
    await starts._look(1.0 + 2 * RECHECK_S)
    assert len(queue.tried) == 2 and not queue.outcomes
    assert not run.withdrawn and run.events.empty()  # (nobody to answer)


async def test_a_left_run_is_given_up_at_its_job_deadline() -> None:
    run, queue = Run(deadline_ms=int(time.time() * 1000) - 1), Queue(TAKEN, TAKEN)
    starts = cold(queue, run)
    starts.track(run, 0.0)  # type: ignore[arg-type]
    run.closed = True
    starts.left(run)  # type: ignore[arg-type]
    await starts._look(0.1)
    await starts._look(0.1 + RECHECK_S)
    assert len(queue.tried) == 1


async def test_many_runs_failing_at_once_log_one_line(caplog: pytest.LogCaptureFixture) -> None:
    runs = [Run() for _ in range(20)]
    queue = Queue(*(ConnectionError("down") for _ in runs))
    starts = cold(queue, *runs)
    for run in runs:
        starts.track(run, 0.0)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, "conduit.gateway"):
        await starts._look(1.5)
    assert len(queue.tried) == 20
    assert len([r for r in caplog.records if "could not withdraw" in r.message]) == 1
    assert all(r.events.empty() for r in runs)


# ---- a live model whose engines announce it cold (a serverless upstream waking) ----


@pytest.mark.parametrize("timeout_s", [0, 1])  # counted with or without cold_start_timeout_s
async def test_a_run_of_a_model_announced_cold_counts_until_its_first_output_and_is_never_withdrawn(
        timeout_s: float) -> None:
    first, second, queue = Run(), Run(), Queue()
    starts = cold(queue, first, second, timeout_s=timeout_s)
    starts.registry.models["cold"] = ["engine"]  # type: ignore[attr-defined]
    starts.registry.cold.add("cold")  # type: ignore[attr-defined]
    for run in (first, second):
        starts.track(run, 0.0)  # type: ignore[arg-type]
    assert waiting(starts) == 2
    await starts._look(60.0)  # long past any cold-start deadline: its engine holds the job
    assert waiting(starts) == 2 and not queue.tried
    first.output = True  # the endpoint woke
    await starts._look(60.1)
    assert waiting(starts) == 1
    starts.registry.cold.clear()  # announced warm
    await starts._look(60.2)
    assert waiting(starts) == 0 and not queue.tried


async def test_runs_of_a_model_that_goes_cold_while_live_are_counted_and_move_to_the_deadline_when_it_dies() -> None:
    run, queue = Run(), Queue(WITHDRAWN)
    starts = cold(queue, run)
    starts.registry.models["cold"] = ["engine"]  # type: ignore[attr-defined]
    await starts._look(0.0)
    starts.track(run, 0.0)  # type: ignore[arg-type]  (a warm model: not counted)
    assert waiting(starts) == 0
    starts.registry.cold.add("cold")  # type: ignore[attr-defined]  (idle: the endpoint scaled down)
    await starts._look(0.1)
    assert waiting(starts) == 1
    starts.registry.models.clear()  # type: ignore[attr-defined]  (its engine died: no engine, a deadline)
    starts.registry.cold.clear()  # type: ignore[attr-defined]
    await starts._look(0.2)
    assert waiting(starts) == 1 and not queue.tried
    await starts._look(1.3)
    assert queue.tried == [run.job.id] and run.withdrawn and waiting(starts) == 0


async def test_a_waking_run_whose_client_left_is_not_withdrawn_nor_counted() -> None:
    run, queue = Run(), Queue()
    starts = cold(queue, run)
    starts.registry.models["cold"] = ["engine"]  # type: ignore[attr-defined]
    starts.registry.cold.add("cold")  # type: ignore[attr-defined]
    starts.track(run, 0.0)  # type: ignore[arg-type]
    run.closed = True
    starts.left(run)  # type: ignore[arg-type]
    assert waiting(starts) == 0
    await starts._look(5.0)
    assert not queue.tried  # its engine heard the cancellation: it is live
