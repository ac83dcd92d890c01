"""Conduit's own OpenAPI 3.1 document, generated from the schemas the code decodes and encodes.

Every request and response body is a msgspec Struct of the code (``gateway/protocol.py``,
``gateway/images/protocol.py``, ``gateway/errors.py``, ``gateway/tenancy/``), turned into JSON
Schema by msgspec; :data:`OPERATIONS` says, for every route the app registers, what it takes
and every status it can answer. The tests hold the three together: the checked-in
``openapi/openapi.json`` is :func:`document_bytes`, the table names exactly the app's routes, and
schemathesis fuzzes a live stack against the document (``tests/fuzz.py``). Regenerate with::

    python -m gateway.openapi --write      # openapi/openapi.json (from a source checkout)
    python -m gateway.openapi --check      # exit status 1 when the checked-in file is stale

Conventions, beyond OpenAPI's own:

* response schemas list as ``required`` every field the encoder always writes (msgspec's own
  schemas describe decoding, where a field with a default is optional);
* request bodies accept fields they do not name (``additionalProperties: true``): they reach
  the engine unchanged, as vLLM's extensions (``top_k``, ...) do; admin bodies do not;
* a field or operation OpenAI's API does not have carries ``x-conduit-extension`` (whose
  extension: ``vllm``, ``diffusers`` or ``conduit``);
* an event stream (``text/event-stream``) is described one event at a time, as OpenAPI 3.2's
  ``itemSchema`` does: an object with the event's name (``event``, ``message`` when the
  stream names none) and its ``data``, a JSON text (``contentSchema``) or ``[DONE]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from gateway.errors import ErrorEnvelope
from gateway.images.protocol import (
    CompletedImageEvent,
    ImageRequest,
    ImagesResponse,
    PartialImageEvent,
)
from gateway.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    Health,
    Model,
    ModelList,
    Readiness,
)
from gateway.tenancy.admin import CreatedKey, DeletedKey, KeyList, NewKey
from gateway.tenancy.keys import KeyChanges, KeyInfo
from gateway.tenancy.usage import KeyUsage

#: Where ``--write`` puts the document (a source checkout's ``openapi/`` folder).
CHECKED_IN = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
REGENERATE = "python -m gateway.openapi --write"
EXTENSION = "x-conduit-extension"
_SCHEMAS = "#/components/schemas/"

REQUEST_BODIES: tuple[type[msgspec.Struct], ...] = (ChatCompletionRequest, CompletionRequest, ImageRequest, NewKey,
                                                    KeyChanges)
RESPONSE_BODIES: tuple[type[msgspec.Struct], ...] = (
    ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, ModelList, Model, ImagesResponse,
    PartialImageEvent, CompletedImageEvent, ErrorEnvelope, CreatedKey, KeyList, KeyInfo, DeletedKey, KeyUsage, Health,
    Readiness)


# ---- statuses and headers ------------------------------------------------------------------

#: Every error status and what it means anywhere in the API; each operation lists the codes
#: it can answer with.
ERRORS: dict[int, str] = {
    400: "The request is invalid (malformed JSON, a schema violation: `param` names the field), or the engine "
         "refused its parameters.",
    401: "No API key, or a malformed, unknown, wrong, expired, disabled or revoked one.",
    404: "Not found.",
    409: "The `Idempotency-Key` was used with another request, or is held by one still running.",
    413: "The body is larger than `max_body_bytes`.",
    422: "The engine (vLLM) could not process the request's content.",
    429: "A limit was reached; retry after `Retry-After` seconds.",
    500: "An unexpected error in the server (a bug: never by design).",
    501: "The model's engines do not run this kind of request (a fleet of mixed versions: the gateway admits only "
         "kinds some live engine of the model announces).",
    502: "The engine failed the request, or its job was lost.",
    503: "Not available right now; retry shortly.",
    504: "The request did not finish within `request_timeout_s`.",
}

HEADERS: dict[str, dict[str, Any]] = {
    "x-request-id": {"description": "The request's id: the client's own `x-request-id` (its first 128 bytes), "
                                    "else one the gateway made; an idempotent replay carries the first request's.",
                     "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 128}},
    "Retry-After": {"description": "Seconds to wait before retrying.", "required": True,
                    "schema": {"type": "integer", "minimum": 0}},
    "Retry-After-Optional": {"description": "Seconds to wait before retrying, when the server knows.",
                             "schema": {"type": "integer", "minimum": 0}},
    "WWW-Authenticate": {"description": "`Bearer realm=\"conduit\"`.", "required": True,
                         "schema": {"type": "string"}},
    "idempotent-replayed": {"description": "`true` on the stored answer to an earlier request with the same "
                                           "`Idempotency-Key` (no second generation ran).",
                            "schema": {"type": "string", "enum": ["true"]}},
    "x-should-retry": {"description": "`false`: retrying this request cannot succeed (the SDKs read it).",
                       "schema": {"type": "string", "enum": ["false"]}},
    **{f"x-ratelimit-{what}-{unit}": {
        "description": f"The API key's {unit} per minute: {text} (only for keys with that limit).",
        "schema": {"type": "integer", "minimum": 0} if what != "reset" else
        {"type": "string", "pattern": r"^([0-9]+h)?([0-9]+m)?([0-9]+(\.[0-9]+)?(ms|s))?$"}}
       for unit in ("requests", "tokens")
       for what, text in (("limit", "the limit"), ("remaining", "what is left now"),
                          ("reset", "time until the window is empty again, e.g. `1s`, `6m0s`"))},
}
#: The rate-limit headers a keyed request's answer may carry.
RATELIMIT = tuple(h for h in HEADERS if h.startswith("x-ratelimit-"))


# ---- the route table -----------------------------------------------------------------------

@dataclass(frozen=True)
class Operation:
    """One route: what it takes, what it answers (``errors``: status -> the codes it can send)."""

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    #: ``api_key``, ``admin``, ``admin_optional`` (``/metrics``: only with ``metrics_auth``) or None.
    security: str | None
    errors: dict[int, str]
    description: str = ""
    body: type[msgspec.Struct] | None = None
    body_required: bool = True
    status: int = 200
    ok: str = "OK"
    json: type[msgspec.Struct] | None = None
    #: A schema for ``application/json`` when there is no Struct (the document itself).
    json_schema: dict[str, Any] | None = None
    #: The event-stream answer: the schema of one event (see :func:`sse_events`).
    stream: dict[str, Any] | None = None
    binary: tuple[str, ...] = ()
    text: bool = False
    parameters: tuple[dict[str, Any], ...] = ()
    ok_headers: tuple[str, ...] = ()
    #: Statuses whose stored answer an ``Idempotency-Key`` retry replays.
    replayed: tuple[int, ...] = ()
    extension: str | None = None


def _ref(cls: type[Any]) -> dict[str, str]:
    return {"$ref": _SCHEMAS + cls.__name__}


def _json_data(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def sse_events(*events: tuple[str, dict[str, Any]], done: bool = False) -> dict[str, Any]:
    """The schema of one event of a stream whose events are ``(name, JSON schema of its data)``;
    ``done``: the stream ends with ``data: [DONE]``."""
    branches = []
    for name, schema in events:
        data = _json_data(schema)
        if done:
            data = {"anyOf": [{"const": "[DONE]"}, data]}
        branches.append({"type": "object", "required": ["event", "data"],
                         "properties": {"event": {"const": name}, "data": data}})
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


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
KEY_ID = {"name": "key_id", "in": "path", "required": True, "description": "The key's public id.",
          "schema": {"type": "string"}}

_GENERATION = (REQUEST_ID, IDEMPOTENCY_KEY, TRACEPARENT)
_AUTH_ERRORS = {401: "`invalid_api_key`.",
                429: "`rate_limit_exceeded`: the client's address failed authentication too often.",
                503: "`server_busy`: API keys cannot be checked right now."}
_ADMIN_ERRORS = {**_AUTH_ERRORS, 401: "`invalid_api_key`: not the admin credential.",
                 404: "`not_found`: the admin API is off (no `admin_key_hash` set).",
                 500: "`internal_error`."}
_JOB_ERRORS = {
    400: "`invalid_json`, `invalid_value`, `missing_required_parameter`, `invalid_request` (a rule across "
         "fields, a bound on the request's work, or the engine refused the parameters), "
         "`invalid_idempotency_key`.",
    401: _AUTH_ERRORS[401],
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
    503: "`model_unavailable` (a known model with no live engine now), `queue_unavailable`, "
         "`idempotency_unavailable`, `server_busy`, `overloaded` (the engine).",
    504: "`deadline_exceeded`.",
}
_STORED = (200, 400, 404, 413, 422)

OPERATIONS: tuple[Operation, ...] = (
    Operation("post", "/v1/chat/completions", "createChatCompletion", "Create a chat completion", "Chat", "api_key",
              {**_JOB_ERRORS, 422: "`unprocessable_entity`."}, body=ChatCompletionRequest, json=ChatCompletion,
              stream=sse_events(("message", {"anyOf": [_ref(ChatCompletionChunk), _ref(ErrorEnvelope)]}), done=True),
              description="Streamed as server-sent events when `stream` is true: `chat.completion.chunk` objects, "
                          "then `data: [DONE]`; a failure after the stream began is one error object, then "
                          "`[DONE]`.",
              parameters=_GENERATION, ok_headers=RATELIMIT, replayed=_STORED),
    Operation("post", "/v1/completions", "createCompletion", "Create a text completion (legacy)", "Completions",
              "api_key", {**_JOB_ERRORS, 422: "`unprocessable_entity`."}, body=CompletionRequest, json=Completion,
              stream=sse_events(("message", {"anyOf": [_ref(CompletionChunk), _ref(ErrorEnvelope)]}), done=True),
              description="Streamed as server-sent events when `stream` is true, ending with `data: [DONE]`.",
              parameters=_GENERATION, ok_headers=RATELIMIT, replayed=_STORED),
    Operation("post", "/v1/images/generations", "createImage", "Create images from a prompt", "Images", "api_key",
              {**_JOB_ERRORS, 400: _JOB_ERRORS[400] + " Also the engine's own limits: `size`, "
                                                      "`num_inference_steps`, `background: transparent`."},
              body=ImageRequest, json=ImagesResponse,
              stream=sse_events(("image_generation.partial_image", _ref(PartialImageEvent)),
                                ("image_generation.completed", _ref(CompletedImageEvent)),
                                ("error", _ref(ErrorEnvelope))),
              description="`url` images are served by `GET /v1/images/files/{name}` until they expire. Streamed "
                          "(`stream: true`): `partial_images` previews per image, then one "
                          "`image_generation.completed` event per image.",
              parameters=_GENERATION, ok_headers=RATELIMIT, replayed=_STORED),
    Operation("get", "/v1/images/files/{name}", "getImageFile", "A generated image (a `url` answer's)", "Images", None,
              {404: "`image_not_found`: it expired or never existed.", 500: "`internal_error`."},
              description="Needs no API key: the unguessable name is the capability to read it, as OpenAI's "
                          "signed image URLs are.",
              binary=("image/png", "image/jpeg", "image/webp"), extension="conduit",
              parameters=({"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                           "description": "The image's reference, from a `url` answer."}, REQUEST_ID),
              ok_headers=("Cache-Control",)),
    Operation("get", "/v1/models", "listModels", "The models with a live engine now", "Models", "api_key",
              {**_AUTH_ERRORS, 500: "`internal_error`."}, json=ModelList, parameters=(REQUEST_ID,),
              description="Only those the request's API key may use."),
    Operation("get", "/v1/models/{model_id}", "retrieveModel", "One model with a live engine", "Models", "api_key",
              {**_AUTH_ERRORS, 404: "`model_not_found`.", 500: "`internal_error`."}, json=Model,
              parameters=({"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"},
                           "description": "The model's id (it may contain `/`)."}, REQUEST_ID)),
    Operation("get", "/health", "getHealth", "The process is alive", "Operations", None, {500: "`internal_error`."},
              json=Health, extension="conduit", parameters=(REQUEST_ID,)),
    Operation("get", "/ready", "getReadiness", "Ready for traffic: Redis answers and an engine is live", "Operations",
              None, {500: "`internal_error`.", 503: "Not ready: the body says why (a `Readiness`, not an error)."},
              json=Readiness, extension="conduit", parameters=(REQUEST_ID,)),
    Operation("get", "/metrics", "getMetrics", "Prometheus exposition of the gateway's instruments", "Operations",
              "admin_optional", {**_AUTH_ERRORS, 401: "`invalid_api_key` (only with `metrics_auth`: the admin "
                                                      "credential).", 404: "`not_found`: metrics are off "
                                                      "(`CONDUIT_METRICS=false`).", 500: "`internal_error`."},
              text=True, extension="conduit", parameters=(REQUEST_ID,)),
    Operation("get", "/openapi.json", "getOpenApi", "This document", "Operations", None, {500: "`internal_error`."},
              json_schema={"type": "object", "description": "The OpenAPI 3.1 document of this API."},
              extension="conduit", parameters=(REQUEST_ID,)),
    Operation("post", "/admin/keys", "createKey", "Create an API key", "Admin", "admin",
              {**_ADMIN_ERRORS, 400: "`invalid_request`, `invalid_json`.", 413: "`request_too_large`."},
              body=NewKey, status=201, ok="Created: the key's text is in this answer only.", json=CreatedKey,
              extension="conduit", parameters=(REQUEST_ID,)),
    Operation("get", "/admin/keys", "listKeys", "Every API key (no hashes, no secrets)", "Admin", "admin",
              dict(_ADMIN_ERRORS), json=KeyList, extension="conduit", parameters=(REQUEST_ID,)),
    Operation("get", "/admin/keys/{key_id}", "retrieveKey", "One API key", "Admin", "admin",
              {**_ADMIN_ERRORS, 404: "`key_not_found`, or `not_found` (the admin API is off)."}, json=KeyInfo,
              extension="conduit", parameters=(KEY_ID, REQUEST_ID)),
    Operation("patch", "/admin/keys/{key_id}", "updateKey", "Change an API key (fields left out stay)", "Admin",
              "admin", {**_ADMIN_ERRORS, 400: "`invalid_request`.", 404: "`key_not_found`, or `not_found` (the admin "
                                                                          "API is off).", 413: "`request_too_large`."},
              body=KeyChanges, body_required=False, json=KeyInfo, extension="conduit", parameters=(KEY_ID, REQUEST_ID)),
    Operation("delete", "/admin/keys/{key_id}", "revokeKey", "Revoke an API key for good", "Admin", "admin",
              {**_ADMIN_ERRORS, 404: "`key_not_found`, or `not_found` (the admin API is off)."}, json=DeletedKey,
              extension="conduit", parameters=(KEY_ID, REQUEST_ID)),
    Operation("get", "/admin/keys/{key_id}/usage", "getKeyUsage", "An API key's usage per UTC day and model", "Admin",
              "admin", {**_ADMIN_ERRORS, 400: "`invalid_value`: `days` out of range.",
                        404: "`key_not_found`, or `not_found` (the admin API is off)."}, json=KeyUsage,
              extension="conduit",
              parameters=(KEY_ID, {"name": "days", "in": "query", "required": False,
                                   "description": "How many UTC days back, today included.",
                                   "schema": {"type": "integer", "minimum": 1, "maximum": 400, "default": 7}},
                          REQUEST_ID)),
)

TAGS = (
    ("Chat", "Chat completions (OpenAI's)."),
    ("Completions", "Legacy text completions (OpenAI's)."),
    ("Images", "Image generation (OpenAI's), and the files of `url` answers."),
    ("Models", "Models with a live engine (OpenAI's)."),
    ("Operations", "Liveness, readiness, metrics and this document (Conduit's)."),
    ("Admin", "API key management behind the admin credential (Conduit's); off unless `admin_key_hash` is set."),
)


# ---- building ------------------------------------------------------------------------------

def _structs(types: tuple[type[Any], ...]) -> dict[str, mi.StructType]:
    """Every Struct reachable from ``types``, by name (the name msgspec gives its component)."""
    found: dict[str, mi.StructType] = {}
    todo: list[mi.Type] = list(mi.multi_type_info(types))
    while todo:
        t = todo.pop()
        if isinstance(t, mi.StructType):
            if t.cls.__name__ in found:
                continue
            found[t.cls.__name__] = t
            todo.extend(f.type for f in t.fields)
        elif isinstance(t, mi.UnionType):
            todo.extend(t.types)
        elif isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
            todo.append(t.item_type)
        elif isinstance(t, mi.TupleType):
            todo.extend(t.item_types)
        elif isinstance(t, mi.DictType):
            todo.extend((t.key_type, t.value_type))
        elif isinstance(t, mi.Metadata):
            todo.append(t.type)
    return found


def _always_written(struct: mi.StructType) -> list[str]:
    """Fields the encoder always writes: no ``UNSET`` default, and no default an
    ``omit_defaults`` Struct leaves out; the tag of a tagged Struct."""
    omit = struct.cls.__struct_config__.omit_defaults
    names = [struct.tag_field] if struct.tag_field else []
    for f in struct.fields:
        unset = f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT and not f.required
        if f.required or not (omit or unset):
            names.append(f.encode_name)
    return names


def components() -> dict[str, Any]:
    """``components.schemas``: every body's schema, from msgspec (see the module docstring)."""
    _, schemas = msgspec.json.schema_components((*REQUEST_BODIES, *RESPONSE_BODIES), ref_template=_SCHEMAS + "{name}")
    requests, responses = _structs(REQUEST_BODIES), _structs(RESPONSE_BODIES)
    for name, struct in requests.items():
        schema = schemas[name]
        if not struct.forbid_unknown_fields:
            schema["additionalProperties"] = True
    for name, struct in responses.items():
        if name not in requests:
            schemas[name]["required"] = _always_written(struct)
            _never_null(struct, schemas[name])
    return dict(sorted(schemas.items()))


