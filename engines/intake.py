"""Jobs in: reading each model's job stream, promoting waiting jobs, and admitting what was read.

One read loop per job stream (a blocking read stays within one Redis Cluster slot) reads as many
jobs as the worker has free slots, after first promoting waiting jobs of that model into the
stream (fair queueing: ``engines.contract.fairness``). A job read is admitted, or answered at
once: ``Failed`` 400 for one this engine cannot read, 501 for a kind it does not run, 504 past
its deadline; one whose client already left is acked unrun.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import msgspec
from redis.exceptions import NoScriptError

from engines.contract.backlog import release_command
from engines.contract.fairness import PROMOTE, promote_command
from engines.contract.backlog import backlog_size
from engines.contract.keys import ENGINE_GROUP
from engines.contract.lane import REDIS_ERRORS, entry_fields, open_lane, stream_entries
from engines.contract.messages import Failed
from engines.contract.reach import Outage
from engines.events import Ack
from engines.running import Running, now_ms

if TYPE_CHECKING:
    from engines.worker import Worker

log = logging.getLogger("conduit.engine")


class Intake:
    """Reads, promotes and admits the jobs of a worker's models."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        #: Jobs read but not started yet (a read across several models can bring more than the
        #: free slots); started in order as slots free, claimed by the heartbeat meanwhile.
        self.waiting: deque[tuple[str, bytes, dict[bytes, bytes]]] = deque()
        #: The read loops (one per job stream).
        self.readers: set[asyncio.Task[None]] = set()

    def read(self, stream: str) -> None:
        """Start ``stream``'s read loop; one that fails (a bug, not Redis) stops the engine."""
        task = asyncio.create_task(self.read_loop(stream), name=f"read-{stream}")
        self.readers.add(task)

        def ended(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("reading %s failed: %r; stopping", stream, t.exception())
                self._worker.stop()

        task.add_done_callback(ended)

    async def follow(self, models: list[str]) -> None:
        """The backend's models changed while it serves (an upstream engine's ``--models auto``): read
        the new models' job streams, stop reading the gone ones' (their loops end within a read's
        block), and announce the new list from the next heartbeat on."""
        worker = self._worker
        streams = {worker.keys.jobs(m): m for m in models}
        added = [s for s in streams if s not in worker.streams]
        if added:
            old, worker.streams = worker.streams, streams
            try:
                await worker.create_groups()  # (may fail: Redis away; the caller tries again later)
            except BaseException:
                worker.streams = old
                raise
        # Replaced, never changed in place: the reclaimer iterates the old one.
        worker.streams = streams
        for stream in added:
            if not worker.stopping.is_set():
                self.read(stream)
        worker.presence.info_blob = worker.presence.info()
        worker.metrics.serving(models)

    def free(self) -> int:
        """Slots neither running a job nor promised to one read."""
        worker = self._worker
        return worker.backend.max_concurrency - len(worker.running) - len(self.waiting)

    async def read_loop(self, stream: str) -> None:
        """Read ``stream``'s jobs into free slots until the worker stops."""
        worker = self._worker
        read_cmd = ("XREADGROUP", "GROUP", ENGINE_GROUP, worker.engine_id, "COUNT")
        model = worker.streams[stream]
        lane = open_lane(worker.redis, f"jobs-{worker.streams[stream]}", blocking=True)  # its own connection: it blocks
        outage = Outage(log, f"reading {model}'s jobs")
        try:
            while not worker.stopping.is_set() and stream in worker.streams:  # (a model gone: Worker.announce)
                free = self.free()
                if free <= 0:
                    worker.slot_free.clear()
                    await worker.slot_free.wait()  # set by a finishing job, and by stop()
                    continue
                try:
                    # Every turn with free slots (a job read, a slot freed, a read timed out)
                    # first takes waiting jobs into the stream, in turn by key. When jobs still
                    # wait after that (other engines read the ones promoted here), look again soon.
                    block = 100 if await self._promote(lane, model, free) else 1000
                    # A read blocks at most a second, so a stop takes effect within one; it is
                    # never cut short, so no job is left half-read.
                    reply = await lane.call(*read_cmd, free, "BLOCK", block, "STREAMS", stream, ">")
                except REDIS_ERRORS as exc:
                    outage.failed(exc)
                    worker.metrics.background_error("read-jobs")
                    # Redis may have lost the end of the reply streams (a restart, a failover), of jobs that
                    # write nothing more too: their recent entries go again once it answers.
                    worker.writer.redis_trouble()
                    await asyncio.sleep(0.5)
                    if "NOGROUP" in str(exc):
                        # Redis lost its data (restarted without persistence): rejoin.
                        await self._try(worker.create_groups())
                    continue
                outage.answered()
                for _stream, entries in stream_entries(reply):
                    for entry_id, fields in entries:
                        if fields:  # nil: deleted after it was delivered
                            self.waiting.append((stream, entry_id, entry_fields(fields)))
                self.start_waiting()
        finally:
            await lane.close()

    async def _promote(self, lane: Any, model: str, free: int) -> int:
        """Move up to ``free`` waiting jobs of ``model`` into its stream (``engines.contract.fairness``);
        returns how many still wait."""
        worker = self._worker
        cmd = promote_command(worker.keys, model, free)
        (reply,) = await lane.round_trip([cmd])
        if isinstance(reply, NoScriptError):  # Redis restarted or flushed its scripts
            await worker.redis.script_load(PROMOTE)
            (reply,) = await lane.round_trip([cmd])
        if isinstance(reply, Exception):
            # Refused (a failover, out of memory): what is in the stream is read all the same.
            log.warning("promoting waiting jobs of %s failed: %s", model, reply)
            worker.metrics.background_error("promote")
            return 0
        return int(reply)

    def start_waiting(self) -> None:
        """Admit the jobs read, in order, while slots are free (none once stopping)."""
        worker = self._worker
        while self.waiting and len(worker.running) < worker.backend.max_concurrency and not worker.stopping.is_set():
            stream, entry_id, fields = self.waiting.popleft()
            self.accept(stream, entry_id, fields, attempt=1)

    async def _try(self, op: Coroutine[Any, Any, None]) -> None:
        try:
            await op
        except REDIS_ERRORS as exc:
            log.warning("redis still unavailable: %s", exc)

    def accept(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], attempt: int) -> None:
        """Admit one job entry read from ``stream`` (see :meth:`admit`)."""
        run = self.decode(stream, entry_id, fields, attempt)
        if run is not None:
            self.admit(run)

    def decode(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], attempt: int) -> Running | None:
        """The job of an entry read from ``stream``; None for one this engine cannot read (refused)."""
        try:
            job = self._worker.codec.decode_job(fields[b"j"])
        except (KeyError, msgspec.DecodeError, msgspec.ValidationError):
            self._refuse_malformed(stream, entry_id, fields, attempt)
            return None
        return Running(job=job, stream=stream, entry_id=entry_id, attempt=attempt,
                       size=backlog_size(len(fields[b"j"]), job))

    def admit(self, run: Running) -> None:
        """Start a job, or answer it at once: a kind this engine does not run, a deadline passed,
        a client already gone."""
        worker = self._worker
        job, attempt = run.job, run.attempt
        model = worker.streams[run.stream]
        kinds = worker.kinds
        if job.kind not in kinds:
            worker.metrics.job_finished(model, "unsupported")
            worker.finish(run, Failed(job=job.id, message=f"No engine of model `{model}` runs `{job.kind}` requests "
                                      f"(this one runs: {', '.join(sorted(kinds))}).", code="unsupported_job_kind",
                                      status=501, type="invalid_request_error", attempt=attempt, seq=run.next_seq()))
            return
        if job.deadline_ms and now_ms() >= job.deadline_ms:
            worker.metrics.job_finished(job.model, "expired")
            worker.finish(run, Failed(job=job.id, message="The request's deadline passed before an engine could "
                                      "start it.", code="deadline_exceeded", status=504, type="timeout_error",
                                      attempt=attempt, seq=run.next_seq()))
            return
        if job.id in worker.cancellations:
            # Cancelled while it waited: not a moment of compute spent on it (a background one still
            # gets its end written to its result record).
            worker.metrics.job_finished(job.model, "skipped")
            worker.runner.end_cancelled(run)
            return
        if job.created_ms and attempt == 1:
            worker.metrics.queue_wait(job.model, max(now_ms() - job.created_ms, 0) / 1000)
        worker.running[job.id] = run
        run.task = asyncio.create_task(worker.runner.run(run), name=f"job-{job.id}")

    def _refuse_malformed(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], attempt: int) -> None:
        """A job this engine cannot read: answered with a 400 if its sender can be named, and
        acked either way (no engine of this version could run it)."""
        worker = self._worker
        model = worker.streams[stream]
        worker.metrics.job_finished(model, "malformed")
        try:
            header = worker.codec.decode_job_header(fields[b"j"])
        except (KeyError, msgspec.DecodeError, msgspec.ValidationError):
            log.error("dropping unreadable job entry %s on %s", entry_id, stream)
            worker.writer.ack(Ack(stream, entry_id, None))
            return
        log.error("refusing malformed job %s on %s", header.id, stream)
        worker.writer.finish(header.reply_to, Failed(
            job=header.id, message="The engine could not read this request (a newer or damaged job).",
            code="malformed_job", status=400, type="invalid_request_error", attempt=attempt, seq=1),
            Ack(stream, entry_id, worker.keys.job(model, header.id), worker.share_of(model, header.tenant, header.id),
                release_command(worker.keys, model, header.id, len(fields[b"j"]), header.tenant)))
