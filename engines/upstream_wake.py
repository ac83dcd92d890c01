"""A serverless upstream's wake state (``--upstream-serverless``): whether its endpoint is (believed)
scaled to zero.

A serverless GPU endpoint scaled to zero answers its first request only after a cold start (tens
of seconds to minutes), meanwhile refusing (503, a 429 "no workers", a refused or cut connection)
or holding the request. The upstream engine relays: if it went silent while its endpoint sleeps,
gateways would hold the model's requests as cold and nothing would ever reach the endpoint to wake
it. So it keeps announcing the model and taking jobs, but announces it *cold* (``EngineInfo.cold``)
while the endpoint is believed asleep: gateways count such requests in the demand gauge until their
first output. :class:`Wake` is that belief:

- cold at start, and again once ``idle_s`` passed with no answer (nothing in flight), or when a
  warm endpoint refuses as a sleeping one does past a job's retries (it scaled down under us; a
  429 from a warm one is a rate limit, never that);
- warm from the first byte of a 200 (and at each stream's end).

While cold, a failure before output that means "not up yet" (:meth:`Wake.not_up_yet`: a
connection failure or a read timeout, a 503, a 429 that is no exhausted quota) is tried again with
pauses of at most :data:`PAUSE_CAP_S` until the job's deadline or the wake's window
(``cold_start_s`` from the job's start) ends, instead of the ``retries`` count; the first byte is
awaited up to that window. Every change is told to ``on_change`` (the worker announces it at once).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from engines.backend import JobRejected

log = logging.getLogger("conduit.engine")

#: The longest pause between two tries of a waking endpoint (a Retry-After beyond it too).
PAUSE_CAP_S = 5.0
#: Failures before output that a sleeping endpoint answers (a refused or cut connection and a
#: timeout are mapped to 503 ``model_unavailable``; a 429 for an exhausted quota is no ``Retryable``).
NOT_UP_YET = frozenset({429, 503})


class Wake:
    """Whether a serverless upstream is cold (believed scaled to zero) or warm."""

    def __init__(self, cold_start_s: float, idle_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        #: How long a wake may take (a job's window of tries and first-byte wait while cold).
        self.cold_start_s = cold_start_s
        #: How long after its last answer the endpoint is taken to have scaled down again.
        self.idle_s = idle_s
        self._clock = clock
        self._answered_at = 0.0
        self._cold = True
        #: Called (on the event loop) each time :attr:`cold` changes.
        self.on_change: Callable[[], None] | None = None

    @property
    def cold(self) -> bool:
        return self._cold

    def answered(self) -> None:
        """The endpoint answered (a 200's first byte, a stream's end): it is up."""
        self._answered_at = self._clock()
        if self._cold:
            log.info("the serverless upstream answered: warm")
            self._flip(False)

    def not_up_yet(self, failure: JobRejected, attempt: int, retries: int) -> bool:
        """Whether ``failure`` (before any output, at try ``attempt`` from 0 of a job allowed
        ``retries`` more) is what a sleeping endpoint answers. Warm, a 429 is a rate limit, never
        that, and a 503 or a failed connection is an ordinary failure until the job's retries are
        spent: only then did the endpoint scale down under us, and it is cold again (so one tenant's
        rate-limited burst neither holds every slot in wake loops nor flips the announcement)."""
        if failure.status not in NOT_UP_YET:
            return False
        if self._cold:
            return True
        if failure.status == 429 or attempt < retries:
            return False
        log.info("the serverless upstream refused as a sleeping one does, past the retries (%s): cold",
                 failure.message)
        self._flip(True)
        return True

    def expire(self, *, busy: bool) -> float:
        """Cold again if ``idle_s`` passed since the last answer and nothing is ``busy`` (in flight);
        returns the seconds until it is worth looking again."""
        if self._cold or busy:
            return self.idle_s
        left = self._answered_at + self.idle_s - self._clock()
        if left > 0:
            return left
        log.info("the serverless upstream answered nothing for %g s: taken to be scaled down, cold", self.idle_s)
        self._flip(True)
        return self.idle_s

    async def watch(self, busy: Callable[[], bool]) -> None:
        """:meth:`expire` whenever it may be due, until cancelled."""
        while True:
            await asyncio.sleep(self.expire(busy=busy()))

    def window(self, started: float) -> float:
        """When the wake of a job that started at ``started`` (the caller's clock) gives up."""
        return started + self.cold_start_s

    def pause(self, attempt: int, backoff_s: float, retry_after_s: float | None) -> float:
        """The pause before try ``attempt`` + 1 of a waking endpoint: the upstream's Retry-After or the
        doubling, jittered backoff, at most :data:`PAUSE_CAP_S` either way."""
        if retry_after_s is not None:
            return min(retry_after_s, PAUSE_CAP_S)
        return min(backoff_s * 2 ** min(attempt, 16), PAUSE_CAP_S) * random.uniform(0.5, 1.0)

    def _flip(self, cold: bool) -> None:
        self._cold = cold
        if self.on_change is not None:
            self.on_change()