def _never_null(struct: mi.StructType, schema: dict[str, Any]) -> None:
    """An ``omit_defaults`` Struct leaves out a field whose value is its default: a field that
    defaults to None is absent, never ``null``, on the wire."""
    if not struct.cls.__struct_config__.omit_defaults:
        return
    for f in struct.fields:
        prop = schema["properties"][f.encode_name]
        if f.default is None and "anyOf" in prop:
            rest = [s for s in prop.pop("anyOf") if s != {"type": "null"}]
            prop.pop("default", None)
            if len(rest) == 1:
                prop.update(rest[0])
            else:
                prop["anyOf"] = rest


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error_response(op: Operation, status: int) -> dict[str, Any]:
    headers: dict[str, Any] = {"x-request-id": {"$ref": "#/components/headers/x-request-id"}}
    if status == 429:
        headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
        if op.ok_headers == RATELIMIT:
            headers.update({h: {"$ref": f"#/components/headers/{h}"} for h in RATELIMIT})
    elif status == 503:
        headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After-Optional"}
    elif status == 401:
        headers["WWW-Authenticate"] = {"$ref": "#/components/headers/WWW-Authenticate"}
    elif status == 409 and op.replayed:
        headers["x-should-retry"] = {"$ref": "#/components/headers/x-should-retry"}
    if status in op.replayed:
        headers["idempotent-replayed"] = {"$ref": "#/components/headers/idempotent-replayed"}
    body = _ref(Readiness) if op.json is Readiness and status == 503 else _ref(ErrorEnvelope)
    return {"description": f"{ERRORS[status]} {op.errors[status]}", "headers": headers, "content": _content(body)}


