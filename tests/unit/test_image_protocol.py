"""The gateway's validation of image requests: every bad field is a 400 naming it."""

from __future__ import annotations

import json

import pytest

from gateway.common.decoding import RequestDecoder
from gateway.errors import InvalidRequest
from gateway.images.protocol import ImageObject, ImageRequest, ImagesResponse, images_usage
from gateway.settings import RequestBounds

OK = {"model": "tiny-sd", "prompt": "a fox"}


def decode(**fields: object) -> object:
    return RequestDecoder(ImageRequest, RequestBounds()).decode(json.dumps({**OK, **fields}).encode())


def test_a_minimal_request_is_accepted_and_defaults_are_left_to_the_engine() -> None:
    req = decode()
    assert req.n is None and req.size is None and req.response_format is None  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", ["auto", "64x64", "1024x1536", "1536x1024", "8x4096"])
def test_sizes_accepted(size: str) -> None:
    assert decode(size=size).size == size  # type: ignore[attr-defined]


@pytest.mark.parametrize(("field", "value"), [
    ("size", "65x64"), ("size", "abc"), ("size", "0x64"), ("size", "64"), ("size", "64x64x64"), ("size", 64),
    ("size", "-64x64"), ("size", "8192x8192"), ("size", "64x64\n"), ("size", "64x64 "), ("n", 0), ("n", 11), ("n", "2"), ("response_format", "gif"),
    ("output_format", "bmp"), ("quality", "ultra"), ("background", "green"), ("partial_images", 4),
    ("partial_images", -1), ("output_compression", 101), ("output_compression", -1), ("style", "cubist"),
    ("moderation", "none"), ("num_inference_steps", 0), ("num_inference_steps", 10_000),
    ("guidance_scale", -1), ("guidance_scale", 51), ("seed", -1), ("seed", 2**63), ("prompt", ""),
    ("prompt", "x" * 32_001), ("negative_prompt", "x" * 32_001), ("stream", "yes"),
])
def test_a_bad_field_is_a_400_naming_it(field: str, value: object) -> None:
    body = {**OK, field: value}
    if field == "partial_images":
        body["stream"] = True
    with pytest.raises(InvalidRequest) as err:
        RequestDecoder(ImageRequest, RequestBounds()).decode(json.dumps(body).encode())
    assert err.value.status == 400
    assert err.value.param == field


@pytest.mark.parametrize("missing", ["prompt", "model"])
def test_a_missing_required_field_is_named(missing: str) -> None:
    body = dict(OK)
    del body[missing]
    with pytest.raises(InvalidRequest) as err:
        RequestDecoder(ImageRequest).decode(json.dumps(body).encode())
    assert err.value.param == missing
    assert err.value.code == "missing_required_parameter"


def test_partial_images_need_stream() -> None:
    with pytest.raises(InvalidRequest) as err:
        decode(partial_images=2)
    assert err.value.param == "partial_images"
    assert decode(partial_images=2, stream=True).partial_images == 2  # type: ignore[attr-defined]


def test_bounds_follow_settings() -> None:
    decoder = RequestDecoder(ImageRequest, RequestBounds(max_image_prompt_chars=10, max_image_pixels=64 * 64,
                                                           max_image_steps=8))
    for field, value in (("prompt", "x" * 11), ("size", "64x72"), ("num_inference_steps", 9)):
        with pytest.raises(InvalidRequest) as err:
            decoder.decode(json.dumps({**OK, field: value}).encode())
        assert err.value.param == field


def test_unknown_fields_pass_through() -> None:
    assert decode(some_future_field={"a": 1}).prompt == "a fox"  # type: ignore[attr-defined]


def test_response_omits_what_was_not_set() -> None:
    import msgspec

    body = msgspec.json.decode(msgspec.json.encode(ImagesResponse(
        created=1, data=[ImageObject(url="http://x/y.png", seed=3)], usage=images_usage(4))))
    assert body == {"created": 1, "data": [{"url": "http://x/y.png", "seed": 3}],
                    "usage": {"total_tokens": 4, "input_tokens": 4, "output_tokens": 0,
                              "input_tokens_details": {"text_tokens": 4, "image_tokens": 0}}}
