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
from engines.contract.pictures import Picture, Refused, admitted, check_mask
from engines.image_job import EditRequest, ImageLimits, ImageSpec, parse_size, read, spec_of

#: Pictures one edit may hand in (OpenAI's limit), and images it may ask for (``n`` x pictures).
MAX_PICTURES = 16
MAX_IMAGES = 16
#: Strength when the request gives none: a masked region is repainted from noise; a whole
#: picture keeps its composition.
STRENGTH_MASKED = 1.0
STRENGTH_WHOLE = 0.8
#: An edit's URL pictures fetched at once; edits decoding their pictures at once per engine (each
#: holds one full-size picture, up to ``max_input_pixels`` x 3 bytes, while it does).
FETCHES_PER_JOB = 4
DECODES = 2

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


async def resolve_edit(job: Job, source: PictureSource, limits: ImageLimits, decoding: asyncio.Semaphore) -> ImageSpec:
    """``job`` (an ``image_edit``) as an :class:`ImageSpec` with its pictures; raises :class:`JobRejected`.
    ``decoding``: the engine's bound on edits decoding at once (:data:`DECODES`)."""
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
    params = [f"image[{i}]" if count > 1 else "image" for i in range(count)]
    refs = [*zip(req.images, params, strict=True), *([(req.mask, "mask")] if req.mask is not None else [])]
    fetching = asyncio.Semaphore(FETCHES_PER_JOB)  # (URLs: a few at once, each within the job's deadline)
    got = await asyncio.gather(*(_data(ref, stored, source, param, fetching) for ref, param in refs))
    datas, mask_data = got[:count], (got[count] if req.mask is not None else None)
    first = await asyncio.to_thread(_headers, datas, params, mask_data, limits)
    size = parse_size(req.size, limits) if req.size not in (None, "", "auto") else \
        fit((first.width, first.height), limits)
    spec = spec_of(req, limits, size, count)
    if int(spec.steps * strength) < 1:
        raise _reject(f"strength {strength:g} leaves no denoising step of {spec.steps}: raise it or "
                      "num_inference_steps.", "strength")
    async with decoding:  # a few jobs' pictures decoded at once per engine, whatever its concurrency
        sources, mask = await asyncio.to_thread(_decoded, datas, params, mask_data, size, limits)
    spec.sources = [sources[i] for i in range(count) for _ in range(n)]
    spec.masks = [mask if i == 0 else None for i in range(count) for _ in range(n)]
    spec.strength = strength
    return spec


async def _data(ref: str, stored: list[bytes], source: PictureSource, param: str,
                fetching: asyncio.Semaphore) -> bytes:
    if ref.startswith("input:"):
        index = ref[6:]
        if not index.isdigit() or int(index) >= len(stored):
            raise _reject(f"{param} names an input the job does not carry ({ref!r}).", param)
        return stored[int(index)]
    async with fetching:
        return await source.fetch(ref, param)


def _headers(datas: list[bytes], params: list[str], mask_data: bytes | None, limits: ImageLimits) -> Picture:
    """Every picture's header (nothing decoded): its format and pixels, the mask's alpha and size; the
    first picture's."""
    first = [header(data, param, limits) for data, param in zip(datas, params, strict=True)][0]
    if mask_data is not None:
        try:
            check_mask(header(mask_data, "mask", limits), first)
        except Refused as exc:
            raise _reject(exc.message, exc.param, exc.code) from None
    return first



def header(data: bytes, param: str, limits: ImageLimits) -> Picture:
    """A picture's header, refused (:class:`JobRejected` naming ``param``) when it is no PNG, JPEG or
    WebP or has more pixels than the engine takes: nothing is decoded yet."""
    try:
        return admitted(data, param, limits.max_input_pixels)
    except Refused as exc:
        raise _reject(exc.message, exc.param, exc.code) from None


def decode(data: bytes, param: str, limits: ImageLimits) -> Any:
    """A picture decoded (PIL) once its header passed; its data must agree with its header."""
    from PIL import Image

    picture = header(data, param, limits)
    try:
        image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[picture.format]])
        if image.size != (picture.width, picture.height):
            raise ValueError(f"its header says {picture.width}x{picture.height}, its data {image.size}")
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for damaged data
        raise _reject(f"Invalid '{param}': the {picture.format.upper()} image could not be decoded ({exc}).", param,
                      "invalid_image") from None
    return image


def _decoded(datas: list[bytes], params: list[str], mask_data: bytes | None, size: tuple[int, int],
             limits: ImageLimits) -> tuple[list[Any], Any]:
    """The pictures decoded and fitted to ``size``, one at a time (one full-size picture in memory at
    once, whatever their number), and the mask as PIL ``L``: 255 where alpha is 0 (repainted)."""
    from PIL import Image

    sources = []
    for data, param in zip(datas, params, strict=True):
        image = decode(data, param, limits).convert("RGB")
        sources.append(image if image.size == size else image.resize(size, Image.Resampling.LANCZOS))
    if mask_data is None:
        return sources, None
    alpha = decode(mask_data, "mask", limits).convert("RGBA").getchannel("A")
    mask = alpha.point(lambda a: 255 if a == 0 else 0)
    return sources, mask if mask.size == size else mask.resize(size, Image.Resampling.NEAREST)


def fit(size: tuple[int, int], limits: ImageLimits) -> tuple[int, int]:
    """A picture's size as the output's default: scaled (keeping its shape) into the engine's
    edge limits, each edge rounded to a multiple of 8."""
    width, height = size
    scale = min(1.0, limits.max_size / max(width, height))
    scale = max(scale, limits.min_size / min(width, height))
    edges = [min(max(round(e * scale / 8) * 8, limits.min_size), limits.max_size) for e in (width, height)]
    return edges[0], edges[1]
