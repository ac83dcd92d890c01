"""The outermost layer of the gateway: every request's id, span, metrics and log line.

:class:`RequestObserver` wraps everything else (the auth guard, idempotency, the app), so it
sees every request, refusals at the door included:

* the request's :class:`~gateway.context.RequestContext` (``scope["state"]["ctx"]``), which
  every layer inside reads and fills, with the client's address (``gateway.proxies``);
* ``x-request-id``: a client's own is echoed, otherwise one is made; kept in the context's
  ``request_id`` and read when the response starts (an idempotent replay puts the first
  request's there);
* the request's server span, when tracing is on and the trace is sampled (the context's
  ``span``: the dispatcher hangs the queue span under it). A client's ``traceparent`` names the
  trace either way, but its *sampled* flag counts only for a request the guard authenticated
  (``RequestContext.authenticated``), or anyone could have every request recorded and exported:
  such a span is made at the start, since the guard decides later, and dropped unexported at the
  end unless the request was authenticated (or ``trace_sample_ratio`` would have kept it anyway);
* once the last byte is out: ``http.server.request.duration`` for every request, the
  ``gen_ai.*`` metrics of a generation request (what its :class:`~gateway.run.JobRun`, the
  context's ``run``, knows: model, time to first token, usage), the span's end, and one line
  of the request log.

Everything after the last byte is off the latency's path; what it costs in CPU is bounded by
the benchmark (``benchmarks/telemetry_overhead.py``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.context import CTX, RequestContext
from gateway.proxies import TrustedProxies
from gateway.settings import TelemetrySettings
from telemetry.instruments import OPERATIONS, GatewayMetrics
from telemetry.logs import RequestLog, RequestRecord, timestamp
from telemetry.tracing import SpanKind, Status, StatusCode, Tracing, parse_traceparent, trace_id_of

log = logging.getLogger("conduit.gateway")

#: Methods recorded by name (OpenTelemetry's list); any other is ``_OTHER``.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})

#: Probes and scrapes: counted in ``http.server.request.duration`` but neither traced nor logged
#: (a load balancer's health checks would otherwise be most of both).
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})


class _Prompt(msgspec.Struct):
    messages: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()


_PROMPT = msgspec.json.Decoder(_Prompt)


def note_prompt(ctx: RequestContext, body: bytes, settings: TelemetrySettings) -> None:
    """With ``log_prompts`` on, keep the request's ``messages`` / ``prompt`` (as sent, cut to
    ``log_prompt_chars``) for its log line. Off (the default), request content is never logged."""
    if not settings.log_prompts:
        return
    try:
        raw = _PROMPT.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    text = bytes(raw.messages if len(raw.messages) else raw.prompt).decode(errors="replace")
    ctx.prompt = text[:settings.log_prompt_chars]


@dataclass(slots=True)
class RequestObserver:
    """ASGI middleware (see the module docstring). ``route_of(path, method)`` names a path's
    route template for requests refused before routing (Litestar sets it on the others)."""

    app: ASGIApp
    _: KW_ONLY
    metrics: GatewayMetrics | None
    tracing: Tracing
    log: RequestLog | None
    route_of: Callable[[str, str], str]
    #: Who may say who the client is (nobody by default: the TCP peer is the client).
    proxies: TrustedProxies = field(default_factory=TrustedProxies)

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
        ctx = RequestContext(rid, self.proxies.resolve(scope))
        if traceparent:
            # For the job (its engine's logs join the client's trace), read here once.
            ctx.traceparent = traceparent[:55].decode("latin-1")
        state = scope.get("state")
        if state is None:
            scope["state"] = {CTX: ctx}  # type: ignore[typeddict-unknown-key]
        else:
            state[CTX] = ctx
        quiet = scope["path"] in QUIET_PATHS
        tracing = self.tracing
        provisional = False  # sampled on the client's word alone: kept only if the guard authenticates it
        if tracing.enabled and not quiet:
            parent = parse_traceparent(traceparent.decode("latin-1")) if traceparent else None
            if parent is not None and parent.sampled:
                provisional = not tracing.sample(None)
            if tracing.sample(parent):
                ctx.span = tracing.start(f"{scope['method']} {scope['path']}", SpanKind.SERVER, parent,
                                              {"http.request.method": scope["method"]})
        response: list[Any] = [0, None]  # status, when the last byte went out

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                response[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", ctx.request_id)]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await send(message)
                response[1] = time.perf_counter()
                return
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            if not response[0]:
                response[0] = 500  # what the server answers for it
                if not ctx.error:
                    ctx.error = "internal_error"
            raise
        finally:
            if provisional and not ctx.authenticated:
                ctx.span = None  # never ended: not exported
            ended = response[1] or time.perf_counter()
            try:
                self._finished(scope, ctx, response[0] or 499, ended - started, quiet)
            except Exception:  # the answer is out: what records it must never fail the request
                log.exception("recording a finished request failed")

    def _finished(self, scope: Scope, ctx: RequestContext, status: int, seconds: float, quiet: bool) -> None:
        method = scope["method"]
        template = scope.get("path_template")  # type: ignore[typeddict-item]
        route = template_name(template) if template else self.route_of(scope["path"], method)
        if method not in HTTP_METHODS:
            method = "_OTHER"  # a client's made-up method must not make a label of its own
        run = ctx.run
        # Every refusal and failure, by its code: the guard's, the idempotency middleware's, the
        # app's errors and streams that failed after their 200 (counted, logged and traced here).
        error = ctx.error or (run.error if run is not None else "")
        metrics = self.metrics
        if metrics is not None:
            if error:
                metrics.rejected(error)
            if run is None:
                metrics.request(route, method, status, seconds)
            else:
                u = run.usage
                metrics.request(route, method, status, seconds, run.model, OPERATIONS.get(run.job.kind, run.job.kind),
                                run.ttft, u.prompt_tokens if u else None, u.completion_tokens if u else None)
        span = ctx.span
        if span is not None:
            self._end_span(span, route, method, status, ctx, run, error)
        if self.log is not None and not quiet:
            self._log(scope, ctx, route, method, status, seconds, run, span, error)

    @staticmethod
    def _end_span(span: Any, route: str, method: str, status: int, ctx: RequestContext, run: Any,
                  error: str) -> None:
        span.name = f"{method} {route}"
        attrs = span.attributes
        attrs["http.route"] = route
        attrs["http.response.status_code"] = status
        attrs["conduit.request.id"] = ctx.request_id.decode("latin-1")
        if error:
            attrs["error.type"] = error
        if run is not None:
            attrs["gen_ai.operation.name"] = OPERATIONS.get(run.job.kind, run.job.kind)
            attrs["gen_ai.request.model"] = run.model
            attrs["gen_ai.response.id"] = run.rid
            if run.usage is not None:
                attrs["gen_ai.usage.input_tokens"] = run.usage.prompt_tokens
                attrs["gen_ai.usage.output_tokens"] = run.usage.completion_tokens
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, error or None))
        span.end()

    def _log(self, scope: Scope, ctx: RequestContext, route: str, method: str, status: int, seconds: float,
             run: Any, span: Any, error: str) -> None:
        log: RequestLog = self.log  # type: ignore[assignment]
        principal = ctx.principal
        # Positional arguments, in RequestRecord's field order: a line costs a few microseconds
        # (benchmarks/telemetry_overhead.py holds the whole of telemetry within 5%).
        if run is None:
            record = RequestRecord(
                timestamp(), "info", "conduit.request", ctx.request_id.decode("latin-1"), method, route, status,
                int(seconds * 1_000_000 + 0.5) / 1000, log.service, log.instance, "", "", "", None,
                principal.name if principal.key_id else "", error,
                None, None, None, None, 0, f"{span.context.trace_id:032x}" if span is not None else trace_id_of(ctx.traceparent),
                ctx.client, None)
        else:
            job, u, ttft = run.job, run.usage, run.ttft
            image = job.kind == "image"
            record = RequestRecord(
                timestamp(), "info", "conduit.request", ctx.request_id.decode("latin-1"), method, route, status,
                int(seconds * 1_000_000 + 0.5) / 1000, log.service, log.instance, run.rid, run.model,
                OPERATIONS.get(job.kind, job.kind), job.stream,
                principal.name if principal.key_id else "",
                error, int(ttft * 1_000_000 + 0.5) / 1000 if ttft is not None else None,
                u.prompt_tokens if u is not None else None,
                u.completion_tokens if u is not None and not image else None,
                run.cost.images if u is not None and image else None, run.resubmits,
                f"{span.context.trace_id:032x}" if span is not None else trace_id_of(ctx.traceparent), ctx.client, ctx.prompt)
        log.write(record)


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
