"""The live stack against its own OpenAPI document: served as checked in, real answers valid
against it and against OpenAI's, and a schemathesis fuzz run (fixed seed, a few hundred cases;
``python -m tests.fuzz --cases 5000`` is the big run, see ``openapi/README.md``).

One stack for the module (``tests/fuzz.py``'s: keyed gateway with the admin API, a synthetic
chat engine, a diffusers engine on the tiny pipeline with small limits).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from gateway.openapi import document_bytes
from tests import fuzz
from tests.harness import RedisServer, Stack
from tests.openai_schema import validate as validate_openai
from tests.openai_schema import validate_completion_chunk

#: The CI run: fixed seed, a count that keeps this module near a minute on a 2-core machine.
CI_SEED = 20261202
CI_CASES = 600


@pytest.fixture(scope="module")
def target(redis_server: RedisServer, tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[fuzz.Target]:
    stack = Stack(redis_server.url, tmp_path_factory.mktemp("fuzz"))
    try:
        yield fuzz.start(stack, tiny_sd_dir)
    finally:
        stack.stop()


@functools.cache
def _ours(component: str) -> Draft202012Validator:
    doc = {"$id": "urn:conduit:openapi", **json.loads(document_bytes())}
    registry: Registry[Any] = Registry().with_resource(doc["$id"], DRAFT202012.create_resource(doc))
    return Draft202012Validator({"$ref": f"urn:conduit:openapi#/components/schemas/{component}"}, registry=registry)


def validate_ours(component: str, obj: Any) -> None:
    errors = [f"{e.json_path}: {e.message}" for e in _ours(component).iter_errors(obj)]
    assert not errors, f"{component}: {errors}\n{json.dumps(obj)[:2000]}"


def post(target: fuzz.Target, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{target.base_url}{path}", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {target.api_key}"})


def events(resp: httpx.Response) -> list[Any]:
    """The JSON data of each event of a server-sent event stream (``[DONE]`` left out)."""
    data = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"]


def test_the_document_is_served_as_checked_in_without_a_key(target: fuzz.Target) -> None:
    resp = httpx.get(f"{target.base_url}/openapi.json", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.content == document_bytes()
    assert resp.headers["x-request-id"]
    assert "/openapi.json" in resp.json()["paths"]


def test_real_answers_are_valid_against_both_documents(target: fuzz.Target) -> None:
    chat = {"model": fuzz.CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    resp = post(target, "/v1/chat/completions", chat)
    assert resp.status_code == 200, resp.text
    validate_ours("ChatCompletion", resp.json())
    validate_openai("CreateChatCompletionResponse", resp.json())
    resp = post(target, "/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and len(events(resp)) > 2, resp.text
    for chunk in events(resp):
        validate_ours("ChatCompletionChunk", chunk)
        validate_openai("CreateChatCompletionStreamResponse", chunk)

    completion = {"model": fuzz.CHAT_MODEL, "prompt": ["a", "b"], "max_tokens": 3, "logprobs": 1}
    resp = post(target, "/v1/completions", completion)
    assert resp.status_code == 200, resp.text
    validate_ours("Completion", resp.json())
    validate_openai("CreateCompletionResponse", resp.json())
    resp = post(target, "/v1/completions", {**completion, "stream": True, "stream_options": {"include_usage": True}})
    for chunk in events(resp):
        validate_ours("CompletionChunk", chunk)
        validate_completion_chunk(chunk)

    image = {"model": fuzz.IMAGE_MODEL, "prompt": "a fox", "size": "64x64", "response_format": "b64_json",
             "quality": "low"}
    resp = post(target, "/v1/images/generations", image)
    assert resp.status_code == 200, resp.text
    validate_ours("ImagesResponse", resp.json())
    validate_openai("ImagesResponse", resp.json())
    resp = post(target, "/v1/images/generations", {**image, "stream": True, "partial_images": 1})
    kinds = {"image_generation.partial_image": "PartialImageEvent", "image_generation.completed": "CompletedImageEvent"}
    streamed = events(resp)
    assert [e["type"] for e in streamed] == ["image_generation.partial_image", "image_generation.completed"]
    for event in streamed:
        validate_ours(kinds[event["type"]], event)
        validate_openai("ImageGenStreamEvent", event)

    headers = {"Authorization": f"Bearer {target.api_key}"}
    models = httpx.get(f"{target.base_url}/v1/models", headers=headers, timeout=10).json()
    validate_ours("ModelList", models)
    validate_openai("ListModelsResponse", models)
    assert {m["id"] for m in models["data"]} == {fuzz.CHAT_MODEL, fuzz.IMAGE_MODEL}
    for m in models["data"]:
        one = httpx.get(f"{target.base_url}/v1/models/{m['id']}", headers=headers, timeout=10).json()
        validate_ours("Model", one)
        validate_openai("Model", one)

    for resp in (post(target, "/v1/chat/completions", {**chat, "model": fuzz.IMAGE_MODEL}),
                 post(target, "/v1/chat/completions", {**chat, "n": 0}),
                 httpx.get(f"{target.base_url}/v1/models", timeout=10)):
        assert resp.status_code in (400, 401, 404), resp.text
        validate_ours("ErrorEnvelope", resp.json())
        validate_openai("ErrorResponse", resp.json())


def test_fuzzing_finds_no_server_error_and_no_answer_the_document_does_not_describe(target: fuzz.Target) -> None:
    report = fuzz.fuzz(target, CI_CASES, CI_SEED)
    print(report.render())
    documented = {f"{m.upper()} {p}" for p, item in json.loads(document_bytes())["paths"].items() for m in item}
    assert set(report.operations) == documented
    assert all(r.cases for r in report.operations.values()), report.render()
    assert report.server_errors == 0, report.render()
    assert not report.failures, report.render()
    chat = report.operations["POST /v1/chat/completions"].statuses
    assert chat[200] > 10 and chat[400] > 10 and chat[404] > 0, report.render()  # the cases reach the engines


def test_the_fuzzer_catches_a_document_that_does_not_match_the_answers(target: fuzz.Target) -> None:
    """A document that leaves out a status the route answers, that requires a field no answer
    has, or one no streamed chunk has: each is reported (the checks can fail)."""
    lying = json.loads(document_bytes())
    del lying["paths"]["/v1/models/{model_id}"]["get"]["responses"]["404"]
    lying["components"]["schemas"]["ModelList"]["required"].append("next_page")
    lying["components"]["schemas"]["ChatCompletionChunk"]["required"].append("next_page")
    report = fuzz.fuzz(target, 80, CI_SEED, document=lying,
                       only={"retrieveModel", "listModels", "createChatCompletion"})
    found = {(op, what) for (op, what) in report.failures}
    assert ("GET /v1/models/{model_id}", "Undocumented status code (status 404)") in found, found
    assert ("GET /v1/models", "Response violates schema (status 200)") in found, found
    assert ("POST /v1/chat/completions", "SSE event violates schema (status 200)") in found, found
