"""The vendored image schemas: OpenAI's own examples pass, and they are as strict as the spec."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.openai_schema import validate

USAGE = {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50,
         "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}

# The examples in the spec's x-oaiMeta of each schema.
RESPONSE: dict[str, Any] = {"created": 1713833628, "data": [{"b64_json": "..."}], "background": "transparent",
                            "output_format": "png", "size": "1024x1024", "quality": "high", "usage": USAGE}
PARTIAL: dict[str, Any] = {"type": "image_generation.partial_image", "b64_json": "...", "created_at": 1620000000,
                           "size": "1024x1024", "quality": "high", "background": "transparent",
                           "output_format": "png", "partial_image_index": 0}
COMPLETED: dict[str, Any] = {"type": "image_generation.completed", "b64_json": "...", "created_at": 1620000000,
                             "size": "1024x1024", "quality": "high", "background": "transparent",
                             "output_format": "png", "usage": USAGE}


def changed(obj: dict[str, Any], **fields: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out.update(fields)
    return out


def test_openai_examples_validate() -> None:
    validate("ImagesResponse", RESPONSE)
    validate("ImageGenStreamEvent", PARTIAL)
    validate("ImageGenStreamEvent", COMPLETED)


def test_extra_image_fields_pass() -> None:
    """Conduit adds ``seed`` to each image object; the spec does not close ``Image``."""
    validate("ImagesResponse", {"created": 1, "data": [{"url": "http://h/v1/images/files/x.png", "seed": 7}]})


@pytest.mark.parametrize(("schema", "obj"), [
    ("ImagesResponse", changed(RESPONSE, size="64x64")),  # only the schema's sizes may be reported
    ("ImagesResponse", changed(RESPONSE, quality="auto")),
    ("ImagesResponse", changed(RESPONSE, output_format="gif")),
    ("ImagesResponse", {"data": []}),  # created is required
    ("ImagesResponse", changed(RESPONSE, usage={"total_tokens": 1})),
    ("ImageGenStreamEvent", changed(PARTIAL, size="64x64")),  # a stream event must say "auto" instead
    ("ImageGenStreamEvent", changed(PARTIAL, partial_image_index=None)),
    ("ImageGenStreamEvent", changed(COMPLETED, type="image_generation.done")),
    ("ImageGenStreamEvent", {k: v for k, v in COMPLETED.items() if k != "usage"}),
])
def test_violations_fail(schema: str, obj: dict[str, Any]) -> None:
    with pytest.raises(AssertionError, match=schema):
        validate(schema, obj)
