"""Conduit's own OpenAPI 3.1 document, generated from the schemas the code decodes and encodes.

Every request and response body is a msgspec Struct of the code (each endpoint's
``protocol.py``, ``gateway/errors.py``, ``gateway/tenancy/``), turned into JSON Schema by msgspec.
Every route handler carries its own :class:`~gateway.apispec.Operation` (in its ``opt``): what it
takes and every status it can answer; its path, method and success status are the handler's
own, its security follows the guard's ``access`` in the same ``opt``. :func:`build` walks the
app's handlers (``gateway.routes``, the admin routes included). The tests hold them together:
the checked-in ``openapi/openapi.json`` is :func:`document_bytes`, every route of the app is in
it, and schemathesis fuzzes a live stack against the document (``tests/fuzz.py``). Regenerate with::

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

import re
import argparse
import functools
import json
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from gateway.apispec import OPERATION, RATELIMIT, Operation
from gateway.errors import ErrorEnvelope
from gateway.observe import template_name
from gateway.operations.protocol import Readiness
from gateway.routes import route_handlers
from gateway.tenancy.guard import ADMIN, KEY, METRICS, PUBLIC_ACCESS

#: Where ``--write`` puts the document (a source checkout's ``openapi/`` folder).
CHECKED_IN = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
REGENERATE = "python -m gateway.openapi --write"
EXTENSION = "x-conduit-extension"
_SCHEMAS = "#/components/schemas/"

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


TAGS = (
    ("Chat", "Chat completions (OpenAI's)."),
    ("Completions", "Legacy text completions (OpenAI's)."),
    ("Images", "Image generation (OpenAI's), and the files of `url` answers."),
    ("Models", "Models with a live engine (OpenAI's)."),
    ("Operations", "Liveness, readiness, metrics and this document (Conduit's)."),
    ("Admin", "API key management behind the admin credential (Conduit's); off unless `admin_key_hash` is set."),
)


def _ref(cls: type[Any]) -> dict[str, str]:
    return {"$ref": _SCHEMAS + cls.__name__}


def _json_data(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def sse_events(op: Operation) -> dict[str, Any]:
    """The schema of one event of an operation's stream (``op.stream``: each event's name and the
    Structs its data may be); with ``op.stream_done`` the stream ends with ``data: [DONE]``."""
    branches = []
    for name, types in op.stream:
        data = _json_data(_ref(types[0]) if len(types) == 1 else {"anyOf": [_ref(t) for t in types]})
        if op.stream_done:
            data = {"anyOf": [{"const": "[DONE]"}, data]}
        # A name with ``*`` stands for a family of events (``response.*``: every ``response.`` event).
        event = {"type": "string", "pattern": "^" + re.escape(name).replace(r"\*", "[a-z_.]+") + "$"} \
            if "*" in name else {"const": name}
        branches.append({"type": "object", "required": ["event", "data"],
                         "properties": {"event": event, "data": data}})
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


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


def components(operations: Iterable[Operation]) -> dict[str, Any]:
    """``components.schemas``: every body's schema, from msgspec (see the module docstring)."""
    request_bodies: dict[type[Any], None] = {}
    response_bodies: dict[type[Any], None] = {ErrorEnvelope: None}
    for op in operations:
        for t in (op.body, op.form):
            if t is not None:
                request_bodies[t] = None
        for t in (op.json, *(t for _, types in op.stream for t in types)):
            if t is not None:
                response_bodies[t] = None
    bodies, answers = tuple(request_bodies), tuple(response_bodies)
    _, schemas = msgspec.json.schema_components((*bodies, *answers), ref_template=_SCHEMAS + "{name}")
    requests, responses = _structs(bodies), _structs(answers)
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


