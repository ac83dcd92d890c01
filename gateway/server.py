"""The gateway's HTTP/1.1 protocol: uvicorn's httptools protocol with bounded request heads.

uvicorn's httptools protocol takes a request line, headers and a chunked body's trailers of any
size (measured: a 50 MB head was accepted and held, and 200 MB of trailers), and every layer
of the gateway then walks the header list; and it queues every pipelined request a read holds
(8 MB of pipelined ``GET /health`` took a gateway from 67 MB to 657 MB). The
:class:`BoundedHttpToolsProtocol` refuses a request whose line, headers and trailers pass
``max_head_bytes`` (``ServerSettings.max_header_bytes``) with a ``431`` in OpenAI's error
envelope, before the app sees it, then closes the connection; and closes a connection that
queues more than :data:`MAX_PIPELINED` requests behind the one being answered.

* What the parser reports complete (the URL, each header and trailer) is counted exactly.
* What it may still be buffering (a header not finished yet) is counted as the bytes fed to it
  since it last reported something. Every read is fed in pieces no larger than the room left
  (a body, in pieces of the bound), so the parser never holds more than twice the bound however
  the bytes arrive.
* Body bytes are not counted (Litestar bounds a body: 413).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import ConduitError, encode_error

#: Requests a connection may have queued behind the one being answered (HTTP/1.1 pipelining).
MAX_PIPELINED = 32


class HeaderTooLarge(ConduitError, status=431, type="invalid_request_error", code="request_header_too_large"):
    """A request line and headers larger than the server accepts."""


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a connection that was just refused."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``uvicorn --http gateway.server:BoundedHttpToolsProtocol`` (see the module docstring)."""

    #: Set from the settings by each worker process before it serves (``gateway.app.asgi_from_env``).
    max_head_bytes = 65_536
    #: Called once when this worker's server begins its graceful shutdown (uvicorn shuts each open
    #: connection down first, before it waits for their requests): the app's lifespan sets it
    #: (``gateway.cold.ColdStarts.drain``: requests waiting for a cold model are answered at once).
    on_shutdown: ClassVar[Callable[[], None] | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The current request's URL, headers and trailers so far, as the parser reported them.
        self._head = 0
        #: Bytes fed since the parser last reported anything: what it may be buffering.
        self._pending = 0
        #: Between the end of a request's headers and of its body, unless the body is chunked.
        self._plain_body = False
        self._refused = False

    def shutdown(self) -> None:
        hook = BoundedHttpToolsProtocol.on_shutdown
        if hook is not None:
            hook()
        super().shutdown()

    def on_message_begin(self) -> None:
        self._head = self._pending = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._head += len(url)
        self._pending = 0
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head += len(name) + len(value) + 4
        self._pending = 0
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        # Decided before the request exists for the app (uvicorn starts it in the call below).
        if self._head + self._pending > self.max_head_bytes:
            self._refuse()
        if len(self.pipeline) >= MAX_PIPELINED:
            self._refused = True
            self.transport.close()
            raise _Refused
        self._pending = 0
        self._plain_body = True
        super().on_headers_complete()

    def on_chunk_header(self) -> None:
        self._plain_body = False
        self._pending = 0

    def on_chunk_complete(self) -> None:
        self._pending = 0

    def on_body(self, body: bytes) -> None:
        self._pending = 0
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._plain_body = False
        self._pending = 0
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        limit = self.max_head_bytes
        while data and not self._refused:
            room = limit if self._plain_body else limit - self._head - self._pending
            if room <= 0:
                self._refuse_now()
                return
            piece, data = (data, b"") if len(data) <= room else (data[:room], data[room:])
            self._pending += len(piece)
            super().data_received(piece)
            if self.transport.is_closing():
                return
        if not self._refused and self._head + self._pending > limit:
            self._refuse_now()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a refusal already answered (parsing was stopped by raising)
            super().send_400_response(msg)

    def _refuse(self) -> None:
        """From a parser callback: answer 431 and stop parsing (uvicorn sends no 400 of its own)."""
        self._refuse_now()
        raise _Refused

    def _refuse_now(self) -> None:
        self._refused = True
        err = HeaderTooLarge(f"The request's line and headers are larger than this server accepts "
                             f"({self.max_head_bytes} bytes).")
        body = encode_error(err)
        self.transport.write(b"".join([
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n", b"content-type: application/json\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\n", b"connection: close\r\n\r\n", body]))
        self.transport.close()