def _ok_response(op: Operation) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if op.json is not None:
        content.update(_content(_ref(op.json)))
    if op.json_schema is not None:
        content.update(_content(op.json_schema))
    if op.stream is not None:
        content["text/event-stream"] = {"schema": op.stream}
    for media_type in op.binary:
        content[media_type] = {"schema": {"type": "string", "format": "binary"}}
    if op.text:
        content["text/plain"] = {"schema": {"type": "string"}}
    headers: dict[str, Any] = {"x-request-id": {"$ref": "#/components/headers/x-request-id"}}
    for h in op.ok_headers:
        headers[h] = ({"description": "How long a browser may keep the image.", "schema": {"type": "string"}}
                      if h == "Cache-Control" else {"$ref": f"#/components/headers/{h}"})
    if op.status in op.replayed:
        headers["idempotent-replayed"] = {"$ref": "#/components/headers/idempotent-replayed"}
    return {"description": op.ok, "headers": headers, "content": content}


_SECURITY: dict[str | None, list[dict[str, list[str]]]] = {
    "api_key": [{"ApiKey": []}],
    "admin": [{"AdminKey": []}],
    "admin_optional": [{}, {"AdminKey": []}],
    None: [],
}


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag]}
    if op.description:
        out["description"] = op.description
    if op.extension:
        out[EXTENSION] = op.extension
    out["security"] = _SECURITY[op.security]
    if op.parameters:
        out["parameters"] = list(op.parameters)
    if op.body is not None:
        out["requestBody"] = {"required": op.body_required, "content": _content(_ref(op.body))}
    responses = {str(op.status): _ok_response(op)}
    for status in sorted(op.errors):
        responses[str(status)] = _error_response(op, status)
    out["responses"] = responses
    return out


