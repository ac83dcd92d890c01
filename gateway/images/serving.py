"""Runs image jobs and answers them: ``url`` or ``b64_json`` collected, or streamed as SSE.

The engine stores every image once (``engines.contract.store``) and its events carry references, so
the reply stream never carries megabytes. A ``b64_json`` answer reads its images, encodes
them and deletes them (nobody will ask again); a ``url`` answer leaves them to expire after
``image_url_ttl_s`` and points at ``/v1/images/files/{ref}``, which any gateway replica can
serve. Streamed answers (always base64, as OpenAI's are) send each partial preview as it is
made and the final images once the job is done, with the request's usage. Everything else about
the request (admission, the job, errors, the stream's end) is the shared flow's (``gateway.flow``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.params import FromPath
from msgspec import UNSET

from engines.contract.media import MediaPolicy
from engines.contract.messages import Event, ImageReady, Usage
from engines.contract.store import ImageStore, media_type, valid_ref
from gateway.apispec import GENERATION, JOB_ERRORS, RATELIMIT, REQUEST_ID, STORED, TRACEPARENT, Operation, \
    documented
from gateway.common.bounds import ModelContext
from gateway.common.decoding import RequestDecoder
from gateway.common.routing import get_and_head
from gateway.dispatch import JobKind
from gateway.errors import ConduitError, EngineError, ErrorEnvelope, InvalidRequest, NotFound
from gateway.images.edits import EDIT_FILES, Edit, ImageEditForm, ImageEditRequest, ImageVariationRequest, from_form, from_json
from gateway.images.forms import EditBytes, read_body, read_form
from gateway.flow import sse_error
from gateway.images.protocol import (
    RESPONSE_QUALITIES,
    RESPONSE_SIZES,
    CompletedImageEvent,
    EditCompletedEvent,
    EditPartialImageEvent,
    ImageObject,
    ImageRequest,
    ImagesResponse,
    PartialImageEvent,
    images_usage,
)
from gateway.run import JobRun, Restarted
from gateway.services import Services
from gateway.settings import ImageSettings, RequestBounds
from gateway.tenancy.guard import PUBLIC

_EXPIRED = "The generated images expired before they could be sent; retry the request."


class _Shape:
    """What every image object of one request reports about it (from the request and its images)."""

    __slots__ = ("output_format", "quality", "size")

    def __init__(self, req: ImageRequest) -> None:
        self.output_format = req.output_format or "png"
        self.quality = req.quality or "auto"
        self.size = req.size or "auto"

    def seen(self, image: ImageReady) -> None:
        self.size = f"{image.width}x{image.height}"

    def event_size(self) -> str:
        return self.size if self.size in RESPONSE_SIZES else "auto"

    def event_quality(self) -> str:
        return self.quality if self.quality in RESPONSE_QUALITIES else "auto"


class ImageGeneration:
    """``POST /v1/images/generations`` as an endpoint of the shared request flow."""

    __slots__ = ("job_kind", "decoder", "store", "settings", "_enc", "bounds", "policy")

    resolve = None  # nothing to read before the job: the request is whole
    read = None
    stage = None  # the client always waits for its answer

    def __init__(self, store: ImageStore, bounds: RequestBounds, settings: ImageSettings) -> None:
        self.job_kind = JobKind("image", "img", output_ttl_ms=int(settings.image_url_ttl_s * 1000))
        self.decoder = RequestDecoder(ImageRequest, bounds)
        self.store = store
        self.settings = settings
        self.bounds = bounds
        self.policy = MediaPolicy(bounds.media_domains)
        self._enc = msgspec.json.Encoder()

    def prepare(self, req: ImageRequest, body: bytes, model: ModelContext, bounds: RequestBounds) -> bytes:
        return body  # the engine checks what depends on the model (its sizes, its most steps)

    def collector(self, req: ImageRequest, request: Request[Any, Any, Any]) -> _Collected:
        base_url = self.settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")
        return _Collected(self, req, base_url)

    def writer(self, req: ImageRequest, first: Event) -> _Streamed:
        return _Streamed(self, req)

    #: The stream's events: their names and types (an edit's are ``image_edit.*``).
    partial_event: tuple[bytes, type[PartialImageEvent | EditPartialImageEvent]] = (
        b"event: image_generation.partial_image\ndata: ", PartialImageEvent)
    completed_event: tuple[bytes, type[CompletedImageEvent | EditCompletedEvent]] = (
        b"event: image_generation.completed\ndata: ", CompletedImageEvent)

    async def delete(self, used: list[str]) -> None:
        # A coroutine on purpose: Litestar runs a plain function's background task in a thread.
        with contextlib.suppress(Exception):  # they expire anyway
            await self.store.delete(used)


class ImageEdit(ImageGeneration):
    """``POST /v1/images/edits`` (and, with ``variations``, ``/v1/images/variations``): read from
    either form, its pictures staged in the blob store (``gateway.images.edits``)."""

    __slots__ = ("form_type", "held")

    partial_event = (b"event: image_edit.partial_image\ndata: ", EditPartialImageEvent)
    completed_event = (b"event: image_edit.completed\ndata: ", EditCompletedEvent)

    def __init__(self, store: ImageStore, bounds: RequestBounds, settings: ImageSettings, *,
                 variations: bool = False, held: EditBytes | None = None) -> None:
        super().__init__(store, bounds, settings)
        self.job_kind = JobKind("image_edit", "img", output_ttl_ms=int(settings.image_url_ttl_s * 1000))
        self.decoder = RequestDecoder(ImageEditRequest, bounds)
        self.form_type = ImageVariationRequest if variations else ImageEditRequest
        #: What this gateway holds of edit bodies at once (edits and variations share it: ``held``).
        self.held = held if held is not None else EditBytes(4 * bounds.max_edit_bytes)

    async def read(self, request: Request[Any, Any, Any]) -> tuple[Edit, bytes]:  # type: ignore[override]
        media = request.content_type[0]
        limit, held = self.bounds.max_edit_bytes, self.held.take()
        try:
            # The parsing and the pictures' headers off the event loop (up to max_edit_bytes of them).
            if media == "multipart/form-data":
                fields, files = await read_form(request, limit, held)
                edit = await asyncio.to_thread(from_form, fields, files, self.form_type, self.bounds, self.policy)
            elif media == "application/json" and self.form_type is ImageEditRequest:
                body = await read_body(request, limit, held)
                edit = await asyncio.to_thread(from_json, body, self.decoder, self.bounds, self.policy)
            else:
                forms = "multipart/form-data" + (" or application/json" if self.form_type is ImageEditRequest else "")
                raise InvalidRequest(f"Send this request as {forms}, not {media or 'no Content-Type'}.",
                                     code="invalid_content_type")
        except BaseException:
            held.release()
            raise
        edit.hold(held)
        return edit, edit.body

    async def stage(self, req: Edit, run: JobRun) -> None:  # type: ignore[override]
        await req.stage(run, self.store)


class _Collected:
    """A collected answer: the final images in request order, as ``url`` or ``b64_json``."""

    __slots__ = ("images", "req", "base_url", "finals")

    def __init__(self, images: ImageGeneration, req: ImageRequest, base_url: str) -> None:
        self.images = images
        self.req = req
        self.base_url = base_url
        self.finals: dict[int, ImageReady] = {}

    def add(self, run: JobRun, event: Event | Restarted) -> None:
        if type(event) is ImageReady:
            if event.partial is None:
                self.finals[event.index] = event
        elif type(event) is Restarted:
            self.finals.clear()  # another attempt makes them again

    async def answer(self, run: JobRun, created: int, usage: Usage) -> Response[Any]:
        req, gen = self.req, self.images
        images = [self.finals[i] for i in sorted(self.finals)]
        shape = _Shape(req)
        for image in images:
            shape.seen(image)
        refs = [image.ref for image in images]
        b64 = (req.response_format or gen.settings.image_response_format) == "b64_json"
        if b64:
            blobs = await gen.store.get_many(refs)
            if any(blob is None for blob in blobs):
                raise EngineError(_EXPIRED, code="output_lost")
            data = [ImageObject(b64_json=base64.b64encode(blob).decode(), seed=image.seed)  # type: ignore[arg-type]
                    for image, blob in zip(images, blobs, strict=True)]
        else:
            data = [ImageObject(url=f"{self.base_url}/v1/images/files/{image.ref}", seed=image.seed)
                    for image in images]
        body = ImagesResponse(
            created=created, data=data, background="opaque", output_format=shape.output_format,
            size=shape.size if shape.size in RESPONSE_SIZES else UNSET,
            quality=shape.quality if shape.quality in RESPONSE_QUALITIES else UNSET,
            usage=images_usage(usage.prompt_tokens))
        return Response(content=gen._enc.encode(body), media_type="application/json",
                        background=BackgroundTask(gen.delete, refs) if b64 else None)


class _Streamed:
    """A streamed answer: each partial preview as it is made, the final images at the end."""

    __slots__ = ("images", "shape", "finals")

    error_prefix = b"event: error\ndata: "

    def __init__(self, images: ImageGeneration, req: ImageRequest) -> None:
        self.images = images
        self.shape = _Shape(req)
        self.finals: dict[int, ImageReady] = {}

    def add(self, run: JobRun, event: Event | Restarted, out: bytearray) -> Any:
        if type(event) is ImageReady:
            self.shape.seen(event)
            if event.partial is None:
                self.finals[event.index] = event
                return None
            return self._partial(event, out)
        if type(event) is Restarted:
            self.finals.clear()  # nothing was shown yet: another attempt makes them again
        return None

    def failed(self, run: JobRun, exc: ConduitError) -> bytes:
        return sse_error(self.error_prefix, exc)

    async def _partial(self, image: ImageReady, out: bytearray) -> None:
        store, shape = self.images.store, self.shape
        blob = await store.get(image.ref)
        with contextlib.suppress(Exception):
            await store.delete([image.ref])
        if blob is None:
            return  # a preview that expired is simply not shown
        prefix, kind = self.images.partial_event
        event = kind(
            b64_json=base64.b64encode(blob).decode(), created_at=int(time.time()), size=shape.event_size(),
            quality=shape.event_quality(), background="opaque", output_format=shape.output_format,
            partial_image_index=image.partial or 0)
        out += prefix + self.images._enc.encode(event) + b"\n\n"

    async def done(self, run: JobRun, event: Any, out: bytearray) -> None:
        store, shape = self.images.store, self.shape
        refs = [self.finals[i].ref for i in sorted(self.finals)]
        blobs = await store.get_many(refs)
        with contextlib.suppress(Exception):
            await store.delete(refs)
        if any(blob is None for blob in blobs):
            out += sse_error(self.error_prefix, EngineError(_EXPIRED, code="output_lost"))
            return
        created = int(time.time())
        prefix, kind = self.images.completed_event
        for blob in blobs:
            completed = kind(
                b64_json=base64.b64encode(blob).decode(), created_at=created,  # type: ignore[arg-type]
                size=shape.event_size(), quality=shape.event_quality(), background="opaque",
                output_format=shape.output_format, usage=images_usage(event.usage.prompt_tokens))
            out += prefix + self.images._enc.encode(completed) + b"\n\n"


CREATE_IMAGE = Operation(
    "createImage", "Create images from a prompt", "Images",
    {**JOB_ERRORS, 400: JOB_ERRORS[400] + " Also the engine's own limits: `size`, `num_inference_steps`, "
                                          "`background: transparent`."},
    body=ImageRequest, json=ImagesResponse,
    stream=(("image_generation.partial_image", (PartialImageEvent,)),
            ("image_generation.completed", (CompletedImageEvent,)), ("error", (ErrorEnvelope,))),
    description="`url` images are served by `GET /v1/images/files/{name}` until they expire. Streamed "
                "(`stream: true`): `partial_images` previews per image, then one `image_generation.completed` "
                "event per image.",
    parameters=GENERATION, ok_headers=RATELIMIT, replayed=STORED)

GET_IMAGE_FILE = Operation(
    "getImageFile", "A generated image (a `url` answer's)", "Images",
    {404: "`image_not_found`: it expired or never existed.", 500: "`internal_error`."},
    description="Needs no API key: the unguessable name is the capability to read it, as OpenAI's signed image "
                "URLs are.",
    binary=("image/png", "image/jpeg", "image/webp"), extension="conduit",
    parameters=({"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "The image's reference, from a `url` answer."}, REQUEST_ID),
    ok_headers=("Cache-Control",))


@post("/v1/images/generations", status_code=200, opt=documented(CREATE_IMAGE))
async def image_generations(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    """Images from a prompt: ``url`` or ``b64_json``, or streamed partial and final images as SSE."""
    return await services.flow.respond(request, services.images)


CREATE_IMAGE_EDIT = Operation(
    "createImageEdit", "Edit images from a prompt, or repaint what a mask marks", "Images",
    {**JOB_ERRORS, 400: JOB_ERRORS[400] + " A picture: `invalid_image_format` (not PNG, JPEG or WebP), "
                                          "`image_too_large`, `invalid_mask` (no alpha channel, or not the first "
                                          "image's size); `invalid_multipart`, `invalid_content_type`."},
    body=ImageEditRequest, form=ImageEditForm, files=EDIT_FILES, json=ImagesResponse,
    stream=(("image_edit.partial_image", (EditPartialImageEvent,)),
            ("image_edit.completed", (EditCompletedEvent,)), ("error", (ErrorEnvelope,))),
    description="`multipart/form-data` (`image` or `image[]` files, `mask`) or JSON (`images`, `mask` as "
                "`image_url`: a data: URL, or an http(s) URL the media policy allows). Each image is edited `n` "
                "times (`data[i*n + j]`); the mask applies to the first: its fully transparent pixels are "
                "repainted, every other pixel is kept. `strength` (0-1) is how far from the input the result "
                "may go.",
    parameters=(REQUEST_ID, TRACEPARENT), ok_headers=RATELIMIT)

CREATE_IMAGE_VARIATION = Operation(
    "createImageVariation", "Variations of an image", "Images",
    {**JOB_ERRORS, 400: CREATE_IMAGE_EDIT.errors[400]},
    form=ImageVariationRequest, files=EDIT_FILES[:1], form_required=("image",), json=ImagesResponse,
    description="`multipart/form-data` with one `image`: an edit of the whole picture with an empty prompt.",
    parameters=(REQUEST_ID, TRACEPARENT), ok_headers=RATELIMIT)


# The body's bound is the edit's own (``max_edit_bytes``), counted as it is read: no server-wide one.
@post("/v1/images/edits", status_code=200, opt=documented(CREATE_IMAGE_EDIT), request_max_body_size=None)
async def image_edits(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    """Images edited from pictures and a prompt (a mask marks what to repaint): as generations answer."""
    return await services.flow.respond(request, services.image_edits)


@post("/v1/images/variations", status_code=200, opt=documented(CREATE_IMAGE_VARIATION), request_max_body_size=None)
async def image_variations(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    """Variations of a picture (an edit with no prompt)."""
    return await services.flow.respond(request, services.image_variations)


@get_and_head("/v1/images/files/{name:str}", opt=documented(GET_IMAGE_FILE, PUBLIC))
async def image_file(name: FromPath[str], services: NamedDependency[Services]) -> Response[bytes]:
    """A generated image, until it expires (its unguessable name is the capability to read it)."""
    data = await services.image_store.get(name) if valid_ref(name) else None
    if data is None:
        raise NotFound(f"The image `{name[:80]}` does not exist or has expired.", param="name",
                       code="image_not_found")
    return Response(data, media_type=media_type(name), headers={"Cache-Control": "private, max-age=300"})
