"""The gateway's HTTP/1.1 protocol: uvicorn's httptools protocol with a bounded request head.

uvicorn's httptools protocol takes a request line and headers of any size (measured: a
50 MB head was accepted and held), and every layer of the gateway then walks the header list.
:class:`BoundedHttpToolsProtocol` counts the bytes of each request's head as they arrive,
before the parser buffers them, and answers ``431`` in OpenAI's error envelope (then closes the
connection) once a head passes ``max_head_bytes`` (``GatewaySettings.max_header_bytes``).

A head is counted from the first read after the previous request ended; the rest of that
previous read (pipelined bytes, at most one socket read) is the only slack.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import ConduitError, encode_error


class HeaderTooLarge(ConduitError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_too_large"


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``uvicorn --http gateway.server:BoundedHttpToolsProtocol`` (see the module docstring)."""

    #: Set from the settings by each worker process before it serves (``gateway.app.asgi_from_env``).
    max_head_bytes = 65_536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Bytes of the current request's head read so far; -1 between its end and the next request.
        self._head = 0
        #: Heads parsed on this connection.
        self._heads = 0

    def on_headers_complete(self) -> None:
        self._head = -1
        self._heads += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head = 0

    def data_received(self, data: bytes) -> None:
        if self._head < 0:
            super().data_received(data)
            return
        limit = self.max_head_bytes
        if self._head + len(data) <= limit:
            self._head += len(data)
            super().data_received(data)
            return
        # The head would pass the limit within this read: parse what fits, and refuse the request
        # if its head has not ended by then (the rest, a body or the next request, is parsed as usual).
        fits = limit - self._head
        heads = self._heads
        super().data_received(data[:fits])
        if self._heads == heads:
            self._refuse()
            return
        if not self.transport.is_closing():
            super().data_received(data[fits:])

    def _refuse(self) -> None:
        err = HeaderTooLarge(f"The request's line and headers are larger than this server accepts "
                             f"({self.max_head_bytes} bytes).")
        body = encode_error(err)
        self.transport.write(b"".join([
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n", b"content-type: application/json\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\n", b"connection: close\r\n\r\n", body]))
        self.transport.close()
