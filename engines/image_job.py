"""An image job's request: the client's CreateImageRequest read, checked and resolved for an engine.

The gateway already checked the syntax of every field; this module applies the limits only
the engine knows (its sizes, its step counts) and the defaults the client left out (the SDK
sends only what the caller set), and turns a decoded image into the bytes of the requested
format. It imports no ML library (PIL only when encoding).
"""

from __future__ import annotations

import io
import secrets
from typing import TYPE_CHECKING, Any

import msgspec

from engines.backend import JobRejected

if TYPE_CHECKING:
    from PIL.Image import Image

#: Largest seed a client may send.
MAX_SEED = 2**63 - 1
#: Seeds the engine picks are below 2**53, so JSON readers that hold numbers as doubles
#: (JavaScript) read back the seed exactly and can reproduce the image.
RANDOM_SEEDS = 2**53
FORMATS = ("png", "jpeg", "webp")
QUALITIES = ("auto", "low", "medium", "high", "standard", "hd")


class ImageRequest(msgspec.Struct, forbid_unknown_fields=False):
    """The fields of OpenAI's CreateImageRequest (and Conduit's extensions) an engine reads."""

    prompt: str = ""
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    background: str | None = None
    stream: bool | None = None
    partial_images: int | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None


class EditRequest(ImageRequest, forbid_unknown_fields=False):
    """An ``image_edit`` job's body: the request's fields, and where its pictures are. Each of
    ``images`` and ``mask`` is ``input:<i>`` (``JobOptions.inputs[i]``, in the blob store) or an
    http(s) URL the engine fetches under its media policy."""

    images: list[str] = []
    mask: str | None = None
    #: How far from the input the result may go: 1 starts from noise, 0.5 halfway.
    strength: float | None = None


class ImageLimits(msgspec.Struct, kw_only=True):
    """What an engine allows and assumes, from its settings and its model."""

    default_width: int
    default_height: int
    min_size: int
    max_size: int
    default_steps: int
    max_steps: int
    quality_steps: dict[str, int]
    default_guidance: float
    max_guidance: float = 50.0
    #: Pixels of one picture an edit may hand in (checked on its header, before decoding).
    max_input_pixels: int = 4096 * 4096


class ImageSpec(msgspec.Struct, kw_only=True):
    """One image job, resolved: every default applied, every limit checked."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance: float
    #: One seed per image: image i is generated from ``seeds[i]``.
    seeds: list[int]
    output_format: str
    output_compression: int
    #: Previews per image (0 unless the client streams).
    partial_images: int
    #: An edit's pictures, one per image (PIL RGB, ``width`` x ``height``); empty: text-to-image.
    sources: list[Any] = []
    #: An edit's masks, one per image (PIL ``L``, 255 where repainted) or None (all of it may change).
    masks: list[Any] = []
    #: An edit's strength (see :class:`EditRequest`).
    strength: float = 1.0

    @property
    def n(self) -> int:
        return len(self.seeds)


_decoder = msgspec.json.Decoder(ImageRequest)


def _reject(message: str, param: str) -> JobRejected:
    return JobRejected(message, param=param)


def parse_size(size: str | None, limits: ImageLimits) -> tuple[int, int]:
    """``auto``/absent -> the model's default; else ``WxH`` within the engine's limits."""
    if size in (None, "", "auto"):
        return limits.default_width, limits.default_height
    w, sep, h = size.partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise _reject(f"Invalid size {size!r}: expected 'auto' or WIDTHxHEIGHT.", "size")
    width, height = int(w), int(h)
    for edge in (width, height):
        if edge % 8:
            raise _reject(f"Invalid size {size!r}: width and height must be multiples of 8.", "size")
        if not limits.min_size <= edge <= limits.max_size:
            raise _reject(f"Invalid size {size!r}: width and height must be between {limits.min_size} and "
                          f"{limits.max_size} pixels for this model.", "size")
    return width, height


def read(body: bytes, decoder: msgspec.json.Decoder[Any]) -> Any:
    """The job body decoded; raises :class:`JobRejected` (400, with ``param``)."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        # msgspec names the field as "$.field" at the end of its message.
        path = str(exc).rpartition("$.")[2].split(".")[0].split("[")[0] if "$." in str(exc) else None
        raise JobRejected(f"Invalid request: {exc}", param=path) from None
    except msgspec.DecodeError as exc:
        raise JobRejected(f"The request body is not valid JSON: {exc}") from None


