"""What a run leaves behind when its submission is interrupted (no Redis: the queue here only
raises, which is all these tests need of it)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.context import RequestContext
from gateway.dispatch import Dispatcher, JobKind
from gateway.queue import ReplyRouter
from gateway.settings import QueueSettings
from telemetry.instruments import GatewayMetrics
from telemetry.tracing import SpanKind, Tracing


class Live:
    def is_live(self, model: str) -> bool:
        return True

    def is_known(self, model: str) -> bool:
        return True

    def runs(self, model: str, kind: str) -> bool:
        return True


class Interrupted:
    """A queue whose submission is cancelled mid-way (a server shutting down cancels handlers)."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def stream_of(self, model: str) -> str:
        return f"jobs:{model}"

    async def submit(self, job: Any, *, share: float | None = None) -> None:
        raise asyncio.CancelledError

    async def cancel(self, job_id: str, deadline_ms: int) -> None:
        self.cancelled.append(job_id)


class Spans:
    def __init__(self) -> None:
        self.ended: list[str] = []

    def add(self, span: Any) -> None:
        self.ended.append(span.name)

    def shutdown(self) -> None:
        pass


async def test_an_interrupted_submission_leaves_nothing_behind() -> None:
    spans = Spans()
    tracing = Tracing({}, exporter=spans)
    queue = Interrupted()
    router = ReplyRouter(None, "replies:gw", None)  # type: ignore[arg-type]
    dispatcher = Dispatcher(QueueSettings(), Live(), queue, router, GatewayMetrics.noop(),  # type: ignore[arg-type]
                            tracing=tracing)
    ctx = RequestContext(span=tracing.start("POST /v1/chat/completions", SpanKind.SERVER, None))
    run = dispatcher.job(JobKind("chat", "chatcmpl"), "m", b"{}", stream=False, ctx=ctx)
    with pytest.raises(asyncio.CancelledError):
        await run.__aenter__()
    await asyncio.sleep(0)  # the cancel message is sent in the background
    assert dispatcher._runs == {} and router.waiting == 0
    assert spans.ended == ["queue m"]  # the queue span ended with the run
    assert queue.cancelled == [run.job_id]  # it may have been queued: engines drop it
