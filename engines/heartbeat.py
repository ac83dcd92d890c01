"""An engine's heartbeat on a thread of its own: liveness never waits behind the engine's work.

The worker's event loop also runs the backend (vLLM's output handling and rendering, one job's
chunks after another): a job that keeps it busy for seconds must not let the engine's registry
entry expire (gateways would answer 503 for its model) nor its running jobs look abandoned (other
engines would reclaim them). :class:`HeartbeatThread` runs the beat on its own thread, with its
own event loop and its own Redis connection; Python switches threads every few milliseconds
however busy the main loop is.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("conduit.engine")


class HeartbeatThread:
    """Calls ``beat(redis)`` every ``interval`` seconds on its own thread and event loop, with a
    Redis client made there by ``connect()``; ``failed(exc)`` hears of each failed beat (which is
    outlived: the next one is tried on time)."""

    def __init__(self, connect: Callable[[], Any], beat: Callable[[Any], Awaitable[None]], interval: float,
                 failed: Callable[[BaseException], None]) -> None:
        self._connect = connect
        self._beat = beat
        self._interval = interval
        self._failed = failed
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop beating (a beat under way finishes first) and wait for the thread: no beat follows."""
        self._stopped = True
        if self._loop is not None and self._wake is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                pass  # its loop already ended
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the heartbeat thread did not stop within %.0f s", timeout)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        redis = self._connect()
        try:
            while not self._stopped:
                try:
                    # A beat that hangs (a frozen Redis) must not hold up the next one for long.
                    await asyncio.wait_for(self._beat(redis), timeout=max(self._interval * 3, 1.0))
                except Exception as exc:  # noqa: BLE001 - logged and counted by ``failed``; the next beat is tried
                    self._failed(exc)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
                except TimeoutError:
                    pass
        finally:
            await redis.aclose()
