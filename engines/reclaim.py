"""Reclaiming: taking over the jobs of engines that stopped heart-beating, and dead-lettering.

A reclaimed job is retried (a new attempt, admitted like a job read), unless a streaming job's
output may have reached its client (then it is failed cleanly: ``engine_lost``, 502), or it has
failed ``max_attempts`` times (then it goes to the model's dead-letter stream and is failed:
``engine_failed``, 502).

A dead letter names the job (id, kind, key id, attempts, size and SHA-256 of its body) but never
holds its body: the prompt is the user's data, which Conduit keeps only while the job can still
run (and in logs only where ``log_prompts`` was turned on); the digest tells whether a resent
request was the same one. The stream is bounded by length and by age, and goes itself once no
dead letter came for that age.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from engines.contract.keys import ENGINE_GROUP, OUTPUT_STARTED
from engines.contract.messages import Failed
from engines.running import Running, now_ms

if TYPE_CHECKING:
    from engines.worker import Worker

log = logging.getLogger("conduit.engine")


class Reclaimer:
    """Takes over a worker's share of the jobs dead engines left pending."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def reclaim_once(self) -> None:
        """Take over the jobs of engines that stopped heart-beating.

        Only entries idle for ``reclaim_idle_ms`` whose consumer is gone from the registry (or
        overdue by ``reclaim_grace_ms``) are taken, so a Redis stall that ages every entry
        does not move running jobs between live engines. Entries of this engine that it does
        not hold (a read whose reply was lost) are taken back too.
        """
        worker = self._worker
        if worker.stopping.is_set():
            return  # a draining engine takes on nothing new
        redis, settings, engine_id = worker.redis, worker.settings, worker.engine_id
        now = now_ms()
        live = {e.decode() for e in await redis.zrangebyscore(
            worker.keys.engines, now - settings.reclaim_grace_ms, "+inf")}
        live.add(engine_id)
        for stream, model in worker.streams.items():
            free = worker.intake.free()
            if free <= 0:
                return
            pending = await redis.xpending_range(stream, ENGINE_GROUP, min="-", max="+", count=max(free * 4, 16),
                                                 idle=settings.reclaim_idle_ms)
            held = {entry_id for _, entry_id in worker.held()}
            orphans = {p["message_id"]: int(p["times_delivered"]) for p in pending
                       if (p["consumer"].decode() not in live
                           or (p["consumer"].decode() == engine_id and p["message_id"] not in held))}
            if not orphans:
                continue
            claimed = await redis.xclaim(stream, ENGINE_GROUP, engine_id, settings.reclaim_idle_ms,
                                         list(orphans)[:free])
            for entry_id, fields in claimed:
                if fields:
                    # XCLAIM counted this delivery: the attempt is the count before it plus one.
                    await self._retry_claimed(stream, model, entry_id, fields, orphans.get(entry_id, 1) + 1)

    async def _retry_claimed(self, stream: str, model: str, entry_id: bytes, fields: dict[bytes, bytes],
                             attempt: int) -> None:
        worker = self._worker
        worker.metrics.job_reclaimed(model)
        run = worker.intake.decode(stream, entry_id, fields, attempt)
        if run is None:
            return
        job = run.job
        if await worker.redis.get(worker.keys.job(model, job.id)) == OUTPUT_STARTED:
            log.warning("job %s was lost mid-output by its engine; failing it", job.id)
            worker.metrics.job_finished(model, "lost")
            worker.finish(run, Failed(job=job.id, message="The engine serving this request stopped after output "
                                      "began; retry the request.", code="engine_lost", status=502, attempt=attempt,
                                      seq=run.next_seq()))
            return
        if attempt > worker.settings.max_attempts:
            log.error("job %s failed %d attempts; dead-lettering it", job.id, attempt - 1)
            await self._dead_letter(model, run, attempt - 1)
            worker.metrics.job_finished(model, "dead_letter")
            worker.finish(run, Failed(job=job.id, message=f"The request failed on {attempt - 1} engines in a row.",
                                      code="engine_failed", status=502, attempt=attempt, seq=run.next_seq()))
            return
        log.info("retrying job %s (attempt %d)", job.id, attempt)
        worker.intake.admit(run)

    async def _dead_letter(self, model: str, run: Running, attempts: int) -> None:
        """Record a job that failed ``attempts`` times in ``model``'s dead-letter stream, without its
        body; drop entries past ``dead_letter_max_age_s`` (an XADD trims by one bound only) and let
        the stream expire that long after its newest entry, all in one transaction (one key: one
        Cluster slot), so no reader sees an entry without its bounds."""
        worker = self._worker
        settings = worker.settings
        job = run.job
        key = worker.keys.dead_letters(model)
        age_ms = int(settings.dead_letter_max_age_s * 1000)
        pipe = worker.redis.pipeline(transaction=True)
        pipe.xadd(key, {b"job": job.id, b"kind": job.kind, b"tenant": job.tenant, b"attempts": attempts,
                        b"created_ms": job.created_ms, b"bytes": len(job.body),
                        b"sha256": hashlib.sha256(job.body).hexdigest(), b"traceparent": job.traceparent},
                  maxlen=settings.dead_letter_maxlen, approximate=True)
        pipe.xtrim(key, minid=now_ms() - age_ms, approximate=False)
        pipe.pexpire(key, age_ms)
        await pipe.execute()
