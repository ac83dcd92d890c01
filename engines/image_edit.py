"""An ``image_edit`` job resolved for the step loop: its pictures read (from the blob store, or
fetched under the media policy), checked on their headers, decoded, fitted to the output size,
and every field checked as an image job's are (``engines.image_job``).

What an edit means here:

* each picture of ``images`` is edited ``n`` times (images ``i*n`` to ``i*n + n - 1`` of the answer
  come from picture ``i``), all at one size: ``size``, or by default the first picture's size
  fitted to the model's limits and rounded to a multiple of 8;
* the ``mask`` applies to the first picture (as OpenAI's does): its fully transparent pixels
  (alpha 0) mark what is repainted; every other pixel of the result is the input's own. The mask
  must be the size of the first picture and have an alpha channel;
* ``strength`` (0 < s <= 1; default 1 with a mask, 0.8 without) is how far from the input the
  result may go: denoising starts at the step it gives, so 0.5 runs half the steps.

A picture is refused (400 naming it) on its header (``engines.contract.pictures``) before it is
decoded: not PNG, JPEG or WebP, more pixels than the engine takes, or a header its data
contradicts. PIL imports lazily (this module is cheap to import).
"""

from __future__ import annotations

import asyncio
import io
from typing import Any, Protocol

import msgspec

from engines.backend import JobRejected
from engines.contract.messages import Job
from engines.contract.pictures import Picture, Unreadable, probe
from engines.image_job import EditRequest, ImageLimits, ImageSpec, parse_size, read, spec_of

#: Pictures one edit may hand in (OpenAI's limit), and images it may ask for (``n`` x pictures).
MAX_PICTURES = 16
MAX_IMAGES = 16
#: Strength when the request gives none: a masked region is repainted from noise; a whole
#: picture keeps its composition.
STRENGTH_MASKED = 1.0
STRENGTH_WHOLE = 0.8

_decoder = msgspec.json.Decoder(EditRequest)
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class PictureSource(Protocol):
    """Where a job's pictures come from (the job's output handle: ``engines.running``)."""

    async def inputs(self) -> list[bytes]:
        """The job's ``JobOptions.inputs``, read from the blob store, in order."""

    async def fetch(self, url: str, param: str) -> bytes:
        """The picture at an http(s) URL, fetched under the engine's media policy."""


def _reject(message: str, param: str, code: str | None = None) -> JobRejected:
    return JobRejected(message, param=param, code=code)


async def resolve_edit(job: Job, source: PictureSource, limits: ImageLimits) -> ImageSpec:
    """``job`` (an ``image_edit``) as an :class:`ImageSpec` with its pictures; raises :class:`JobRejected`."""
    req: EditRequest = read(job.body, _decoder)
    count = len(req.images)
    if not 1 <= count <= MAX_PICTURES:
        raise _reject(f"An edit takes 1 to {MAX_PICTURES} images, not {count}.", "image")
    n = 1 if req.n is None else req.n
    if n * count > MAX_IMAGES:
        raise _reject(f"n x images is at most {MAX_IMAGES}: {n} images of each of {count} pictures is too many.",
                      "n")
    strength = req.strength if req.strength is not None else STRENGTH_MASKED if req.mask else STRENGTH_WHOLE
    if not 0 < strength <= 1:
        raise _reject("strength must be above 0 and at most 1.", "strength")
    stored = await source.inputs() if any(ref.startswith("input:") for ref in [*req.images, req.mask or ""]) \
        else []
    datas = [await _data(ref, stored, source, f"image[{i}]" if count > 1 else "image")
             for i, ref in enumerate(req.images)]
    mask_data = await _data(req.mask, stored, source, "mask") if req.mask is not None else None
    pictures, mask = await asyncio.to_thread(_decode_all, datas, mask_data, limits)
    size = parse_size(req.size, limits) if req.size not in (None, "", "auto") else fit(pictures[0].size, limits)
    spec = spec_of(req, limits, size, count)
    if int(spec.steps * strength) < 1:
        raise _reject(f"strength {strength:g} leaves no denoising step of {spec.steps}: raise it or "
                      "num_inference_steps.", "strength")
    sources, masks = await asyncio.to_thread(_fitted, pictures, mask, size)
    spec.sources = [sources[i] for i in range(count) for _ in range(n)]
    spec.masks = [masks if i == 0 else None for i in range(count) for _ in range(n)]
    spec.strength = strength
    return spec


async def _data(ref: str, stored: list[bytes], source: PictureSource, param: str) -> bytes:
    if ref.startswith("input:"):
        index = ref[6:]
        if not index.isdigit() or int(index) >= len(stored):
            raise _reject(f"{param} names an input the job does not carry ({ref!r}).", param)
        return stored[int(index)]
    return await source.fetch(ref, param)


def decode(data: bytes, param: str, limits: ImageLimits) -> tuple[Any, Picture]:
    """A picture decoded (PIL) after its header passed; raises :class:`JobRejected` naming ``param``."""
    from PIL import Image

    try:
        header = probe(data)
    except Unreadable as exc:
        raise _reject(f"Invalid '{param}': {exc}. Send a PNG, JPEG or WebP image.", param,
                      "invalid_image_format") from None
    if header.pixels > limits.max_input_pixels:
        raise _reject(f"Invalid '{param}': {header.width}x{header.height} is more than {limits.max_input_pixels} "
                      "pixels.", param, "image_too_large")
    try:
        image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[header.format]])
        if image.size != (header.width, header.height):
            raise ValueError(f"its header says {header.width}x{header.height}, its data {image.size}")
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for damaged data
        raise _reject(f"Invalid '{param}': the {header.format.upper()} image could not be decoded ({exc}).", param,
                      "invalid_image") from None
    return image, header


def _decode_all(datas: list[bytes], mask_data: bytes | None, limits: ImageLimits) -> tuple[list[Any], Any]:
    pictures = [decode(data, f"image[{i}]" if len(datas) > 1 else "image", limits)[0].convert("RGB")
                for i, data in enumerate(datas)]
    if mask_data is None:
        return pictures, None
    image, header = decode(mask_data, "mask", limits)
    if not header.alpha:
        raise _reject("Invalid 'mask': it has no alpha channel. Its fully transparent pixels mark what to edit.",
                      "mask", "invalid_mask")
    if image.size != pictures[0].size:
        raise _reject(f"Invalid 'mask': it is {image.size[0]}x{image.size[1]}, the image "
                      f"{pictures[0].size[0]}x{pictures[0].size[1]}; they must be the same size.", "mask",
                      "invalid_mask")
    alpha = image.convert("RGBA").getchannel("A")
    return pictures, alpha.point(lambda a: 255 if a == 0 else 0)


def fit(size: tuple[int, int], limits: ImageLimits) -> tuple[int, int]:
    """A picture's size as the output's default: scaled (keeping its shape) into the engine's
    edge limits, each edge rounded to a multiple of 8."""
    width, height = size
    scale = min(1.0, limits.max_size / max(width, height))
    scale = max(scale, limits.min_size / min(width, height))
    edges = [min(max(round(e * scale / 8) * 8, limits.min_size), limits.max_size) for e in (width, height)]
    return edges[0], edges[1]


def _fitted(pictures: list[Any], mask: Any, size: tuple[int, int]) -> tuple[list[Any], Any]:
    from PIL import Image

    resized = [p if p.size == size else p.resize(size, Image.Resampling.LANCZOS) for p in pictures]
    if mask is not None and mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return resized, mask
