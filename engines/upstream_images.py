"""Image jobs through the upstream engine: the body it sends to the upstream's
``/images/generations``, and its answer (one JSON body, or an SSE stream of previews and images)
read with bounds into the job's images and usage.

Conduit keeps the images (its own store, its own URLs), so the upstream is always asked for
``b64_json``, never ``url`` (its URLs would point at the upstream and expire on its clock). A client
that streams with ``partial_images`` gets the upstream's stream relayed (each preview as it comes);
any other request is one JSON body whose images are relayed as final ones. Each image is decoded
from base64 and its own header read (:func:`image_header`) for the format and size the job reports:
never the upstream's word. Usage mirrors the diffusers engine's (``prompt_tokens`` only):
the upstream's ``input_tokens`` when it says, else the prompt's characters / 4. No I/O here
(``engines.upstream`` owns the connection).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from engines.backend import JobOutput, JobRejected
from engines.contract.messages import Usage
from engines.image_job import FORMATS, MAX_SEED
from engines.upstream_reads import LineTooLong, Retryable, bounded_lines, error_body, mapped_error
from engines.upstream_relay import CHARS_PER_TOKEN, MAX_REPORTED_TOKENS, StreamBroke

log = logging.getLogger("conduit.engine")

#: The fields of a client's image body the upstream gets: the ones the gateway names and bounds
#: (``gateway.images.protocol.ImageRequest``), less those the engine sets itself (``model``,
#: ``response_format``, ``stream``, ``partial_images``) and ``user`` (an id of Conduit's client,
#: not the upstream's). Nothing else a body carries leaves Conduit.
IMAGE_FIELDS = frozenset({"prompt", "n", "quality", "output_format", "output_compression", "size", "moderation",
                          "background", "style", "negative_prompt", "num_inference_steps", "guidance_scale", "seed"})
#: Pixels assumed for ``size: auto`` or none (the upstream picks; the gateway's own bound is 4096²).
AUTO_PIXELS = 4096 * 4096
#: What an encoded image may take beyond 4 bytes a pixel (headers, metadata, a PNG's worst case).
IMAGE_SLACK_BYTES = 1024 * 1024
#: What a JSON answer may carry besides its images (``created``, ``usage``, other fields).
ENVELOPE_BYTES = 64 * 1024
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def image_request(client: dict[str, Any], model: str) -> dict[str, Any]:
    """The client's image request as the upstream gets it: :data:`IMAGE_FIELDS`, ``model`` the
    upstream's name; streamed (``partial_images``) when the client streams with previews, else
    answered as ``b64_json``."""
    body = {**{k: v for k, v in client.items() if k in IMAGE_FIELDS}, "model": model}
    if client.get("stream") and client.get("partial_images"):
        return {**body, "stream": True, "partial_images": client["partial_images"]}
    return {**body, "response_format": "b64_json"}


def image_bytes(client: dict[str, Any]) -> int:
    """The most one encoded image of the request may take: 4 bytes a pixel of its size (``auto``:
    :data:`AUTO_PIXELS`) and :data:`IMAGE_SLACK_BYTES`."""
    m = _SIZE.fullmatch(str(client.get("size") or ""))
    pixels = int(m[1]) * int(m[2]) if m else AUTO_PIXELS
    return 4 * pixels + IMAGE_SLACK_BYTES


def body_bound(client: dict[str, Any]) -> int:
    """The most of the upstream's JSON answer read: ``n`` images as base64, and :data:`ENVELOPE_BYTES`."""
    return int(client.get("n") or 1) * (image_bytes(client) * 4 // 3 + 4) + ENVELOPE_BYTES


def _prompt_tokens(client: dict[str, Any]) -> int:
    return -(-len(str(client.get("prompt") or "")) // CHARS_PER_TOKEN)


def _seed(value: Any) -> int | None:
    return value if type(value) is int and 0 <= value <= MAX_SEED else None


class ImageRelay:
    """One image job's upstream answer, relayed as its images and ``done``."""

    __slots__ = ("_finals", "_model", "_previews", "_seed", "_usage", "client", "n", "out", "partials", "produced")

    def __init__(self, out: JobOutput, client: dict[str, Any], model: str) -> None:
        self.out = out
        self.client = client
        self.n = int(client.get("n") or 1)
        self.partials = int(client.get("partial_images") or 0) if client.get("stream") else 0
        #: An image reached the job (a failure from here on is a clean error, never a retry).
        self.produced = False
        self._model = model
        self._finals = 0
        #: Previews seen per ``partial_image_index``: the n-th of a number is image n's.
        self._previews: dict[int, int] = {}
        self._seed = _seed(client.get("seed"))
        self._usage: int | None = None

    async def read(self, chunks: AsyncIterator[bytes], content_type: str) -> None:
        """Relay the upstream's 200 answer: an SSE stream, or one JSON body."""
        if content_type.split(";")[0].strip() == "text/event-stream":
            await self._stream(chunks)
        else:
            await self._json(chunks)

    def fail(self, why: str) -> Exception:
        """The upstream's answer is not what was asked: a clean 502 (no retry after output)."""
        if self.produced:
            return StreamBroke(why)
        log.warning("the upstream's image answer is wrong: %s", why)
        return JobRejected(f"The model's upstream server sent {why}.", status=502, code="engine_error",
                           type="server_error")

    async def _json(self, chunks: AsyncIterator[bytes]) -> None:
        limit = body_bound(self.client)
        data = bytearray()
        async for chunk in chunks:
            data += chunk
            if len(data) > limit:
                raise self.fail(f"more than {limit} bytes for {self.n} image(s) of size "
                                f"{self.client.get('size') or 'auto'}")
        try:
            answer = json.loads(data)
            items = answer["data"]
            assert isinstance(items, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise Retryable(JobRejected("The model's upstream server sent an unreadable image answer.", status=502,
                                        code="engine_error", type="server_error")) from None
        if not items:
            raise self.fail("no images")
        if len(items) > self.n:
            raise self.fail(f"{len(items)} images for n={self.n}")
        # Every image checked before the first reaches the job: a bad one fails the job cleanly.
        images = [self._decode(item.get("b64_json") if isinstance(item, dict) else None, i)
                  for i, item in enumerate(items)]
        self._usage = _input_tokens(answer.get("usage"))
        for index, ((data_, fmt, width, height), item) in enumerate(zip(images, items, strict=True)):
            seed = _seed(item.get("seed"))
            await self._emit(data_, fmt, width, height, index, None, seed)
        self._done()

    async def _stream(self, chunks: AsyncIterator[bytes]) -> None:
        kind = ""
        limit = image_bytes(self.client) * 4 // 3 + ENVELOPE_BYTES
        try:
            async for line in bounded_lines(chunks, limit):
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    await self._event(kind, line[5:].strip())
                    if self._finals == self.n:
                        break
                elif not line:
                    kind = ""
        except LineTooLong:
            raise self.fail(f"a stream line over {limit} bytes") from None
        if not self._finals:
            raise StreamBroke("a stream that ended without an image") if self.produced else Retryable(
                JobRejected("The model's upstream server sent a stream that ended without an image.", status=502,
                            code="engine_error", type="server_error"))
        self._done()

    async def _event(self, kind: str, payload: str) -> None:
        try:
            data = json.loads(payload)
            assert isinstance(data, dict)
        except (ValueError, AssertionError):
            raise self.fail("an unreadable stream event") from None
        kind = data.get("type") or kind
        if kind == "error" or "error" in data:
            error = error_body(payload.encode())
            if self.produced:
                log.warning("the upstream sent an error event mid-stream: %s", error.message[:500])
                raise StreamBroke("it sent an error event")
            status = error.code if isinstance(error.code, int) else \
                400 if error.type == "invalid_request_error" else 500
            raise mapped_error(status, payload.encode(), {}, self._model)
        if kind == "image_generation.partial_image":
            number = data.get("partial_image_index")
            if type(number) is not int or not 0 <= number < max(self.partials, 1):
                raise self.fail(f"a preview numbered {number!r} (partial_images={self.partials})")
            index = self._previews.get(number, 0)
            if index >= self.n:
                raise self.fail(f"more previews than partial_images={self.partials} for n={self.n}")
            self._previews[number] = index + 1
            image = self._decode(data.get("b64_json"), index)
            await self._emit(*image, index, number, None)
        elif kind == "image_generation.completed":
            image = self._decode(data.get("b64_json"), self._finals)
            tokens = _input_tokens(data.get("usage"))
            if tokens is not None:
                self._usage = tokens
            await self._emit(*image, self._finals, None, None)
            self._finals += 1

    def _decode(self, text: Any, index: int) -> tuple[bytes, str, int, int]:
        """Image ``index``'s bytes, format, width and height, read from its own header."""
        if not isinstance(text, str):
            raise self.fail(f"image {index} without b64_json")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise self.fail(f"image {index} not base64") from None
        if len(data) > image_bytes(self.client):
            raise self.fail(f"image {index} of {len(data)} bytes, more than its size allows")
        fmt, width, height = image_header(data)
        if fmt not in FORMATS:
            raise self.fail(f"image {index} not a PNG, JPEG or WebP")
        return data, fmt, width, height

    async def _emit(self, data: bytes, fmt: str, width: int, height: int, index: int, partial: int | None,
                    seed: int | None) -> None:
        if not self.produced:
            self.produced = True
            self.out.started()
        if seed is None:  # the upstream did not say: the request's (image i: seed + i), or 0 (not known)
            seed = self._seed + index if self._seed is not None and self._seed + index <= MAX_SEED else 0
        await self.out.image(data, index=index, format=fmt, width=width, height=height, seed=seed, partial=partial)

    def _done(self) -> None:
        tokens = self._usage if self._usage is not None else _prompt_tokens(self.client)
        self.out.done(Usage(prompt_tokens=tokens))


def _input_tokens(usage: Any) -> int | None:
    tokens = usage.get("input_tokens") if isinstance(usage, dict) else None
    if type(tokens) is not int or tokens < 0:
        return None
    if tokens > MAX_REPORTED_TOKENS:  # as chat's (a lie must not lock the key out of its limits)
        log.warning("the upstream reported %d input tokens for an image; counted as %d", tokens, MAX_REPORTED_TOKENS)
    return min(tokens, MAX_REPORTED_TOKENS)


def image_header(data: bytes) -> tuple[str, int, int]:
    """The format (``png``, ``jpeg``, ``webp``; "" for anything else) and size an encoded image's
    header says, read without an imaging library (the upstream kind installs none)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return "png", int.from_bytes(data[16:20]), int.from_bytes(data[20:24])
    if data[:2] == b"\xff\xd8":
        return _jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        chunk = data[12:16]
        if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
            return ("webp", int.from_bytes(data[26:28], "little") & 0x3FFF,
                    int.from_bytes(data[28:30], "little") & 0x3FFF)
        if chunk == b"VP8L" and data[20:21] == b"\x2f":
            bits = int.from_bytes(data[21:25], "little")
            return "webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return "webp", int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return "", 0, 0


#: JPEG's start-of-frame markers (those that carry the image's size).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg(data: bytes) -> tuple[str, int, int]:
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return "", 0, 0
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _SOF:
            return "jpeg", int.from_bytes(data[at + 7:at + 9]), int.from_bytes(data[at + 5:at + 7])
        at += 2 + int.from_bytes(data[at + 2:at + 4])
    return "", 0, 0
