"""OpenAI's image generation schemas: the request the gateway validates, the objects it answers with.

The request is OpenAI's ``CreateImageRequest`` plus the diffusion parameters clients send
through ``extra_body`` (``negative_prompt``, ``num_inference_steps``, ``guidance_scale``,
``seed``). The gateway checks every field's type and range (a 400 naming it); limits that
depend on the model (its sizes, its most steps, whether it can draw alpha) are the engine's
to check, with the same kind of 400. The body travels to the engine unchanged: it applies
every default, since the SDK sends only what the caller set.

Responses follow ``ImagesResponse`` and ``ImageGenStreamEvent``: fields whose values the
schema enumerates (``size``, ``quality``) are reported only with values it allows, and each
image also carries the ``seed`` it was made with (an extension).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.errors import InvalidRequest
from gateway.settings import RequestBounds
from gateway.tenancy.cost import Cost

_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")  # fullmatch: `$` lets a final newline in

#: Values the response schemas allow for ``size`` and ``quality`` (stream events add ``auto``).
ResponseSize = Literal["1024x1024", "1024x1536", "1536x1024"]
ResponseQuality = Literal["low", "medium", "high"]
OutputFormat = Literal["png", "jpeg", "webp"]
RESPONSE_SIZES = frozenset(get_args(ResponseSize))
RESPONSE_QUALITIES = frozenset(get_args(ResponseQuality))

#: Fields OpenAI's API does not define (``x-conduit-extension`` in the OpenAPI document, see
#: ``gateway.openapi``): the diffusion parameters, and what Conduit adds to its answers.
DIFFUSERS_EXTENSION = Meta(extra_json_schema={"x-conduit-extension": "diffusers"})
CONDUIT_EXTENSION = Meta(extra_json_schema={"x-conduit-extension": "conduit"})


class ImageOptions(Struct, kw_only=True, forbid_unknown_fields=False):
    """What image generations and edits share: OpenAI's fields, then the diffusion extensions."""

    n: Annotated[int, Meta(ge=1, le=10)] | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: OutputFormat | None = None
    output_compression: Annotated[int, Meta(ge=0, le=100)] | None = None
    stream: bool | None = None
    partial_images: Annotated[int, Meta(ge=0, le=3)] | None = None
    size: str | None = None
    moderation: Literal["low", "auto"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    user: str | None = None
    # ---- extensions (diffusers), sent through the SDK's ``extra_body`` ----
    negative_prompt: Annotated[str | None, DIFFUSERS_EXTENSION] = None
    num_inference_steps: Annotated[Annotated[int, Meta(ge=1)] | None, DIFFUSERS_EXTENSION] = None
    guidance_scale: Annotated[Annotated[float, Meta(ge=0, le=50)] | None, DIFFUSERS_EXTENSION] = None
    seed: Annotated[Annotated[int, Meta(ge=0, le=2**63 - 1)] | None, DIFFUSERS_EXTENSION] = None


class ImageRequest(ImageOptions, kw_only=True, forbid_unknown_fields=False):
    """``POST /v1/images/generations``: the shared fields and the prompt, its quality and style."""

    prompt: Annotated[str, Meta(min_length=1)]
    model: str
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None

    def check(self, limits: RequestBounds) -> None:
        check_image_fields(self, limits)

    def cost(self, limits: RequestBounds) -> Cost:
        """What the request takes from its key's limits at admission (``gateway.tenancy.cost``): the
        images it asks for, against images per minute (no tokens)."""
        return Cost(tokens=None, images=self.n or 1)


def check_image_fields(self: Any, limits: RequestBounds) -> None:
    """Bounds that depend on settings, and the syntax of ``size``: of a generation or an edit (``self``)."""
    if len(self.prompt) > limits.max_image_prompt_chars:
        raise InvalidRequest(f"Invalid 'prompt': at most {limits.max_image_prompt_chars} characters, but got "
                             f"{len(self.prompt)}.", param="prompt", code="invalid_value")
    if self.negative_prompt is not None and len(self.negative_prompt) > limits.max_image_prompt_chars:
        raise InvalidRequest(f"Invalid 'negative_prompt': at most {limits.max_image_prompt_chars} characters.",
                             param="negative_prompt", code="invalid_value")
    if self.num_inference_steps is not None and self.num_inference_steps > limits.max_image_steps:
        raise InvalidRequest(f"Invalid 'num_inference_steps': at most {limits.max_image_steps}, but got "
                             f"{self.num_inference_steps}.", param="num_inference_steps", code="invalid_value")
    if self.size is not None and self.size != "auto":
        m = _SIZE.fullmatch(self.size)
        if m is None or int(m[1]) % 8 or int(m[2]) % 8:
            raise InvalidRequest(f"Invalid 'size': {self.size!r}. Use 'auto' or 'WIDTHxHEIGHT' with both in "
                                 "pixels and multiples of 8, e.g. '1024x1024'.", param="size", code="invalid_value")
        if int(m[1]) * int(m[2]) > limits.max_image_pixels:
            raise InvalidRequest(f"Invalid 'size': {self.size} is more than {limits.max_image_pixels} pixels.",
                                 param="size", code="invalid_value")
    if self.partial_images and not self.stream:
        raise InvalidRequest("`partial_images` is only allowed when `stream` is true.", param="partial_images")


class ImageObject(Struct, omit_defaults=True):
    b64_json: str | UnsetType = UNSET
    url: str | UnsetType = UNSET
    #: The seed of the image's generator (the same seed makes the same image).
    seed: Annotated[int, CONDUIT_EXTENSION] | UnsetType = UNSET


class InputTokensDetails(Struct):
    text_tokens: int
    image_tokens: int = 0


class ImagesUsage(Struct):
    """Both ``ImageGenUsage`` (responses) and ``ImagesUsage`` (stream events) take this shape."""

    total_tokens: int
    input_tokens: int
    output_tokens: int
    input_tokens_details: InputTokensDetails


class ImagesResponse(Struct, omit_defaults=True):
    created: int
    data: list[ImageObject]
    background: Literal["transparent", "opaque"] | UnsetType = UNSET
    output_format: OutputFormat | UnsetType = UNSET
    size: ResponseSize | UnsetType = UNSET
    quality: ResponseQuality | UnsetType = UNSET
    usage: ImagesUsage | UnsetType = UNSET


class _ImageEvent(Struct):
    """What both ``ImageGenStreamEvent`` kinds carry."""

    b64_json: str
    created_at: int
    size: ResponseSize | Literal["auto"]
    quality: ResponseQuality | Literal["auto"]
    background: Literal["transparent", "opaque", "auto"]
    output_format: OutputFormat


class PartialImageEvent(_ImageEvent, tag="image_generation.partial_image", tag_field="type"):
    partial_image_index: int


class CompletedImageEvent(_ImageEvent, tag="image_generation.completed", tag_field="type"):
    usage: ImagesUsage


class EditPartialImageEvent(_ImageEvent, tag="image_edit.partial_image", tag_field="type"):
    partial_image_index: int


class EditCompletedEvent(_ImageEvent, tag="image_edit.completed", tag_field="type"):
    usage: ImagesUsage


def images_usage(text_tokens: int) -> ImagesUsage:
    """Usage of an image request: its prompt's text tokens in, no tokens out (a diffusion model
    makes pixels, not tokens)."""
    return ImagesUsage(total_tokens=text_tokens, input_tokens=text_tokens, output_tokens=0,
                       input_tokens_details=InputTokensDetails(text_tokens=text_tokens))
