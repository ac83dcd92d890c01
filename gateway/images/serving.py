"""Runs image jobs and answers them: ``url`` or ``b64_json`` collected, or streamed as SSE.

The engine stores every image once (``engines.contract.store``) and its events carry references, so
the reply stream never carries megabytes. A ``b64_json`` answer reads its images, encodes
them and deletes them (nobody will ask again); a ``url`` answer leaves them to expire after
``image_url_ttl_s`` and points at ``/v1/images/files/{ref}``, which any gateway replica can
serve. Streamed answers (always base64, as OpenAI's are) send each partial preview as it is
made and the final images once the job is done, with the request's usage.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream
from msgspec import UNSET

from engines.contract.store import ImageStore
from engines.contract.messages import Done, Failed, ImageReady, Started, Usage
from gateway.dispatch import ClientDisconnected, Dispatcher, JobRun, Restarted, engine_failure, new_id
from gateway.errors import ConduitError, EngineError, encode_error, from_exception
from gateway.images.protocol import (
    RESPONSE_QUALITIES,
    RESPONSE_SIZES,
    CompletedImageEvent,
    ImageObject,
    ImageRequest,
    ImagesResponse,
    PartialImageEvent,
    images_usage,
)
from gateway.serving import SSE_HEADERS, failed_mid_stream, tenancy
from gateway.settings import GatewaySettings
from gateway.tenancy.cost import estimate

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
    """``POST /v1/images/generations``: one request's image job, from submission to its answer."""

    def __init__(self, dispatcher: Dispatcher, store: ImageStore, settings: GatewaySettings) -> None:
        self.dispatcher = dispatcher
        self.store = store
        self.settings = settings
        self._enc = msgspec.json.Encoder()

    async def respond(self, request: Request[Any, Any, Any], req: ImageRequest, body: bytes) -> Response[Any]:
        principal, ratelimit = tenancy(request)
        run = self.dispatcher.job("image", req.model, body, job_id=new_id("img"), stream=bool(req.stream),
                                  receive=request.receive, traceparent=request.scope["state"].get("traceparent", ""),
                                  output_ttl_ms=int(self.settings.image_url_ttl_s * 1000), principal=principal,
                                  cost=estimate(req, self.settings), ratelimit=ratelimit, state=request.scope["state"])
        try:
            if req.stream:
                return await self._stream(run, req)
            return await self._collect(run, req, self._base_url(request))
        except ClientDisconnected:
            return Response(content=b"", status_code=499)

    def _base_url(self, request: Request[Any, Any, Any]) -> str:
        return self.settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")

    # ---- collected -----------------------------------------------------------------------

    async def _collect(self, run: JobRun, req: ImageRequest, base_url: str) -> Response[Any]:
        shape = _Shape(req)
        async with run:
            created, images, usage = await self._finals(run)
        for image in images:
            shape.seen(image)
        refs = [image.ref for image in images]
        b64 = (req.response_format or self.settings.image_response_format) == "b64_json"
        if b64:
            blobs = await self.store.get_many(refs)
            if any(blob is None for blob in blobs):
                raise EngineError("The generated images expired before they could be sent; retry the request.",
                                  code="output_lost")
            data = [ImageObject(b64_json=base64.b64encode(blob).decode(), seed=image.seed)  # type: ignore[arg-type]
                    for image, blob in zip(images, blobs, strict=True)]
        else:
            data = [ImageObject(url=f"{base_url}/v1/images/files/{image.ref}", seed=image.seed) for image in images]
        run.usage = usage
        body = ImagesResponse(
            created=created, data=data, background="opaque", output_format=shape.output_format,
            size=shape.size if shape.size in RESPONSE_SIZES else UNSET,
            quality=shape.quality if shape.quality in RESPONSE_QUALITIES else UNSET,
            usage=images_usage(usage.prompt_tokens))
        return Response(content=self._enc.encode(body), media_type="application/json",
                        background=BackgroundTask(self._delete, refs) if b64 else None)

    async def _finals(self, run: JobRun) -> tuple[int, list[ImageReady], Usage]:
        """The job's final images in request order, once it is done."""
        created = int(time.time())
        finals: dict[int, ImageReady] = {}
        while True:
            event = await run.next()
            if isinstance(event, ImageReady):
                if event.partial is None:
                    finals[event.index] = event
            elif isinstance(event, Done):
                run.usage = event.usage  # known when the run ends (its limits are settled with it)
                return created, [finals[i] for i in sorted(finals)], event.usage
            elif isinstance(event, Failed):
                raise engine_failure(event)
            elif isinstance(event, Started):
                created = event.created or created
            elif isinstance(event, Restarted):
                finals.clear()  # another attempt makes them again

    async def _delete(self, used: list[str]) -> None:
        # A coroutine on purpose: Litestar runs a plain function's background task in a thread.
        with contextlib.suppress(Exception):  # they expire anyway
            await self.store.delete(used)

    # ---- streamed ------------------------------------------------------------------------

    async def _stream(self, run: JobRun, req: ImageRequest) -> Response[Any]:
        # Wait for the engine to accept before committing to 200: a refused job keeps its status.
        first = await run.first_event()
        return Stream(self._sse(run, req, first), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _sse(self, run: JobRun, req: ImageRequest, first: Any) -> AsyncIterator[bytes]:
        shape = _Shape(req)
        finals: dict[int, ImageReady] = {}
        pending: list[Any] = [first]
        try:
            batches = run.batches()
            while True:
                for event in pending:
                    if isinstance(event, ImageReady):
                        shape.seen(event)
                        if event.partial is None:
                            finals[event.index] = event
                            continue
                        chunk = await self._partial(event, shape)
                        if chunk:
                            run.shown = True  # from now on the job can only end, never start over
                            yield chunk
                    elif isinstance(event, Done):
                        run.usage = event.usage
                        yield await self._completed([finals[i] for i in sorted(finals)], shape, event.usage)
                        return
                    elif isinstance(event, Failed):
                        run.error = event.code
                        yield _error_event(engine_failure(event))
                        return
                    elif isinstance(event, Restarted):
                        finals.clear()  # nothing was shown yet: another attempt makes them again
                try:
                    pending = await anext(batches)
                except ConduitError as exc:  # deadline passed, or the job was lost, mid-stream
                    failed_mid_stream(run, exc)
                    yield _error_event(exc)
                    return
        finally:
            run.close()

    async def _partial(self, image: ImageReady, shape: _Shape) -> bytes:
        blob = await self.store.get(image.ref)
        with contextlib.suppress(Exception):
            await self.store.delete([image.ref])
        if blob is None:
            return b""  # a preview that expired is simply not shown
        event = PartialImageEvent(
            b64_json=base64.b64encode(blob).decode(), created_at=int(time.time()), size=shape.event_size(),
            quality=shape.event_quality(), background="opaque", output_format=shape.output_format,
            partial_image_index=image.partial or 0)
        return b"event: image_generation.partial_image\ndata: " + self._enc.encode(event) + b"\n\n"

    async def _completed(self, images: list[ImageReady], shape: _Shape, usage: Usage) -> bytes:
        refs = [image.ref for image in images]
        blobs = await self.store.get_many(refs)
        with contextlib.suppress(Exception):
            await self.store.delete(refs)
        if any(blob is None for blob in blobs):
            return _error_event(EngineError("The generated images expired before they could be sent; retry the "
                                            "request.", code="output_lost"))
        out = bytearray()
        created = int(time.time())
        for blob in blobs:
            event = CompletedImageEvent(
                b64_json=base64.b64encode(blob).decode(), created_at=created,  # type: ignore[arg-type]
                size=shape.event_size(), quality=shape.event_quality(), background="opaque",
                output_format=shape.output_format, usage=images_usage(usage.prompt_tokens))
            out += b"event: image_generation.completed\ndata: " + self._enc.encode(event) + b"\n\n"
        return bytes(out)


def _error_event(exc: ConduitError | Exception) -> bytes:
    return b"event: error\ndata: " + encode_error(from_exception(exc)) + b"\n\n"
