"""What a route handler says about itself in Conduit's OpenAPI document.

Every handler carries its :class:`Operation` in its ``opt`` (``opt={"operation": ...}``, beside
the guard's ``access``), next to the handler in its endpoint's folder; its path, method and
success status come from the handler itself, its security from its ``access``.
``gateway.openapi`` builds the document by walking the app's handlers. The parameters and
error texts several operations share are here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

#: Where a handler's ``opt`` holds its :class:`Operation`.
OPERATION = "operation"


@dataclass(frozen=True)
class Operation:
    """One route: what it takes, what it answers (``errors``: status -> the codes it can send)."""

    operation_id: str
    summary: str
    tag: str
    errors: dict[int, str]
    description: str = ""
    body: type[msgspec.Struct] | None = None
    body_required: bool = True
    #: A ``multipart/form-data`` body too: its text fields (a Struct) and its files (name -> schema,
    #: required ones first in ``form_required``); ``body`` None: the form is the only body.
    form: type[msgspec.Struct] | None = None
    files: tuple[tuple[str, dict[str, Any]], ...] = ()
    form_required: tuple[str, ...] = ()
    ok: str = "OK"
    json: type[msgspec.Struct] | None = None
    #: A schema for ``application/json`` when there is no Struct (the document itself).
    json_schema: dict[str, Any] | None = None
    #: The event-stream answer: each event's name and the Structs its data may be (one of them).
    stream: tuple[tuple[str, tuple[type[msgspec.Struct], ...]], ...] = ()
    #: The stream ends with ``data: [DONE]``.
    stream_done: bool = False
    binary: tuple[str, ...] = ()
    text: bool = False
    parameters: tuple[dict[str, Any], ...] = ()
    ok_headers: tuple[str, ...] = ()
    #: Statuses whose stored answer an ``Idempotency-Key`` retry replays.
    replayed: tuple[int, ...] = ()
    extension: str | None = None


def documented(operation: Operation, access: dict[str, Any] | None = None) -> dict[str, Any]:
    """A handler's ``opt``: its operation, and the guard's ``access`` (none: an API key)."""
    return {**(access or {}), OPERATION: operation}


#: The rate-limit headers a keyed request's answer may carry (defined in ``gateway.openapi``).
RATELIMIT = tuple(f"x-ratelimit-{what}-{unit}" for unit in ("requests", "tokens")
                  for what in ("limit", "remaining", "reset"))


def _header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": schema}


REQUEST_ID = _header("x-request-id", "An id of the client's own for this request, echoed in the answer (128 bytes "
                     "at most are kept).", {"type": "string"})
IDEMPOTENCY_KEY = _header(
    "Idempotency-Key", "Run this request once per API key and Idempotency-Key for 24 h: a retry gets the first "
    "answer (`idempotent-replayed: true`) or waits for it; streaming requests are never replayed.",
    {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"\S"})
TRACEPARENT = _header("traceparent", "W3C trace context; travels with the request's job to the engine.",
                      {"type": "string"})

#: The parameters of a generation request.
GENERATION = (REQUEST_ID, IDEMPOTENCY_KEY, TRACEPARENT)
AUTH_ERRORS = {401: "`invalid_api_key`.",
               429: "`rate_limit_exceeded`: the client's address failed authentication too often.",
               503: "`server_busy`: API keys cannot be checked right now."}
#: The errors of a generation request (a job).
JOB_ERRORS = {
    400: "`invalid_json`, `invalid_value`, `missing_required_parameter`, `invalid_request` (a rule across "
         "fields, a bound on the request's work, or the engine refused the parameters), "
         "`invalid_idempotency_key`; an image URL the media policy refuses: `media_url_not_allowed` (only "
         "`data:` URLs unless media domains are configured), `media_domain_not_allowed`, "
         "`media_address_not_allowed`, `invalid_media_url`, or one the engine could not fetch: "
         "`media_url_redirected`, `media_fetch_failed`.",
    401: AUTH_ERRORS[401],
    404: "`model_not_found`: no engine serves the model or the key may not use it; `model_not_supported`: the "
         "model's engines do not run this endpoint's kind of request (as OpenAI answers for a model that is not "
         "a chat model).",
    409: "`idempotency_key_reused` (with `x-should-retry: false`), `idempotency_key_in_use`.",
    413: "`request_too_large`.",
    429: "`rate_limit_exceeded` (the key's rpm, tpm, ipm or concurrency; or the address failed authentication "
         "too often), `model_overloaded` (the model's backlog, or the key's share of it).",
    500: "`internal_error`.",
    501: "`unsupported_job_kind`.",
    502: "`engine_error`, `engine_failed`, `engine_lost`, `job_lost`, `output_lost`.",
    503: "`model_unavailable` (a known model with no live engine now; for a declared model with cold-start "
         "waits on, none started within `cold_start_timeout_s`: with `Retry-After`), `queue_unavailable`, "
         "`idempotency_unavailable`, `server_busy`, `overloaded` (the engine).",
    504: "`deadline_exceeded`.",
}
#: The statuses of a generation request whose answer an ``Idempotency-Key`` retry replays.
STORED = (200, 400, 404, 413, 422)
