"""The outermost layer of the gateway: every request's id, span, metrics and log line.

:class:`RequestObserver` wraps everything else (the auth guard, idempotency, the app), so it
sees every request, refusals at the door included:

* ``x-request-id``: a client's own is echoed, otherwise one is made; kept at
  ``scope["state"]["request_id"]`` and read when the response starts (an idempotent replay
  puts the first request's there);
* the request's server span, when tracing is on and the trace is sampled
  (``scope["state"]["span"]``: the dispatcher hangs the queue span under it);
* once the last byte is out: ``http.server.request.duration`` for every request, the
  ``gen_ai.*`` metrics of a generation request (what its :class:`~gateway.dispatch.JobRun`,
  at ``scope["state"]["run"]``, knows: model, time to first token, usage), the span's end, and
  one line of the request log.

Everything after the last byte is off the latency's path; what it costs in CPU is bounded by
the benchmark (``benchmarks/telemetry_overhead.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.settings import GatewaySettings
from telemetry.instruments import OPERATIONS, GatewayMetrics
from telemetry.logs import RequestLog, RequestRecord, timestamp
from telemetry.tracing import SpanKind, Status, StatusCode, Tracing, parse_traceparent


#: Probes and scrapes: counted in ``http.server.request.duration`` but neither traced nor logged
#: (a load balancer's health checks would otherwise be most of both).
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})


class _Prompt(msgspec.Struct):
    messages: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()


_PROMPT = msgspec.json.Decoder(_Prompt)


def note_prompt(scope: Scope, body: bytes, settings: GatewaySettings) -> None:
    """With ``log_prompts`` on, keep the request's ``messages`` / ``prompt`` (as sent, cut to
    ``log_prompt_chars``) for its log line. Off (the default), request content is never logged."""
    if not settings.log_prompts:
        return
    try:
        raw = _PROMPT.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    text = bytes(raw.messages if len(raw.messages) else raw.prompt).decode(errors="replace")
    scope.setdefault("state", {})["prompt"] = text[:settings.log_prompt_chars]  # type: ignore[typeddict-item]


class RequestObserver:
    """ASGI middleware (see the module docstring). ``route_of(path, method)`` names a path's
    route template for requests refused before routing (Litestar sets it on the others)."""

    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics | None, tracing: Tracing, log: RequestLog | None,
                 route_of: Callable[[str, str], str]) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing
        self.log = log
        self.route_of = route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = b""
        traceparent = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value[:128]
            elif name == b"traceparent":
                traceparent = value
        if not rid:
            rid = b"req_" + os.urandom(12).hex().encode()
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}  # type: ignore[typeddict-unknown-key]
        state["request_id"] = rid
        quiet = scope["path"] in QUIET_PATHS
        tracing = self.tracing
        if tracing.enabled and not quiet:
            parent = parse_traceparent(traceparent.decode("latin-1") if traceparent else None)
            if tracing.sample(parent):
                state["span"] = tracing.start(f"{scope['method']} {scope['path']}", SpanKind.SERVER, parent,
                                              {"http.request.method": scope["method"], "url.path": scope["path"]})
        response: list[Any] = [0, None]  # status, when the last byte went out

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                response[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", state["request_id"])]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await send(message)
                response[1] = time.perf_counter()
                return
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            ended = response[1] or time.perf_counter()
            self._finished(scope, state, response[0] or 499, ended - started, quiet)

    def _finished(self, scope: Scope, state: dict[str, Any], status: int, seconds: float, quiet: bool) -> None:
        method = scope["method"]
        template = scope.get("path_template")  # type: ignore[typeddict-item]
        route = template_name(template) if template else self.route_of(scope["path"], method)
        run = state.get("run")
        metrics = self.metrics
        if metrics is not None:
            metrics.http_request(route, method, status, seconds)
            if run is not None:
                u = run.usage
                metrics.request_finished(run.model, OPERATIONS.get(run.job.kind, run.job.kind), status, seconds,
                                         run.ttft, u.prompt_tokens if u else None, u.completion_tokens if u else None)
        span = state.get("span")
        if span is not None:
            self._end_span(span, route, method, status, state, run)
        if self.log is not None and not quiet:
            self._log(scope, state, route, method, status, seconds, run, span)

    @staticmethod
    def _end_span(span: Any, route: str, method: str, status: int, state: dict[str, Any], run: Any) -> None:
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("conduit.request.id", state["request_id"].decode("latin-1"))
        error = state.get("error")
        if error:
            span.set_attribute("error.type", error)
        if run is not None:
            span.set_attribute("gen_ai.operation.name", OPERATIONS.get(run.job.kind, run.job.kind))
            span.set_attribute("gen_ai.request.model", run.model)
            span.set_attribute("gen_ai.response.id", run.rid)
            if run.usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", run.usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", run.usage.completion_tokens)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, error or None))
        span.end()

    def _log(self, scope: Scope, state: dict[str, Any], route: str, method: str, status: int, seconds: float,
             run: Any, span: Any) -> None:
        record = RequestRecord(ts=timestamp(), level="info", logger="conduit.request", request_id=state["request_id"].decode("latin-1"), method=method,
                               route=route, status=status, duration_ms=round(seconds * 1000, 3),
                               error=state.get("error") or "", prompt=state.get("prompt"))
        principal = state.get("principal")
        if principal is not None and principal.key_id:
            record.key = principal.name
        client = scope.get("client")
        if client:
            record.client = client[0]
        if run is not None:
            record.id = run.rid
            record.model = run.model
            record.operation = OPERATIONS.get(run.job.kind, run.job.kind)
            record.stream = run.job.stream
            record.resubmits = run.resubmits
            if run.ttft is not None:
                record.ttft_ms = round(run.ttft * 1000, 3)
            u = run.usage
            if u is not None:
                record.prompt_tokens = u.prompt_tokens
                if run.job.kind == "image":
                    record.images = run.cost.images
                else:
                    record.completion_tokens = u.completion_tokens
        if span is not None:
            record.trace_id = f"{span.get_span_context().trace_id:032x}"
        self.log.write(record)  # type: ignore[union-attr]


def template_name(path_template: str) -> str:
    """Litestar's ``/v1/models/{model_id:path}`` as ``/v1/models/{model_id}``."""
    if ":" not in path_template:
        return path_template
    out, i = [], 0
    while True:
        j = path_template.find("{", i)
        if j < 0:
            out.append(path_template[i:])
            return "".join(out)
        k = path_template.find("}", j)
        out.append(path_template[i:j])
        out.append("{" + path_template[j + 1:k].split(":", 1)[0] + "}")
        i = k + 1
