"""One job on the backend: its state (:class:`Running`), the output handle the backend writes to
and the run itself (:class:`JobRunner`: the outcome, its metrics and its span).

A job's events go through the worker's ``EventWriter``; its final event and ack through
``Worker.finish``. Engines record per job here (``conduit.engine.jobs``, job duration, the
consumer span in the client's trace).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engines.backend import JobRejected
from engines.contract.messages import (
    ChoiceDelta,
    Delta,
    Done,
    Embedded,
    Failed,
    Generated,
    ImageReady,
    Job,
    Started,
    Usage,
)
from engines.contract.store import new_ref, stored_ref
from telemetry.instruments import OPERATIONS
from telemetry.tracing import SpanKind, Status, StatusCode, is_sampled, trace_id_of

if TYPE_CHECKING:
    from engines.worker import Worker

log = logging.getLogger("conduit.engine")


def now_ms() -> int:
    """Wall-clock epoch milliseconds (deadlines, expiries and registry scores are in these)."""
    return int(time.time() * 1000)


@dataclass(slots=True)
class Running:
    """One attempt at a job this engine took: where it came from, its task and its event numbers."""

    job: Job
    stream: str
    entry_id: bytes
    attempt: int
    task: asyncio.Task[None] | None = None
    output_marked: bool = False
    finished: bool = False
    #: Number of the last event emitted for this attempt.
    seq: int = 0
    #: The job's usage, once the backend reported it.
    usage: Usage | None = None
    #: The job's encoded size (bytes), as its model's backlog counts it (``engines.contract.backlog``).
    size: int = 0
    #: The job's result record (``JobOptions.result``: every event goes there too); "": none.
    result: str = ""

    def __post_init__(self) -> None:
        options = self.job.options
        if options is not None:
            self.result = options.result

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class _Output:
    """The :class:`~engines.backend.JobOutput` of one running job."""

    __slots__ = ("_worker", "_run", "_started", "_budget")

    def __init__(self, worker: Worker, run: Running) -> None:
        self._worker = worker
        self._run = run
        self._started = False
        self._budget: list[int] | None = None

    def started(self) -> None:
        if not self._started:
            self._started = True
            run = self._run
            job = run.job
            self._worker.writer.emit(
                job.reply_to,
                Started(job=job.id, engine=self._worker.engine_id, attempt=run.attempt, created=int(time.time()),
                        seq=run.next_seq()),
                run.result,
            )

    def _mark_output(self) -> None:
        run = self._run
        job = run.job
        if not run.output_marked and job.stream:
            # Only a streaming job's output can reach its client before the job ends; a
            # collected one can always be run again from scratch.
            run.output_marked = True
            self._worker.writer.mark_output(self._worker.keys.job(job.model, job.id))

    def delta(self, choices: list[ChoiceDelta], usage: Usage | None = None, total: Generated | None = None) -> None:
        self.started()
        self._mark_output()
        run = self._run
        job = run.job
        self._worker.writer.emit(job.reply_to, Delta(job=job.id, choices=choices, attempt=run.attempt,
                                                     seq=run.next_seq(), usage=usage, total=total), run.result)

    async def image(self, data: bytes, *, index: int, format: str, width: int, height: int, seed: int,
                    partial: int | None = None, joined: bool = False, batch: int = 1) -> None:
        self.started()
        worker = self._worker
        job = self._run.job
        ref = new_ref(format)
        # Stored before its event is emitted: a gateway never sees a reference it cannot read.
        await worker.images.put(ref, data, job.output_ttl_ms or int(worker.settings.image_ttl_s * 1000))
        run = self._run
        if run.finished:
            return  # cancelled or failed while the image was being stored
        if partial is not None:
            # A preview is streamed as it arrives; a final image only with the job's Done (until
            # then the job may run again from scratch: with partial_images 0 nothing was shown).
            self._mark_output()
        worker.writer.emit(job.reply_to, ImageReady(
            job=job.id, ref=ref, index=index, format=format, width=width, height=height, seed=seed, partial=partial,
            joined=joined, batch=batch, attempt=run.attempt, seq=run.next_seq()), run.result)

    def embedded(self, index: int, vector: bytes) -> None:
        # Not marked as output: a gateway answers an embedding only once its job is done, so an
        # unfinished one can run again from scratch on another engine.
        self.started()
        run = self._run
        self._worker.writer.emit(run.job.reply_to, Embedded(job=run.job.id, index=index, vector=vector,
                                                            attempt=run.attempt, seq=run.next_seq()), run.result)

    def done(self, usage: Usage) -> None:
        self.started()
        run = self._run
        run.usage = usage
        self._worker.finish(run, Done(job=run.job.id, usage=usage, attempt=run.attempt, seq=run.next_seq()))

    async def inputs(self) -> list[bytes]:
        options = self._run.job.options
        refs = [blob.ref for blob in options.inputs] if options is not None else []
        if not all(stored_ref(ref) for ref in refs):
            raise JobRejected("The job names an input that is not a blob store reference.", param="image")
        blobs = await self._worker.images.get_many(refs)
        if any(blob is None for blob in blobs):
            raise JobRejected("The request's uploaded images are no longer stored (the queue's Redis lost them); "
                              "send the request again.", status=503, code="input_lost", type="server_error")
        return blobs  # type: ignore[return-value]

    async def fetch(self, url: str, param: str) -> bytes:
        media = self._worker.media
        if self._budget is None:
            self._budget = [media.max_bytes]  # one bound for all of the job's fetches
        return await media.picture(url, param, self._run.job.deadline_ms, self._budget)


class JobRunner:
    """Runs jobs on the worker's backend and turns however each ends into its outcome: a final
    event (``Done`` from the backend, ``Failed`` here), the job's metrics and its span."""

    __slots__ = ("_worker",)

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def run(self, run: Running) -> None:
        """Run one job to its end; its slot is released whatever happens."""
        worker = self._worker
        job = run.job
        out = _Output(worker, run)
        started = time.perf_counter()
        # Attributes are built only for a sampled trace (most are not, at a 10% ratio).
        span = self._span(run) if worker.tracing is not None and is_sampled(job.traceparent) else None
        outcome = "interrupted"
        try:
            # Media URLs checked and, where allowed, fetched here: the backend sees only data: URLs.
            await worker.backend.run(await worker.media.prepare(job), out)
            if not run.finished:
                outcome = "error"
                log.error("job %s: the backend ended it without a result (traceparent %s)", job.id,
                          job.traceparent or "-")
                worker.metrics.job_finished(job.model, "error")
                worker.finish(run, Failed(job=job.id, message="The engine ended the job without a result.",
                                          attempt=run.attempt, seq=run.next_seq()))
                return
            outcome = "ok"
            # After the event writer's turn: metrics must not delay the final flush.
            asyncio.get_running_loop().call_soon(worker.metrics.job_finished, job.model, "ok",
                                                 time.perf_counter() - started)
        except JobRejected as exc:
            outcome = "rejected"
            worker.metrics.job_finished(job.model, "rejected")
            worker.finish(run, Failed(job=job.id, message=exc.message, code=exc.code, status=exc.status,
                                      type=exc.type, param=exc.param, retry_after_s=exc.retry_after_s,
                                      attempt=run.attempt, seq=run.next_seq()))
        except asyncio.CancelledError:
            if worker.stopping.is_set() and job.id not in worker.cancellations:
                raise  # drain timed out: left pending (unacked), so another engine reclaims it
            outcome = "cancelled"
            worker.metrics.job_finished(job.model, "cancelled")
            self.end_cancelled(run)
        except Exception:
            outcome = "error"
            log.exception("job %s failed (traceparent %s)", job.id, job.traceparent or "-")
            worker.metrics.job_finished(job.model, "error")
            worker.finish(run, Failed(job=job.id, message="The engine failed while running the request.",
                                      attempt=run.attempt, seq=run.next_seq()))
        finally:
            worker.release(run)
            if span is not None:
                _end_span(span, run, outcome)
            # One line per job, joined to its request by the client's request id and trace id
            # (log collectors parse them from the JSON format's fields).
            log.info("job %s %s", job.id, outcome, extra={
                "job_id": job.id, "request_id": job.request_id, "trace_id": trace_id_of(job.traceparent),
                "model": job.model, "outcome": outcome, "attempt": run.attempt,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3)})

    def end_cancelled(self, run: Running) -> None:
        """End a job whose cancellation came (running, or skipped when read): one with a result record
        ends with ``Failed`` 499 ``cancelled`` in both its streams, so a background response read from
        any gateway says how it ended; any other is acked without a final event (its client is gone)."""
        if run.finished:
            return
        worker = self._worker
        if run.result:
            worker.finish(run, Failed(job=run.job.id, message="The response was cancelled.", code="cancelled",
                                      status=499, attempt=run.attempt, seq=run.next_seq()))
            return
        run.finished = True
        worker.writer.ack(worker.ack_of(run))

    def _span(self, run: Running) -> Any:
        """The job's span in its client's trace (None when that trace is not sampled)."""
        job = run.job
        attrs: dict[str, Any] = {"gen_ai.operation.name": OPERATIONS.get(job.kind, job.kind),
                                 "gen_ai.request.model": job.model, "messaging.system": "redis",
                                 "messaging.operation.type": "process", "messaging.destination.name": run.stream,
                                 "messaging.message.id": job.id, "conduit.engine.id": self._worker.engine_id,
                                 "conduit.job.attempt": run.attempt}
        if job.created_ms:
            attrs["conduit.job.queue_wait_s"] = max(now_ms() - job.created_ms, 0) / 1000
        name = f"{attrs['gen_ai.operation.name']} {job.model}"
        tracing = self._worker.tracing
        return tracing.continued(job.traceparent, name, SpanKind.CONSUMER, attrs)  # type: ignore[union-attr]


def _end_span(span: Any, run: Running, outcome: str) -> None:
    span.set_attribute("conduit.job.outcome", outcome)
    if run.usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", run.usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", run.usage.completion_tokens)
    if outcome == "error":
        span.set_status(Status(StatusCode.ERROR, "the engine failed while running the job"))
    span.end()
