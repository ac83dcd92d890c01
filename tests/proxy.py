"""A TCP proxy between a process and Redis that can break a connection at the worst moment.

``drop_after(marker, nth)``: the ``nth`` client-to-Redis write containing ``marker`` is
forwarded to Redis (which runs it), then the connection is closed before Redis's reply
gets back: the client sees a broken connection for a command that did happen, the case
an at-least-once client resends.

``stall()`` / ``stall_on(marker)`` / ``resume()``: every connection through the proxy stops
carrying bytes either way (they stay open, what was sent waits) until ``resume()``: a client
whose Redis connections hang while Redis itself serves everyone else. ``stall_on`` stalls as
the first write containing ``marker`` arrives, holding that write too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading


class FlakyProxy:
    """Forwards 127.0.0.1:``port`` to Redis at ``target_port``, in a thread of its own."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._marker = b""
        self._countdown = 0
        self._lock = threading.Lock()
        #: How many connections were broken on purpose.
        self.dropped = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._stall_marker = b""
        #: Whether bytes flow (cleared while stalled); made in the proxy's own loop.
        self._flowing: asyncio.Event
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def drop_after(self, marker: bytes, nth: int = 1) -> None:
        """Break the connection that carries the ``nth`` write containing ``marker`` (once)."""
        with self._lock:
            self._marker, self._countdown = marker, nth

    def stall(self) -> None:
        """Hold every byte, both ways, on every connection until :meth:`resume`."""
        asyncio.run_coroutine_threadsafe(self._set_flowing(False), self._loop).result(5)

    def stall_on(self, marker: bytes) -> None:
        """Stall (as :meth:`stall`) when a write containing ``marker`` arrives, before it is forwarded."""
        with self._lock:
            self._stall_marker = marker

    def resume(self) -> None:
        asyncio.run_coroutine_threadsafe(self._set_flowing(True), self._loop).result(5)

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    async def _set_flowing(self, on: bool) -> None:
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    def _should_stall(self, data: bytes) -> bool:
        with self._lock:
            if self._stall_marker and self._stall_marker in data:
                self._stall_marker = b""
                return True
        return False

    def _should_drop(self, data: bytes) -> bool:
        with self._lock:
            if self._countdown and self._marker in data:
                self._countdown -= 1
                if self._countdown == 0:
                    self.dropped += 1
                    return True
        return False

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, sock=self._sock))
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.add(client_w)
        try:
            redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.add(redis_w)
        broken = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self._should_stall(data):
                    self._flowing.clear()
                await self._flowing.wait()
                drop = self._should_drop(data)
                if drop:
                    broken.set()  # from now on nothing goes back to the client
                redis_w.write(data)
                await redis_w.drain()
                if drop:
                    await asyncio.sleep(0.05)  # let Redis run it
                    return

        async def downstream() -> None:
            while data := await redis_r.read(65536):
                await self._flowing.wait()
                if broken.is_set():
                    return
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for w in (client_w, redis_w):
            self._writers.discard(w)
            with contextlib.suppress(Exception):
                w.transport.abort()

    async def _shutdown(self) -> None:
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
