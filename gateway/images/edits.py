"""``POST /v1/images/edits`` and ``POST /v1/images/variations``: pictures in, images out, through the
same flow, jobs and answers as generations (``gateway.images.serving``).

Both of OpenAI's request forms are read:

* ``multipart/form-data``: ``image`` (or ``image[]``, several) and ``mask`` files, every other field
  as text, typed as the JSON form's fields are;
* ``application/json``: ``images`` and ``mask`` as ``{"image_url": ...}``, a ``data:`` URL (the
  picture travels in the request), or an http(s) URL the media policy allows
  (``engines.contract.media``), which the engine fetches itself. ``file_id`` is refused (no Files API).

Every picture that arrives with the request is checked on its header
(``engines.contract.pictures``) before anything is queued: PNG, JPEG or WebP, at most
``max_image_pixels``, a mask with an alpha channel and its image's size; a decompression bomb is
refused while it is still bytes. It travels to the engine by reference: once the key's limits
admitted the request, the gateway writes it to the blob store (``JobOptions.inputs``, expiring at
the job's deadline) and deletes it when the request ends.

Bounds: the whole body (``max_edit_bytes``, counted as it is read: 413), the multipart parser's
parts (:data:`MAX_PARTS`), header sizes and text fields (:data:`MAX_FIELD_BYTES`), pictures per
request (:data:`MAX_PICTURES`) and images per request (``n`` x pictures, :data:`MAX_IMAGES`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from engines.contract.lane import REDIS_ERRORS
from engines.contract.media import MediaPolicy, MediaRefused
from engines.contract.messages import BlobRef, JobOptions
from engines.contract.pictures import PICTURE_TYPES, Picture, Refused, admitted, check_mask
from engines.contract.store import ImageStore, new_input_ref
from gateway.common.decoding import RequestDecoder, invalid
from gateway.errors import ConduitError, InvalidRequest
from gateway.images.protocol import DIFFUSERS_EXTENSION, ImageOptions, check_image_fields
from gateway.run import JobRun
from gateway.settings import RequestBounds
from gateway.tenancy.cost import Cost

#: Pictures one request may hand in (OpenAI's limit), and images it may ask for (``n`` x pictures).
MAX_PICTURES = 16
MAX_IMAGES = 16
#: Parts of a multipart body (fields and files), and bytes of one text field (a 32,000-character
#: prompt fits in any UTF-8).
MAX_PARTS = 64
MAX_FIELD_BYTES = 160 * 1024
#: The job fields that stay at the gateway (how it answers; what only OpenAI's models read).
_GATEWAY_ONLY = frozenset({"model", "user", "moderation", "input_fidelity", "response_format", "images", "mask"})


class ImageRef(Struct, forbid_unknown_fields=True):
    """A picture of the JSON form: ``image_url`` (a ``data:`` or http(s) URL) or ``file_id``."""

    image_url: str | None = None
    file_id: str | None = None


class ImageEditRequest(ImageOptions, kw_only=True, forbid_unknown_fields=False):
    """``POST /v1/images/edits`` (OpenAI's ``CreateImageEditRequest`` and ``EditImageBodyJsonParam``): the
    shared image fields, the pictures (the JSON form's: the multipart form's are files), ``strength``."""

    model: str
    prompt: str = ""
    images: list[ImageRef] = []
    mask: ImageRef | None = None
    quality: Literal["standard", "low", "medium", "high", "auto"] | None = None
    input_fidelity: Literal["high", "low"] | None = None
    #: How far from the input the result may go: 1 starts from noise (default with a mask), 0.8
    #: without one; denoising runs that share of the steps.
    strength: Annotated[Annotated[float, Meta(gt=0, le=1)] | None, DIFFUSERS_EXTENSION] = None

    def check(self, limits: RequestBounds) -> None:
        check_image_fields(self, limits)


class ImageVariationRequest(Struct, kw_only=True, forbid_unknown_fields=False):
    """``POST /v1/images/variations`` (OpenAI's ``CreateImageVariationRequest``): one ``image`` file, no
    prompt; made as an edit of the whole picture with an empty prompt."""

    model: str
    n: Annotated[int, Meta(ge=1, le=10)] | None = None
    response_format: Literal["url", "b64_json"] | None = None
    size: str | None = None
    user: str | None = None
    num_inference_steps: Annotated[Annotated[int, Meta(ge=1)] | None, DIFFUSERS_EXTENSION] = None
    seed: Annotated[Annotated[int, Meta(ge=0, le=2**63 - 1)] | None, DIFFUSERS_EXTENSION] = None
    strength: Annotated[Annotated[float, Meta(gt=0, le=1)] | None, DIFFUSERS_EXTENSION] = None


#: The multipart form's text fields: the JSON form's but its pictures (files there).
ImageEditForm = msgspec.defstruct(
    "ImageEditForm", [(f.name, f.type, f.default) for f in msgspec.structs.fields(ImageEditRequest)
                      if f.name not in ("images", "mask")], kw_only=True, forbid_unknown_fields=False)
_BINARY = {"type": "string", "format": "binary"}
#: The multipart form's files (OpenAPI schemas).
EDIT_FILES = (("image", {"anyOf": [_BINARY, {"type": "array", "items": _BINARY, "maxItems": MAX_PICTURES}]}),
              ("image[]", {"type": "array", "items": _BINARY, "maxItems": MAX_PICTURES}), ("mask", _BINARY))


class Edit:
    """One edit request as the flow runs it: its fields, its pictures (bytes that came with it, or an
    http(s) URL the engine fetches), the job's body, and once admitted, their blob references.

    The uploads' bytes are held only until they are in the blob store (or the request ends): then
    they are dropped, and what they took of the gateway's budget of edit bytes given back
    (``gateway.images.forms.EditBytes``)."""

    __slots__ = ("req", "count", "body", "uploads", "formats", "refs", "_store", "_dropping", "_held", "__weakref__")

    def __init__(self, req: ImageEditRequest, pictures: list[bytes | str], mask: bytes | str | None,
                 formats: list[str]) -> None:
        self.req = req
        self.count = len(pictures)
        #: The uploads (``input:<i>`` of the job's body) and their formats, in order.
        self.uploads = [p for p in [*pictures, mask] if isinstance(p, bytes)]
        self.formats = formats
        at = iter(range(len(self.uploads)))
        names = [p if isinstance(p, str) else f"input:{next(at)}" for p in [*pictures, mask] if p is not None]
        fields = {f: v for f in req.__struct_fields__ if f not in _GATEWAY_ONLY and (v := getattr(req, f)) is not None}
        fields["images"] = names[:len(pictures)]
        if mask is not None:
            fields["mask"] = names[-1]
        #: The job's body: the request's fields, its pictures as ``input:<i>`` or their URLs.
        self.body = msgspec.json.encode(fields)
        req.images, req.mask = [], None  # (a JSON form's data URLs: its bytes are in ``uploads``)
        self.refs: list[str] = []
        self._store: ImageStore | None = None
        self._dropping: asyncio.Task[None] | None = None
        self._held: Any = None

    # What the flow and the answers read of a request.
    model = property(lambda self: self.req.model)
    stream = property(lambda self: self.req.stream)
    output_format = property(lambda self: self.req.output_format)
    quality = property(lambda self: self.req.quality)
    size = property(lambda self: self.req.size)
    response_format = property(lambda self: self.req.response_format)

    def cost(self, limits: RequestBounds) -> Cost:
        """Images per minute: ``n`` for each picture."""
        return Cost(tokens=None, images=(self.req.n or 1) * self.count)

    def hold(self, held: Any) -> None:
        """Keep ``held`` (what the bytes took of the gateway's budget) until the bytes are dropped."""
        self._held = held

    def release(self) -> None:
        """The bytes are in the blob store, or will never be: drop them."""
        self.uploads = []
        if self._held is not None:
            self._held.release()
            self._held = None

    async def stage(self, run: JobRun, store: ImageStore) -> None:
        """Name the uploads in the job (``JobOptions.inputs``); written once admitted (:meth:`put`)."""
        if not self.uploads:
            return
        self._store = store
        blobs = [BlobRef(new_input_ref(fmt), PICTURE_TYPES[fmt], len(data))
                 for data, fmt in zip(self.uploads, self.formats, strict=True)]
        self.refs = [b.ref for b in blobs]
        options = run.job.options or JobOptions()
        run.job = msgspec.structs.replace(run.job, options=msgspec.structs.replace(options, inputs=blobs))
        run.staged = self

    async def put(self, deadline_ms: int) -> None:
        """Write the uploads to the blob store, alive until the job's deadline (and a little after);
        then drop them here."""
        ttl = max(deadline_ms - int(time.time() * 1000), 0) + 5_000
        try:
            await asyncio.gather(*(self._store.put(ref, data, ttl)  # type: ignore[union-attr]
                                   for ref, data in zip(self.refs, self.uploads, strict=True)))
        except REDIS_ERRORS:
            raise ConduitError("The request queue is unavailable; retry shortly.", status=503,
                               code="queue_unavailable") from None
        finally:
            self.release()

    def drop(self) -> None:
        """Delete the uploads, off the response's path (the request is over, or was refused); once."""
        self.release()
        if self._dropping is None:
            self._dropping = asyncio.get_running_loop().create_task(self._delete())

    async def _delete(self) -> None:
        try:
            await self._store.delete(self.refs)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - they expire anyway
            pass


def _refused(exc: Refused) -> InvalidRequest:
    return InvalidRequest(exc.message, param=exc.param, code=exc.code)


def checked(req: ImageEditRequest, pictures: list[bytes | str], mask: bytes | str | None, params: list[str],
            limits: RequestBounds, policy: MediaPolicy) -> Edit:
    """The request with its pictures, every bound and rule checked (a 400 naming the parameter)."""
    req.check(limits)
    if len(pictures) > MAX_PICTURES:
        raise InvalidRequest(f"At most {MAX_PICTURES} images per edit, but got {len(pictures)}.", param="image",
                             code="invalid_value")
    if (req.n or 1) * len(pictures) > MAX_IMAGES:
        raise InvalidRequest(f"n x images is at most {MAX_IMAGES}: each of the {len(pictures)} images is edited "
                             f"n = {req.n} times.", param="n", code="invalid_value")
    headers: list[Picture | None] = []
    try:
        for picture, param in zip([*pictures, mask], params, strict=False):
            if isinstance(picture, str):
                try:
                    policy.check(picture)
                except MediaRefused as exc:
                    raise InvalidRequest(exc.message, param=param, code=exc.code) from None
                headers.append(None)
            elif picture is not None:
                headers.append(admitted(picture, param, limits.max_image_pixels))
        if isinstance(mask, bytes):
            check_mask(headers[-1], headers[0])  # type: ignore[arg-type]
    except Refused as exc:
        raise _refused(exc) from None
    return Edit(req, pictures, mask, [h.format for h in headers if h is not None])


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def from_json(body: bytes, decoder: RequestDecoder[ImageEditRequest], limits: RequestBounds,
              policy: MediaPolicy) -> Edit:
    """The JSON form: ``images`` (required, with a prompt) and ``mask`` by ``image_url``."""
    try:  # a cheap first look (its other fields skipped): no list of a million objects is ever built
        listed = _LISTED.decode(body).images
    except (msgspec.DecodeError, msgspec.ValidationError):
        listed = None  # the full decode below says what is wrong
    if listed is not None and listed.count(b"{") > MAX_PICTURES:
        raise InvalidRequest(f"At most {MAX_PICTURES} images per edit.", param="images", code="invalid_value")
    req = decoder.decode(body)
    if not req.prompt:
        raise _missing("prompt")
    if not req.images:
        raise _missing("images")
    pictures = [_ref(ref, f"images[{i}]") for i, ref in enumerate(req.images)]
    params = [f"images[{i}].image_url" for i in range(len(req.images))]
    mask = _ref(req.mask, "mask") if req.mask is not None else None
    return checked(req, pictures, mask, [*params, "mask.image_url"], limits, policy)


class _Listed(Struct, forbid_unknown_fields=False):
    images: msgspec.Raw | None = None


_LISTED = msgspec.json.Decoder(_Listed)


def _ref(ref: ImageRef, param: str) -> bytes | str:
    if ref.file_id is not None:
        raise InvalidRequest("File ids are not served here (there is no Files API): send the image as an upload, "
                             "a data: URL or an http(s) URL.", param=f"{param}.file_id", code="invalid_value")
    url = ref.image_url
    if not url:
        raise InvalidRequest(f"Missing required parameter: '{param}.image_url'.", param=f"{param}.image_url",
                             code="missing_required_parameter")
    if url[:5].lower() != "data:":
        return url
    head, sep, data = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise InvalidRequest(f"Invalid '{param}.image_url': a data: URL must be base64 "
                             "(data:image/png;base64,...).", param=f"{param}.image_url", code="invalid_value")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"Invalid '{param}.image_url': its data is not valid base64.",
                             param=f"{param}.image_url", code="invalid_value") from None


def from_form(fields: dict[str, str], files: list[tuple[str, bytes]], request_type: type[Struct],
              limits: RequestBounds, policy: MediaPolicy) -> Edit:
    """The multipart form: ``image``/``image[]`` (several in order) and ``mask`` files, typed text fields."""
    try:
        req: Any = msgspec.convert(fields, request_type, strict=False)
    except msgspec.ValidationError as exc:
        raise invalid(exc) from None
    images = [data for name, data in files if name in ("image", "image[]")]
    masks = [data for name, data in files if name == "mask"]
    other = next((name for name, _ in files if name not in ("image", "image[]", "mask")), None)
    if other is not None:
        raise InvalidRequest(f"Unexpected file field '{other}': send 'image' (or 'image[]') and 'mask'.",
                             param=other, code="invalid_value")
    if not images:
        raise _missing("image")
    if len(masks) > 1:
        raise InvalidRequest("One 'mask' at most.", param="mask", code="invalid_value")
    if request_type is ImageVariationRequest:
        if len(images) > 1:
            raise InvalidRequest("A variation takes one 'image'.", param="image", code="invalid_value")
        if masks:
            raise InvalidRequest("A variation takes no 'mask' (an edit does).", param="mask", code="invalid_value")
        req = ImageEditRequest(**{f: getattr(req, f) for f in req.__struct_fields__})
    elif not req.prompt:
        raise _missing("prompt")
    params = ["image"] if len(images) == 1 else [f"image[{i}]" for i in range(len(images))]
    return checked(req, list(images), masks[0] if masks else None, [*params, "mask"], limits, policy)
