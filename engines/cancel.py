"""Cancellation: a gateway whose client went away publishes ``job-id deadline-ms`` on the cancel
channel; every engine hears it, aborts the job if it runs it (``Worker.cancel``) and remembers
it until its deadline, so a job read later is skipped without a moment of compute spent on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from engines.contract.lane import REDIS_ERRORS
from engines.contract.reach import Outage
from engines.running import now_ms

if TYPE_CHECKING:
    from engines.worker import Worker

log = logging.getLogger("conduit.engine")


class Cancellations:
    """The jobs whose client went away, remembered until their deadline (after which no engine
    would start them anyway), and the listener that hears of them."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        #: job id -> epoch ms until which its cancellation is remembered.
        self.until: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, job_id: object) -> bool:
        return job_id in self.until

    def remember(self, job_id: str, deadline_ms: int | None = None) -> None:
        """Remember ``job_id`` until ``deadline_ms`` (``cancel_memory_s`` from now without one);
        forget the ones past their time, and the oldest beyond 100,000."""
        now = now_ms()
        until = self.until
        until[job_id] = deadline_ms if deadline_ms else now + int(self._worker.settings.cancel_memory_s * 1000)
        until.move_to_end(job_id)
        while until and next(iter(until.values())) < now:
            until.popitem(last=False)
        if len(until) > 100_000:
            until.popitem(last=False)

    async def listen(self) -> None:
        """Hear the cancel channel until the worker closes, resubscribing after any failure."""
        worker = self._worker
        outage = Outage(log, "the cancel listener")
        while not worker.closed:
            pubsub = worker.redis.pubsub()
            try:
                await pubsub.subscribe(worker.keys.cancel_channel)
                outage.answered()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    worker.cancel(*parse_cancel(message["data"]))
            except REDIS_ERRORS as exc:
                outage.failed(exc)
                worker.metrics.background_error("cancel-listener")
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("cancel listener failed; resubscribing")
                worker.metrics.background_error("cancel-listener")
                await asyncio.sleep(0.5)
            finally:
                await pubsub.aclose()


def parse_cancel(data: bytes) -> tuple[str, int | None]:
    """A cancel message: ``job_id`` (older gateways) or ``job_id deadline_ms``."""
    job_id, _, deadline = data.decode().partition(" ")
    return job_id, int(deadline) if deadline.isdigit() else None
