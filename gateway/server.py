"""The gateway's HTTP/1.1 protocol: uvicorn's httptools protocol with bounded request heads.

uvicorn's httptools protocol takes a request line, headers and a chunked body's trailers of any
size (measured: a 50 MB head was accepted and held, and 200 MB of trailers), and every layer
of the gateway then walks the header list. :class:`BoundedHttpToolsProtocol` refuses a request
whose line, headers and trailers pass ``max_head_bytes`` (``GatewaySettings.max_header_bytes``)
with a ``431`` in OpenAI's error envelope, then closes the connection:

* what the parser reports complete (the URL, each header and trailer) is counted exactly;
* what it is still buffering (a header not finished yet) is counted as the bytes read since it
  last reported something, and a read that would pass the bound is fed in small pieces, so the
  parser never holds more than twice the bound however the bytes arrive;
* a ``Content-Length`` body is not counted (Litestar bounds it: 413), nor a chunked body's data.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import ConduitError, encode_error

#: Bytes fed to the parser at a time once a read could pass the bound.
_PIECE = 4096


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
        #: The current request's URL, headers and trailers so far, as the parser reported them.
        self._head = 0
        #: Bytes read since the parser last reported anything: what it may be buffering.
        self._pending = 0
        #: Between the end of a request's headers and of its body, unless the body is chunked.
        self._plain_body = False

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
        if self._plain_body or self._head + self._pending + len(data) <= limit:
            self._pending += len(data)
            super().data_received(data)
        else:
            for i in range(0, len(data), _PIECE):
                self._pending += min(_PIECE, len(data) - i)
                super().data_received(data[i:i + _PIECE])
                if self.transport.is_closing() or self._head + self._pending > limit:
                    break
                if self._plain_body:
                    super().data_received(data[i + _PIECE:])
                    break
        if self._head + self._pending > limit and not self.transport.is_closing():
            self._refuse()

    def _refuse(self) -> None:
        err = HeaderTooLarge(f"The request's line and headers are larger than this server accepts "
                             f"({self.max_head_bytes} bytes).")
        body = encode_error(err)
        self.transport.write(b"".join([
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n", b"content-type: application/json\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\n", b"connection: close\r\n\r\n", body]))
        self.transport.close()
