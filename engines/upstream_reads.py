"""What the upstream answers, read with bounds and mapped: its errors as Conduit's (never copied: only
a client's own mistake relays the upstream's words, clipped), and its body's bytes and stream lines
read without ever buffering more than a bound. Shared by the chat and completions relay
(``engines.upstream_relay``) and the image relay (``engines.upstream_images``); no I/O here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from engines.backend import JobRejected

log = logging.getLogger("conduit.engine")


class Retryable(Exception):
    """The upstream failed in a way worth another try before any output (connection, 5xx, 429, a
    timeout); ``final`` is what the job fails with once the tries (or its deadline) run out."""

    def __init__(self, final: JobRejected, retry_after_s: float | None = None) -> None:
        super().__init__(final.message)
        self.final = final
        self.retry_after_s = retry_after_s


class _ErrorBody(msgspec.Struct):
    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class _Envelope(msgspec.Struct):
    error: _ErrorBody | str | None = None
    #: vLLM's older error bodies, and some other servers': the fields at the top level.
    message: str = ""
    param: str | None = None


def error_body(data: bytes) -> _ErrorBody:
    """An upstream's error body, however it spells it (OpenAI's envelope, a bare object, plain text)."""
    try:
        env = msgspec.json.decode(data, type=_Envelope)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return _ErrorBody(message=data[:MESSAGE_CHARS].decode(errors="replace").strip())
    if isinstance(env.error, _ErrorBody):
        return env.error
    return _ErrorBody(message=env.error or env.message, param=env.param)


def retry_after(headers: Any) -> float | None:
    """The upstream's ``Retry-After`` in seconds (only the delta-seconds form), if any."""
    try:
        value = float(headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if 0 <= value < 3600 else None


#: The most of an upstream's error body read (the rest is never read: an upstream cannot make the
#: engine buffer without limit), and the most of its message relayed or logged.
ERROR_BODY_BYTES = 64 * 1024
MESSAGE_CHARS = 500


def clipped(text: str | None, limit: int = MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut)."""
    text = text or ""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def mapped_error(status: int, data: bytes, headers: Any, model: str) -> Exception:
    """An upstream's error answer as Conduit's (mapped, never copied: the upstream's codes name its
    own clients' problems, not Conduit's clients'): a :class:`JobRejected`, or :class:`Retryable`.

    Only a 400/422 (the client's own mistake) relays the upstream's message and ``param`` (clipped);
    every other status answers Conduit's own message and logs the upstream's (clipped): a 401/403,
    a quota or a 5xx page is about Conduit's account and the upstream's insides, not the client's
    request. A 429 for an exhausted quota (``insufficient_quota``) is not retried and is a 502
    ``engine_error``: no retry, by this engine or the client, cures it, and it is the operator's
    account that is out, as with a refused credential."""
    body = error_body(data)
    upstream = clipped(body.message) or f"(status {status}, no message)"
    if status in (400, 422):
        return JobRejected(clipped(body.message) or f"The model's upstream server refused the request ({status}).",
                           status=400, code="invalid_request", param=clipped(body.param, 128) or None)
    if status == 429 and "insufficient_quota" in (str(body.code), str(body.type)):
        log.error("the upstream says this engine's quota is exhausted (429: %s)", upstream)
        return JobRejected("The model's upstream server refused Conduit's account: its quota is exhausted.",
                           status=502, code="engine_error", type="server_error")
    if status in (401, 403):
        # Conduit's own credential (CONDUIT_UPSTREAM_API_KEY) is wrong: the operator's problem, never
        # the client's invalid_api_key.
        log.error("the upstream refused this engine's credentials (%d: %s): check CONDUIT_UPSTREAM_API_KEY / "
                  "--upstream-api-key-file", status, upstream)
        return JobRejected("The upstream rejected Conduit's credentials.", status=502, code="engine_error",
                           type="server_error")
    log.warning("the upstream answered %d for model %s: %s", status, model, upstream)
    if status == 404:
        # (``model`` is the upstream's own name, which --upstream-model may keep from clients: logged above only)
        return JobRejected("The model is not available from its upstream server.", status=503,
                           code="model_unavailable", type="server_error")
    if status == 429:
        wait = retry_after(headers)
        return Retryable(JobRejected("The model's upstream server is rate limited.", status=429,
                                     code="model_overloaded", type="rate_limit_error",
                                     retry_after_s=max(1, round(wait or 1))), wait)
    if status == 503:  # the upstream says it cannot serve now (no replica, loading, draining)
        wait = retry_after(headers)
        return Retryable(JobRejected("The model's upstream server is unavailable.", status=503,
                                     code="model_unavailable", type="server_error",
                                     retry_after_s=max(1, round(wait or 1))), wait)
    if status >= 500 or status == 408:
        return Retryable(JobRejected(f"The model's upstream server failed ({status}).", status=502,
                                     code="engine_error", type="server_error"), retry_after(headers))
    if not 400 <= status < 500:  # a redirect (never followed: it would send the body and credential on) or worse
        log.error("the upstream answered %d (location %r): check --base-url", status,
                  clipped(str(headers.get("location", "")), 200))
        return JobRejected(f"The model's upstream server answered an unexpected status ({status}).", status=502,
                           code="engine_error", type="server_error")
    return JobRejected(f"The model's upstream server refused the request ({status}).", status=400,
                       code="invalid_request")


# ---- the stream ------------------------------------------------------------------------------
#: The longest line of the upstream's stream read (one chunk: a choice's delta, logprobs and usage;
#: far under this). A client library's line reader buffers a line without limit, so :func:`bounded_lines`
#: reads the lines from the raw bytes instead.
MAX_LINE_BYTES = 1024 * 1024
_EOL = re.compile(rb"\r\n|\r|\n")


class LineTooLong(Exception):
    """A line of the upstream's stream grew past :data:`MAX_LINE_BYTES` before it ended."""


async def bounded_lines(chunks: AsyncIterator[bytes], limit: int = MAX_LINE_BYTES) -> AsyncIterator[str]:
    """The lines of a byte stream (SSE's line ends: CRLF, LF or CR), none longer than ``limit`` bytes:
    :class:`LineTooLong` as soon as one passes it (never buffering more than ``limit`` plus a chunk)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        if b"\r" in chunk:  # (rare: most servers end lines with LF alone) every line end made LF
            chunk = _EOL.sub(b"\n", chunk)
        lines = chunk.split(b"\n")
        rest = lines.pop()  # what follows the last line end: the start of a line to come
        for piece in lines:
            if size + len(piece) > limit:
                raise LineTooLong
            line = b"".join((*parts, piece)) if parts else piece
            parts, size = [], 0
            yield line.decode(errors="replace")
        if rest:
            size += len(rest)
            if size > limit:
                raise LineTooLong
            parts.append(rest)
    if parts:
        yield b"".join(parts).decode(errors="replace")


async def bounded_body(chunks: AsyncIterator[bytes], limit: int = ERROR_BODY_BYTES) -> bytes:
    """At most ``limit`` bytes of a body (an error answer's); the rest is never read."""
    data = bytearray()
    async for chunk in chunks:
        data += chunk[:limit - len(data)]
        if len(data) >= limit:
            break
    return bytes(data)
