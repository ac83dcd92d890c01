"""An image edit's body read as it arrives, within bounds: the multipart form (``multipart``'s push
parser) or the JSON form, counted against the request's bound (``max_edit_bytes``: a 413) and
against what the gateway as a whole holds of edit bodies (:class:`EditBytes`: a 503), before a
byte is parsed. Nothing is read before the request's key was checked (the guard runs first).
"""

from __future__ import annotations

import re
from typing import Any

from litestar import Request
from litestar.exceptions import InternalServerException

from gateway.errors import ConduitError, InvalidRequest, PayloadTooLarge
from gateway.run import ClientDisconnected

#: Parts of a multipart body (fields and files), and bytes of one text field (a 32,000-character
#: prompt fits in any UTF-8).
MAX_PARTS = 64
MAX_FIELD_BYTES = 160 * 1024
#: The parts that are files whatever their headers say (a part with only ``filename*=`` is one too).
FILES = frozenset({"image", "image[]", "mask"})
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{1,70}")


class EditBytes:
    """The bytes of edit bodies this gateway holds at once (read, or read and not yet in the blob
    store), at most ``limit``: beyond it a request is answered 503 ``server_busy`` at once, so many
    large uploads together cannot exhaust the gateway's memory. A slow client holds only what it sent."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self) -> Held:
        return Held(self)


class Held:
    """What one request's body holds of :class:`EditBytes`; given back once (``release``)."""

    __slots__ = ("budget", "size")

    def __init__(self, budget: EditBytes) -> None:
        self.budget = budget
        self.size = 0

    def add(self, n: int) -> None:
        budget = self.budget
        if budget.held + n > budget.limit:
            self.release()
            raise ConduitError("This server holds as many image uploads as it can right now; retry shortly.",
                               status=503, code="server_busy", type="server_error")
        budget.held += n
        self.size += n

    def release(self) -> None:
        self.budget.held -= self.size
        self.size = 0

    def __del__(self) -> None:  # a request that ended any way at all gives its bytes back
        if self.size:
            self.release()


async def _chunks(request: Request[Any, Any, Any], limit: int, held: Held) -> Any:
    if (request.content_length or 0) > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
            held.add(len(chunk))
            yield chunk
    except InternalServerException:  # Litestar's "client disconnected prematurely"
        raise ClientDisconnected from None


async def read_body(request: Request[Any, Any, Any], limit: int, held: Held) -> bytes:
    """A JSON body, at most ``limit`` bytes (the route lifts the server's ``max_body_bytes``)."""
    return b"".join([chunk async for chunk in _chunks(request, limit, held)])


async def read_form(request: Request[Any, Any, Any], limit: int,
                    held: Held) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """A multipart body's text fields (UTF-8) and files, read as it arrives within every bound."""
    from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser

    boundary = request.content_type[1].get("boundary", "")
    if not _BOUNDARY.fullmatch(boundary):
        raise InvalidRequest("The multipart/form-data body names no valid boundary in its Content-Type.",
                             code="invalid_multipart")
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    segment: MultipartSegment | None = None
    data = bytearray()
    try:
        with PushMultipartParser(boundary, max_segment_size=limit, max_segment_count=MAX_PARTS,
                                 strict=True) as parser:
            async for chunk in _chunks(request, limit, held):
                for part in parser.parse(chunk):
                    if isinstance(part, MultipartSegment):
                        segment, data = part, bytearray()
                    elif part:
                        data += part
                        if segment is not None and segment.name not in FILES and segment.filename is None \
                                and len(data) > MAX_FIELD_BYTES:
                            raise InvalidRequest(f"The form field '{segment.name}' is longer than "
                                                 f"{MAX_FIELD_BYTES} bytes.", param=segment.name, code="invalid_value")
                    elif segment is not None:  # the part's end
                        if segment.name in FILES or segment.filename is not None:
                            files.append((segment.name, bytes(data)))
                        elif segment.name in fields:
                            raise InvalidRequest(f"The form field '{segment.name}' is given twice.",
                                                 param=segment.name, code="invalid_value")
                        else:
                            fields[segment.name] = data.decode("utf-8")
                        segment = None
    except ParserLimitReached as exc:
        raise InvalidRequest(f"The multipart/form-data body is beyond this server's limits ({exc}; at most "
                             f"{MAX_PARTS} parts).", code="invalid_multipart") from None
    except (ParserError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The multipart/form-data body is malformed ({exc}).", code="invalid_multipart") from None
    return fields, files
