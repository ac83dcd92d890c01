"""Conduit's OpenAPI document (``gateway/openapi.py``): checked in, complete, valid.

The document is generated from the code's Structs and the operations its route handlers carry;
these tests fail when the checked-in copy and the app's routes drift apart.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
import schemathesis
from openapi_spec_validator import validate as validate_spec

from gateway import openapi
from gateway.app import create_app
from gateway.routes import route_handlers
from gateway.settings import GatewaySettings

DOC: dict[str, Any] = json.loads(openapi.document_bytes())
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def test_the_checked_in_document_is_what_the_code_generates() -> None:
    assert openapi.CHECKED_IN.exists(), f"no {openapi.CHECKED_IN}; generate it: {openapi.REGENERATE}"
    checked_in = openapi.CHECKED_IN.read_bytes()
    assert checked_in == openapi.document_bytes(), (
        f"openapi/openapi.json differs from what the code generates; regenerate it: {openapi.REGENERATE}")


def test_the_check_command_tells_a_stale_document(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "openapi.json"
    stale.write_bytes(openapi.document_bytes().replace(b'"3.1.0"', b'"3.0.0"'))
    monkeypatch.setattr(openapi, "CHECKED_IN", stale)
    assert openapi.main(["--check"]) == 1
    assert openapi.REGENERATE in capsys.readouterr().err
    assert openapi.main(["--write"]) == 0
    assert openapi.main(["--check"]) == 0


def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every handler the app registers, Litestar's own OPTIONS handlers aside
    (made for every path, for CORS preflight: not part of the API), and HEAD, which every GET
    answers too (the document's description says so; ``test_every_get_answers_head``)."""
    app = create_app(GatewaySettings.from_env({}, admin_key_hash="set"))  # the admin routes exist only with one
    out = set()
    for route in app.routes:
        for handler in route.route_handlers:  # type: ignore[attr-defined]
            if handler.handler_name == "options_handler":
                continue
            out.update((m.lower(), route.path_format) for m in handler.http_methods if m != "HEAD")
    return out


def test_every_get_answers_head() -> None:
    handlers = route_handlers(admin=True)
    gets = [h for h in handlers if "GET" in h.http_methods]
    assert len(gets) >= 8
    assert [h for h in gets if set(h.http_methods) != {"GET", "HEAD"}] == []
    assert [h for h in handlers if "HEAD" in h.http_methods and "GET" not in h.http_methods] == []
    assert "Every `GET` answers `HEAD`" in DOC["info"]["description"]


def documented_routes() -> set[tuple[str, str]]:
    return {(m, path) for path, item in DOC["paths"].items() for m in item if m in METHODS}


def test_every_route_of_the_app_is_documented_and_nothing_else() -> None:
    app, doc = app_routes(), documented_routes()
    assert app - doc == set(), f"routes without a document entry (give its handler an Operation: gateway.apispec): {app - doc}"
    assert doc - app == set(), f"documented routes the app does not have: {doc - app}"


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"].startswith("3.1.")
    validate_spec(DOC)


def test_schemathesis_reads_every_operation() -> None:
    schema = schemathesis.openapi.from_dict(DOC)
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.lower(), op.path) for op in ops} == documented_routes()


def test_every_operation_answers_with_documented_errors_in_the_envelope() -> None:
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            statuses = {int(s) for s in op["responses"]}
            assert statuses & {200, 201}, (method, path)
            for status, response in op["responses"].items():
                assert "x-request-id" in response["headers"], (method, path, status)
                if int(status) >= 400 and (path, status) != ("/ready", "503"):
                    assert response["content"] == {"application/json": {"schema": {
                        "$ref": "#/components/schemas/ErrorEnvelope"}}}, (method, path, status)
            if op["security"] and op["security"] != [{}, {"AdminKey": []}]:
                assert {401, 429, 503} <= statuses, (method, path)
            if "429" in op["responses"]:
                assert op["responses"]["429"]["headers"]["Retry-After"]["$ref"].endswith("/Retry-After")


def test_request_bodies_say_they_take_unknown_fields_and_admin_bodies_do_not() -> None:
    schemas = DOC["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "ImageRequest", "ChatMessage", "StreamOptions"):
        assert schemas[name]["additionalProperties"] is True, name
    for name in ("NewKey", "KeyChanges"):
        assert schemas[name]["additionalProperties"] is False, name


def test_response_schemas_require_what_the_encoder_always_writes() -> None:
    from gateway.chat.protocol import ChatCompletionChunk, ChunkChoice, ChunkDelta, ResponseMessage

    schemas = DOC["components"]["schemas"]
    # omit_defaults: what equals its default is left out; the tag is always written.
    assert schemas["ChatCompletionChunk"]["required"] == ["object", "id", "choices", "created", "model"]
    assert schemas["ResponseMessage"]["required"] == ["content", "refusal", "role"]
    assert set(schemas["ChatCompletion"]["required"]) == {"id", "choices", "created", "model", "object", "usage"}
    chunk = msgspec.json.decode(msgspec.json.encode(ChatCompletionChunk(
        id="c", created=1, model="m", choices=[ChunkChoice(delta=ChunkDelta(), finish_reason=None, index=0)])))
    assert set(chunk) == set(schemas["ChatCompletionChunk"]["required"])
    message = msgspec.json.decode(msgspec.json.encode(ResponseMessage(content=None, refusal=None, role="assistant")))
    assert set(message) == set(schemas["ResponseMessage"]["required"])


def test_extensions_are_marked() -> None:
    schemas = DOC["components"]["schemas"]
    image = schemas["ImageRequest"]["properties"]
    assert {p for p, s in image.items() if openapi.EXTENSION in s} == {"negative_prompt", "num_inference_steps",
                                                                        "guidance_scale", "seed"}
    assert schemas["ImageObject"]["properties"]["seed"][openapi.EXTENSION] == "conduit"
    assert schemas["StreamOptions"]["properties"]["continuous_usage_stats"][openapi.EXTENSION] == "vllm"
    assert DOC["paths"]["/admin/keys"]["post"][openapi.EXTENSION] == "conduit"
    assert openapi.EXTENSION not in DOC["paths"]["/v1/chat/completions"]["post"]


@pytest.mark.parametrize(("path", "method"), [("/v1/responses", "post"), ("/v1/responses/{response_id}", "get")])
@pytest.mark.parametrize("event", ["response.created", "response.output_text.delta", "response.completed", "error"])
def test_a_response_streams_event_names_are_those_the_document_allows(path: str, method: str, event: str) -> None:
    """The stream's ``event:`` lines name each event (``response.created``, ``error``, ...), which the
    document must allow: schemathesis checks every streamed answer against it (a fuzz run found
    ``response.*`` declared as the one name allowed)."""
    import jsonschema

    schema = DOC["paths"][path][method]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    resolver = {"components": DOC["components"], **schema}
    jsonschema.validate({"event": event, "data": "{}"}, resolver)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"event": "response", "data": "{}"}, resolver)