def version() -> str:
    """The installed package's version (the document's ``info.version``)."""
    try:
        return metadata.version("conduit-gateway")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def build() -> dict[str, Any]:
    """The OpenAPI 3.1 document of this version of the gateway."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Conduit",
            "summary": "An OpenAI-compatible inference gateway: chat and text completions from vLLM, images from "
                       "diffusers, behind a Redis Streams queue.",
            "description": "Every error is OpenAI's envelope `{\"error\": {\"message\", \"type\", \"param\", "
                           "\"code\"}}`; every answer carries `x-request-id`. Fields and operations OpenAI's API "
                           "does not have carry `x-conduit-extension`. Generated from the code by `gateway.openapi`.",
            "version": version(),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:8000", "description": "`conduit up` (the local stack)"}],
        "tags": [{"name": name, "description": text} for name, text in TAGS],
        "paths": paths,
        "components": {
            "schemas": components(),
            "headers": {name: {k: v for k, v in h.items()} for name, h in HEADERS.items()},
            "securitySchemes": {
                "ApiKey": {"type": "http", "scheme": "bearer", "bearerFormat": "cdt-<id>-<secret>",
                           "description": "An API key (`conduit keys create`, `POST /admin/keys`). A gateway run "
                                          "with `auth = false` takes none."},
                "AdminKey": {"type": "http", "scheme": "bearer",
                             "description": "The admin credential, whose argon2id hash is the gateway's "
                                            "`admin_key_hash` (`conduit keys hash-admin`)."},
            },
        },
    }


@functools.cache
def document_bytes() -> bytes:
    """The document as served and checked in (built once per process)."""
    return (json.dumps(build(), indent=2, ensure_ascii=False) + "\n").encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print, write or check Conduit's OpenAPI document.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {CHECKED_IN}")
    mode.add_argument("--check", action="store_true", help="exit 1 when the checked-in document is stale")
    args = parser.parse_args(argv)
    doc = document_bytes()
    if args.write:
        CHECKED_IN.parent.mkdir(parents=True, exist_ok=True)
        CHECKED_IN.write_bytes(doc)
        print(f"wrote {CHECKED_IN}", file=sys.stderr)
    elif args.check:
        if not CHECKED_IN.exists() or CHECKED_IN.read_bytes() != doc:
            print(f"{CHECKED_IN} is stale; regenerate it: {REGENERATE}", file=sys.stderr)
            return 1
    else:
        sys.stdout.buffer.write(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
