"""The gateway's exception tree and the one place that renders OpenAI's error envelope.

    ConduitError                     any error the client is told about
    ├── InvalidRequest        400    malformed JSON, schema violation (param names the field)
    ├── Unauthorized          401
    ├── NotFound              404    unknown route
    │   ├── ModelNotFound     404    model_not_found
    │   └── ModelNotSupported 404    model_not_supported: the model's engines run no job of this kind
    ├── MethodNotAllowed      405
    ├── Conflict              409    Idempotency-Key reused or in use
    ├── PayloadTooLarge       413
    ├── Overloaded            429    backlog over its limit (Retry-After)
    ├── RateLimited           429    an API key over one of its limits (Retry-After)
    ├── EngineError           5xx    an engine failed the request
    ├── NoEngine              503    no live engine serves the model
    └── DeadlineExceeded      504

Handlers raise; :func:`error_response` renders. A traceback never reaches a client.
"""

from __future__ import annotations

import logging

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from gateway.context import context_of

log = logging.getLogger("conduit.gateway")


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


def _answering(target: object, status: int | None, type: str | None, code: str | None) -> None:
    """Set on ``target`` (an error class, or one error) the status, type and code given; what is
    None stays as inherited."""
    for name, value in (("status", status), ("type", type), ("code", code)):
        if value is not None:
            setattr(target, name, value)


class ConduitError(Exception):
    """An error answered with OpenAI's envelope ``{"error": {message, type, param, code}}``."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init_subclass__(cls, *, status: int | None = None, type: str | None = None, code: str | None = None,
                          **kwargs: object) -> None:
        """A subclass names what it answers in its bases' keywords:
        ``class Conflict(ConduitError, status=409, type="invalid_request_error", code="conflict")``;
        what it leaves out it inherits."""
        super().__init_subclass__(**kwargs)
        _answering(cls, status, type, code)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        _answering(self, status, type, code)
        self.headers = headers or {}

    def body(self) -> ErrorEnvelope:
        return ErrorEnvelope(ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))


class InvalidRequest(ConduitError, status=400, type="invalid_request_error", code="invalid_request"):
    """Malformed JSON or a schema violation (``param`` names the field)."""


class Unauthorized(ConduitError, status=401, type="authentication_error", code="invalid_api_key"):
    """A missing or invalid API key."""


class NotFound(ConduitError, status=404, type="invalid_request_error", code="not_found"):
    """An unknown route."""


class ModelNotFound(NotFound, code="model_not_found"):
    """A model nobody serves or configured, or that the key may not use."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.", param="model")


#: What OpenAI says when a model exists but not on the endpoint asked (its own words for chat).
_NOT_SUPPORTED = {
    "chat": "This is not a chat model and thus not supported in the v1/chat/completions endpoint.",
    "completion": "This is not a text completion model and thus not supported in the v1/completions endpoint.",
    "image": "This is not an image generation model and thus not supported in the v1/images/generations endpoint.",
}


class ModelNotSupported(NotFound, code="model_not_supported"):
    """A live model whose engines announce no job kind this endpoint needs (OpenAI answers 404 too)."""

    def __init__(self, model: str, kind: str) -> None:
        message = _NOT_SUPPORTED.get(kind, f"The model `{model}` does not run `{kind}` requests.")
        super().__init__(message, param="model")


class MethodNotAllowed(ConduitError, status=405, type="invalid_request_error", code="method_not_allowed"):
    """A route asked with a method it does not take."""


class Conflict(ConduitError, status=409, type="invalid_request_error", code="conflict"):
    """An ``Idempotency-Key`` reused or in use."""


class PayloadTooLarge(ConduitError, status=413, type="invalid_request_error", code="request_too_large"):
    """A request larger than the server accepts."""


class _TooMany(ConduitError, status=429, type="rate_limit_error"):
    """A 429 that says when to retry (``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class Overloaded(_TooMany, code="model_overloaded"):
    """The model's backlog (or the key's share of it) is over its limit."""


class RateLimited(_TooMany, code="rate_limit_exceeded"):
    """An API key over one of its limits."""


class EngineError(ConduitError, status=502, type="server_error", code="engine_error"):
    """An engine failed the request."""


class NoEngine(ConduitError, status=503, type="server_error", code="model_unavailable"):
    """No live engine serves the model."""

    def __init__(self, model: str, *, waited_s: float = 0.0, retry_after_s: int = 0) -> None:
        waited = f" (none started within {waited_s:g}s)" if waited_s else ""
        super().__init__(f"No engine is serving the model `{model}` right now{waited}; try again shortly.",
                         param="model", headers={"Retry-After": str(retry_after_s)} if retry_after_s else None)


class DeadlineExceeded(ConduitError, status=504, type="timeout_error", code="deadline_exceeded"):
    """The request did not finish within its deadline."""


_ENCODER = msgspec.json.Encoder()

# Litestar's own HTTP exceptions (routing, body size) mapped onto the tree.
_BY_STATUS: dict[int, type[ConduitError]] = {
    400: InvalidRequest, 401: Unauthorized, 404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge,
}


def encode_error(exc: ConduitError) -> bytes:
    return _ENCODER.encode(exc.body())


def error_head(exc: ConduitError) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """An error's body and response headers, for the middleware that answers before the app."""
    body = encode_error(exc)
    return body, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                  *((k.lower().encode(), v.encode()) for k, v in exc.headers.items())]


def from_exception(exc: Exception) -> ConduitError:
    """Any exception as the :class:`ConduitError` the client is told about."""
    if isinstance(exc, ConduitError):
        return exc
    if isinstance(exc, HTTPException):
        cls = _BY_STATUS.get(exc.status_code)
        if cls is not None:
            message = exc.detail if exc.status_code != 404 else "Not found: no such route."
            if exc.status_code == 413:
                message = "The request body is larger than this server accepts."
            return cls(str(message))
        return ConduitError(str(exc.detail), status=exc.status_code,
                            type="invalid_request_error" if exc.status_code < 500 else "server_error",
                            code="http_error")
    log.exception("unhandled error", exc_info=exc)
    return ConduitError("The server had an error while processing your request.")


def error_response(request: Request, exc: Exception) -> Response[bytes]:
    """The single exception handler of the app: every error becomes the OpenAI envelope."""
    err = from_exception(exc)
    context_of(request.scope).error = err.code or "error"  # counted, logged and traced by the request's observer
    return Response(content=encode_error(err), status_code=err.status, media_type="application/json",
                    headers=err.headers)