def resolve(body: bytes, limits: ImageLimits) -> ImageSpec:
    """An ``image`` job's body as an :class:`ImageSpec`; raises :class:`JobRejected` (400, with ``param``)."""
    req = read(body, _decoder)
    if not req.prompt:
        raise _reject("prompt is required.", "prompt")
    return spec_of(req, limits, parse_size(req.size, limits), 1)


def spec_of(req: ImageRequest, limits: ImageLimits, size: tuple[int, int], per_seed: int) -> ImageSpec:
    """Every default applied and every limit checked: ``n`` x ``per_seed`` images of ``size``."""
    n = 1 if req.n is None else req.n
    if not 1 <= n <= 10:
        raise _reject(f"Invalid n {n}: between 1 and 10 images per request.", "n")
    n *= per_seed
    width, height = size
    if req.background == "transparent":
        raise _reject("This model cannot produce transparent backgrounds; use background 'opaque' or 'auto'.",
                      "background")
    quality = req.quality or "auto"
    if quality not in QUALITIES:
        raise _reject(f"Invalid quality {quality!r}.", "quality")
    if req.num_inference_steps is not None:
        steps = req.num_inference_steps
        if not 1 <= steps <= limits.max_steps:
            raise _reject(f"num_inference_steps must be between 1 and {limits.max_steps}.", "num_inference_steps")
    else:
        steps = min(limits.quality_steps.get(quality, limits.default_steps), limits.max_steps)
    guidance = limits.default_guidance if req.guidance_scale is None else float(req.guidance_scale)
    if not 0 <= guidance <= limits.max_guidance:
        raise _reject(f"guidance_scale must be between 0 and {limits.max_guidance:g}.", "guidance_scale")
    fmt = req.output_format or "png"
    if fmt not in FORMATS:
        raise _reject(f"Invalid output_format {fmt!r}: png, jpeg or webp.", "output_format")
    compression = 100 if req.output_compression is None else req.output_compression
    if not 0 <= compression <= 100:
        raise _reject("output_compression must be between 0 and 100.", "output_compression")
    partial = req.partial_images or 0
    if not 0 <= partial <= 3:
        raise _reject("partial_images must be between 0 and 3.", "partial_images")
    if req.seed is not None:
        if not 0 <= req.seed <= MAX_SEED - (n - 1):
            raise _reject("seed must be between 0 and 2**63-1 (less n-1).", "seed")
        seeds = [req.seed + i for i in range(n)]
    else:
        seeds = [secrets.randbelow(RANDOM_SEEDS) for _ in range(n)]
    return ImageSpec(prompt=req.prompt, negative_prompt=req.negative_prompt, width=width, height=height,
                     steps=steps, guidance=guidance, seeds=seeds, output_format=fmt,
                     output_compression=compression, partial_images=partial if req.stream else 0)


def encode_image(image: Image, fmt: str, compression: int) -> bytes:
    """``image`` in ``fmt``: jpeg/webp at quality ``compression``; png lossless (moderate zlib effort)."""
    buf = io.BytesIO()
    if fmt == "png":
        # Level 4: most of level 9's size at a fraction of its time; optimize would redo it.
        image.save(buf, format="PNG", optimize=False, compress_level=4)
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=compression)
    else:
        image.save(buf, format="WEBP", quality=compression)
    return buf.getvalue()
