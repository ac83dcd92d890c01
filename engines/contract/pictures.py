"""What an uploaded picture is, read from its first bytes: its format, its size and whether it has
an alpha channel, without decoding it.

An image edit's inputs (``/v1/images/edits``) arrive as files or ``data:`` URLs of any size a
client likes. Decoding one in full costs memory in proportion to its pixels, not its bytes: a
40 KB PNG can hold 50,000 x 50,000 pixels (a decompression bomb, 7.5 GB as RGB). So the gateway
reads each picture's header with :func:`probe` and refuses it (a 400 naming the parameter) while
it is still a few bytes: not PNG, JPEG or WebP, too many pixels, a mask without an alpha channel
or of another size than its image. The engine probes what it is handed again before it decodes,
since a job may reach its stream another way, and checks the decoded picture against the probe.

Part of the sealed contract package (``engines.contract``); imports nothing of the project.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

#: The formats an edit takes, and their media types.
PICTURE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

_PNG = b"\x89PNG\r\n\x1a\n"
#: PNG chunks read before the first IDAT (a tRNS chunk among them gives a palette or a colour key
#: an alpha channel); a header that does not reach IDAT within these is refused.
_PNG_CHUNKS = 64
#: JPEG segments read before the frame header (SOFn).
_JPEG_SEGMENTS = 256
#: JPEG's frame headers: SOF0-3, 5-7, 9-11, 13-15 (not DHT C4, JPG C8, DAC CC).
_FILL = re.compile(rb"\xff+")
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


class Unreadable(ValueError):
    """Not a PNG, JPEG or WebP picture, or one whose header is damaged."""


@dataclass(frozen=True, slots=True)
class Picture:
    """A picture's header: ``format`` one of :data:`PICTURE_TYPES`."""

    format: str
    width: int
    height: int
    #: Whether it holds transparency: an alpha channel, or a PNG's transparent palette or colour key.
    alpha: bool

    @property
    def pixels(self) -> int:
        return self.width * self.height


class Refused(ValueError):
    """A picture an edit may not take: why (``message``), OpenAI's ``code``, the parameter it came as."""

    def __init__(self, message: str, code: str, param: str) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def admitted(data: bytes, param: str, max_pixels: int) -> Picture:
    """The header of picture ``data`` (sent as ``param``), or :class:`Refused`: not PNG, JPEG or WebP
    (``invalid_image_format``), or more than ``max_pixels`` (``image_too_large``). Nothing is decoded."""
    try:
        picture = probe(data)
    except Unreadable as exc:
        raise Refused(f"Invalid '{param}': {exc}. Send a PNG, JPEG or WebP image.", "invalid_image_format",
                      param) from None
    if picture.pixels > max_pixels:
        raise Refused(f"Invalid '{param}': {picture.width}x{picture.height} is more than {max_pixels} pixels.",
                      "image_too_large", param)
    return picture


def check_mask(mask: Picture, first: Picture | None) -> None:
    """:class:`Refused` (``invalid_mask``) for a mask without an alpha channel (its fully transparent
    pixels mark what to edit) or of another size than the first picture (None: not known yet)."""
    if not mask.alpha:
        raise Refused("Invalid 'mask': it has no alpha channel. Its fully transparent pixels mark what to edit.",
                      "invalid_mask", "mask")
    if first is not None and (first.width, first.height) != (mask.width, mask.height):
        raise Refused(f"Invalid 'mask': it is {mask.width}x{mask.height}, the image {first.width}x{first.height}; "
                      "they must be the same size.", "invalid_mask", "mask")


def sniff(data: bytes) -> str | None:
    """The format the bytes start like (``png``, ``jpeg``, ``webp``), or None."""
    if data.startswith(_PNG):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def probe(data: bytes) -> Picture:
    """The header of the PNG, JPEG or WebP picture ``data``; raises :class:`Unreadable`."""
    fmt = sniff(data)
    try:
        if fmt == "png":
            picture = _png(data)
        elif fmt == "jpeg":
            picture = _jpeg(data)
        elif fmt == "webp":
            picture = _webp(data)
        else:
            raise Unreadable("not a PNG, JPEG or WebP image")
    except (struct.error, IndexError):
        raise Unreadable(f"the {fmt.upper()} header is cut short or damaged") from None  # type: ignore[union-attr]
    if picture.width < 1 or picture.height < 1:
        raise Unreadable(f"the {fmt.upper()} header gives an empty size")  # type: ignore[union-attr]
    return picture


def _png(data: bytes) -> Picture:
    length, kind = struct.unpack_from(">I4s", data, 8)
    if kind != b"IHDR" or length != 13:
        raise Unreadable("the PNG does not start with its IHDR header")
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    alpha = colour in (4, 6)
    at = 8 + 8 + length + 4
    for _ in range(_PNG_CHUNKS):
        length, kind = struct.unpack_from(">I4s", data, at)
        if kind == b"IDAT":
            return Picture("png", width, height, alpha)
        if kind == b"tRNS" and depth <= 8:  # (decoders drop a 16-bit colour key: no transparency comes of it)
            alpha = True
        at += 8 + length + 4
        if at > len(data):
            break
    raise Unreadable("the PNG holds no image data where it should")


def _jpeg(data: bytes) -> Picture:
    at = 2
    for _ in range(_JPEG_SEGMENTS):
        at = data.find(b"\xff", at)  # garbage between segments: skipped, as decoders do
        if at < 0:
            break
        at = _FILL.match(data, at).end()  # type: ignore[union-attr]  # fill bytes
        marker = data[at]
        at += 1
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers: no length
            continue
        if marker == 0xD9:
            break
        (length,) = struct.unpack_from(">H", data, at)
        if marker in _SOF:
            height, width = struct.unpack_from(">HH", data, at + 3)
            return Picture("jpeg", width, height, False)
        if length < 2:
            break
        at += length
    raise Unreadable("the JPEG has no frame header")


def _webp(data: bytes) -> Picture:
    kind = data[12:16]
    body = 20
    if kind == b"VP8X":
        if len(data) < body + 10:  # the slices below would read a cut-short size as 1 x 1
            raise Unreadable("the extended WebP header is cut short")
        flags = data[body]
        width = 1 + int.from_bytes(data[body + 4:body + 7], "little")
        height = 1 + int.from_bytes(data[body + 7:body + 10], "little")
        return Picture("webp", width, height, bool(flags & 0x10))
    if kind == b"VP8L":
        if data[body] != 0x2F:
            raise Unreadable("the lossless WebP has a bad signature")
        (bits,) = struct.unpack_from("<I", data, body + 1)
        return Picture("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool((bits >> 28) & 1))
    if kind == b"VP8 ":
        if data[body + 3:body + 6] != b"\x9d\x01\x2a":
            raise Unreadable("the WebP has a bad frame signature")
        width, height = struct.unpack_from("<HH", data, body + 6)
        return Picture("webp", width & 0x3FFF, height & 0x3FFF, False)
    raise Unreadable("the WebP holds no image chunk")
