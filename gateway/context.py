"""One request's context: what the layers around the app learn about a request and hand inward.

:class:`RequestContext` is made once per request by the outermost layer
(``gateway.observe.RequestObserver``), kept at ``scope["state"]["ctx"]``, and read typed by every
layer after it: the guard puts the principal there, the idempotency middleware its claim, the
shared request flow the dispatcher's run and the ``x-ratelimit-*`` headers the limiter fills,
every refusal its error code; the observer reads it all back once the last byte is out.
Nothing else about a request goes through ``scope["state"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.tenancy.principal import ANONYMOUS, Principal

if TYPE_CHECKING:
    from gateway.run import JobRun
    from gateway.tenancy.claims import Claim
    from telemetry.tracing import Span

#: Where a request's context lives in its ASGI scope's ``state``.
CTX = "ctx"


@dataclass(slots=True)
class RequestContext:
    """What the layers know about one request (see the module docstring)."""

    #: ``x-request-id``: the client's own (first 128 bytes) or one the observer made; an idempotent
    #: replay puts the first request's here.
    request_id: bytes = b""
    #: The client's address: the TCP peer, or what trusted proxies forwarded (``gateway.proxies``); the
    #: failed-authentication limit and the request log key on it.
    client: str = ""
    #: The client's W3C ``traceparent`` (its first 55 characters), for the job.
    traceparent: str = ""
    #: The request's server span (a sampled trace): the dispatcher hangs the queue span under it.
    span: Span | None = None
    #: Who asks (the guard's verdict; ``ANONYMOUS`` when auth is off or before the guard).
    principal: Principal = ANONYMOUS
    #: The guard let the request through on a good credential (an API key, the admin credential),
    #: or keys are off (``auth=false``: no client has more to show). Only then does a client's
    #: ``traceparent`` sampled flag count (``gateway.observe``).
    authenticated: bool = False
    #: The ``x-ratelimit-*`` headers of a keyed request (filled by the limiter, sent by the guard).
    ratelimit: dict[str, str] | None = None
    #: The request's job (a generation): its metrics and log line are read from it.
    run: JobRun | None = None
    #: The request's hold on its ``Idempotency-Key`` (the idempotency middleware's): every job
    #: of the request is named in it before it is queued.
    claim: Claim | None = None
    #: The code of the error the request was refused or failed with ("" when none).
    error: str = ""
    #: The request's prompt as sent, for its log line (only with ``log_prompts``).
    prompt: str | None = None


def context_of(scope: Any) -> RequestContext:
    """The request's context, made here if no layer outside made it (tests running one layer)."""
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    ctx: RequestContext | None = state.get(CTX)
    if ctx is None:
        ctx = state[CTX] = RequestContext()
    return ctx


def principal_of(scope: Any) -> Principal:
    """The principal the guard attached to a request (``ANONYMOUS`` when there is none)."""
    state = scope.get("state")
    ctx = state.get(CTX) if state else None
    return ctx.principal if ctx is not None else ANONYMOUS