def _ok_response(op: Operation, status: int) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if op.json is not None:
        content.update(_content(_ref(op.json)))
    if op.json_schema is not None:
        content.update(_content(op.json_schema))
    if op.stream:
        content["text/event-stream"] = {"schema": sse_events(op)}
    for media_type in op.binary:
        content[media_type] = {"schema": {"type": "string", "format": "binary"}}
    if op.text:
        content["text/plain"] = {"schema": {"type": "string"}}
    headers: dict[str, Any] = {"x-request-id": {"$ref": "#/components/headers/x-request-id"}}
    for h in op.ok_headers:
        headers[h] = ({"description": "How long a browser may keep the image.", "schema": {"type": "string"}}
                      if h == "Cache-Control" else {"$ref": f"#/components/headers/{h}"})
    if status in op.replayed:
        headers["idempotent-replayed"] = {"$ref": "#/components/headers/idempotent-replayed"}
    return {"description": op.ok, "headers": headers, "content": content}


#: Security by the guard's ``access`` (``gateway.tenancy.guard``): ``/metrics`` needs the metrics
#: credential only with ``metrics_auth``.
_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    KEY: [{"ApiKey": []}],
    ADMIN: [{"AdminKey": []}],
    METRICS: [{}, {"MetricsKey": []}],
    PUBLIC_ACCESS: [],
}


def _operation(op: Operation, access: str, status: int) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag]}
    if op.description:
        out["description"] = op.description
    if op.extension:
        out[EXTENSION] = op.extension
    out["security"] = _SECURITY[access]
    if op.parameters:
        out["parameters"] = list(op.parameters)
    if op.body is not None or op.form is not None:
        content = _content(_ref(op.body)) if op.body is not None else {}
        if op.form is not None:
            files = {"type": "object", "properties": dict(op.files), "required": list(op.form_required)}
            content["multipart/form-data"] = {"schema": {"allOf": [_ref(op.form), files]}}
        out["requestBody"] = {"required": op.body_required, "content": content}
    responses = {str(status): _ok_response(op, status)}
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


def build(handlers: Iterable[Any] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of this version of the gateway: one operation per route handler
    (every handler a gateway may register unless ``handlers`` are given), from its ``opt``."""
    paths: dict[str, dict[str, Any]] = {}
    operations = []
    for handler in route_handlers(admin=True) if handlers is None else handlers:
        op: Operation = handler.opt[OPERATION]
        operations.append(op)
        (method,) = set(handler.http_methods) - {"HEAD"}  # a GET's HEAD mirrors it (the description says so)
        for path in handler.paths:
            paths.setdefault(template_name(path), {})[method.lower()] = _operation(
                op, handler.opt.get("access", KEY), handler.status_code)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Conduit",
            "summary": "An OpenAI-compatible inference gateway: chat and text completions from vLLM, images from "
                       "diffusers, behind a Redis Streams queue.",
            "description": "Every error is OpenAI's envelope `{\"error\": {\"message\", \"type\", \"param\", "
                           "\"code\"}}`; every answer carries `x-request-id`. Fields and operations OpenAI's API "
                           "does not have carry `x-conduit-extension`. Every `GET` answers `HEAD` too (its status and "
                           "headers, no body). Generated from the code by `gateway.openapi`.",
            "version": version(),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:8000", "description": "`conduit up` (the local stack)"}],
        "tags": [{"name": name, "description": text} for name, text in TAGS],
        "paths": paths,
        "components": {
            "schemas": components(operations),
            "headers": {name: {k: v for k, v in h.items()} for name, h in HEADERS.items()},
            "securitySchemes": {
                "ApiKey": {"type": "http", "scheme": "bearer", "bearerFormat": "cdt-<id>-<secret>",
                           "description": "An API key (`conduit keys create`, `POST /admin/keys`). A gateway run "
                                          "with `auth = false` takes none."},
                "AdminKey": {"type": "http", "scheme": "bearer",
                             "description": "The admin credential, whose argon2id hash is the gateway's "
                                            "`admin_key_hash` (`conduit keys hash-admin`)."},
                "MetricsKey": {"type": "http", "scheme": "bearer",
                               "description": "The metrics credential (Prometheus's), whose argon2id hash is the "
                                              "gateway's `metrics_key_hash` (`conduit keys hash-metrics`); it opens "
                                              "`/metrics` only."},
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
