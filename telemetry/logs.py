"""Logs: JSON lines for machines (``log_format="json"``), and the per-request log.

Every process logs through :mod:`logging`; :func:`configure_logging` picks text (people at a
terminal) or JSON lines (log collectors: one object a line with ``ts``, ``level``, ``logger``,
``message``, the process's ``service`` and ``instance``, the exception's traceback, and any
``extra`` fields).

The request log (:class:`RequestLog`) is one JSON line per finished HTTP request, whatever the
format of the rest: request id, method, route, status, model, operation, key *name*, durations
and token counts, trace id (its span's, or the client's ``traceparent``'s when not traced here).
It never holds an API key or request content; the prompt only when the operator turns it on
(``log_prompts``), cut to a bound. It does not go through :mod:`logging` (a record costs it ~10 µs): lines are encoded by msgspec
and written in batches, at most every ``flush_s``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, BinaryIO

import msgspec

#: LogRecord attributes that are not ``extra`` fields.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self, service: str = "", instance: str = "") -> None:
        super().__init__()
        self.static = {k: v for k, v in (("service", service), ("instance", instance)) if v}
        self._encode = msgspec.json.Encoder().encode

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00",
                                                                                                         "Z"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(), **self.static}
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = record.stack_info
        return self._encode(out).decode()


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info", fmt: str = "text", *, service: str = "", instance: str = "") -> None:
    """Set up the root logger: ``text`` or ``json`` lines on stderr."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service, instance) if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())


class RequestRecord(msgspec.Struct, omit_defaults=True):
    """One line of the request log (fields left at their default are not written)."""

    ts: str
    level: str
    logger: str
    request_id: str
    method: str
    route: str
    status: int
    duration_ms: float
    service: str = ""
    instance: str = ""
    #: The response's id (``chatcmpl-...``): the job id engines log.
    id: str = ""
    model: str = ""
    operation: str = ""
    stream: bool | None = None
    key: str = ""
    #: The error code of a refused or failed request.
    error: str = ""
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    images: int | None = None
    resubmits: int = 0
    trace_id: str = ""
    client: str = ""
    #: Only with ``log_prompts``: the request's ``messages`` / ``prompt``, cut to ``log_prompt_chars``.
    prompt: str | None = None


class RequestLog:
    """Writes :class:`RequestRecord` lines to a binary stream, batched (see the module docstring).
    Records carry ``service`` and ``instance`` themselves (their writer fills them from these)."""

    def __init__(self, stream: BinaryIO | None = None, *, service: str = "", instance: str = "",
                 flush_s: float = 0.1, max_buffer: int = 256 * 1024) -> None:
        self.stream = stream if stream is not None else sys.stderr.buffer
        self.service = service
        self.instance = instance
        self.flush_s = flush_s
        self.max_buffer = max_buffer
        self._encode = msgspec.json.Encoder().encode_into
        self._buffer = bytearray()
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def write(self, record: RequestRecord) -> None:
        """Queue one line; it is written within ``flush_s`` (at once past ``max_buffer``)."""
        self._encode(record, self._buffer, -1)
        self._buffer += b"\n"
        if len(self._buffer) >= self.max_buffer:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            try:
                loop = self._loop or asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._loop = loop
            loop.call_later(self.flush_s, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._buffer:
            return
        data, self._buffer = bytes(self._buffer), bytearray()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: the lines are lost, the server is not
            pass


_second: list[Any] = [-1, ""]
_MILLIS = [f".{ms:03d}Z" for ms in range(1000)]


def timestamp(epoch_ms: int | None = None) -> str:
    """RFC 3339 UTC with milliseconds, as every log line writes it (the date and time to the
    second are formatted once a second; the request log writes one a request)."""
    second, ms = divmod(time.time_ns() // 1_000_000 if epoch_ms is None else epoch_ms, 1000)
    if second != _second[0]:
        _second[:] = [second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return _second[1] + _MILLIS[ms]
