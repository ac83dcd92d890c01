"""The picture header reader (``engines.contract.pictures``): :func:`sniff` and :func:`probe` give the
format, size and alpha of PNG, JPEG and WebP pictures PIL writes, in every mode an edit may send,
without decoding them (a decompression bomb probes instantly); anything else, or any header cut
short or damaged, is refused with :class:`Unreadable` and never another exception."""

from __future__ import annotations

import io
import random
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from engines.contract.pictures import PICTURE_TYPES, Picture, Unreadable, probe, sniff

SIZE = (96, 64)  # not square: a swapped width and height shows


def encode(mode: str, fmt: str, size: tuple[int, int] = SIZE, colour: Any = None, **params: Any) -> bytes:
    image = Image.new(mode, size) if colour is None else Image.new(mode, size, colour)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, colour: int = 2, interlace: int = 0, before: bytes = b"") -> bytes:
    """A PNG built by hand: IHDR (8-bit), the chunks ``before``, a one-row IDAT, IEND."""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, interlace))
    return (b"\x89PNG\r\n\x1a\n" + ihdr + before + chunk(b"IDAT", zlib.compress(b"\x00" * 4))
            + chunk(b"IEND", b""))


def riff(kind: bytes, body: bytes) -> bytes:
    payload = b"WEBP" + kind + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


# name -> (encoder, expected alpha)
CASES: dict[str, tuple[Callable[[tuple[int, int]], bytes], bool]] = {
    "png-rgb": (lambda s: encode("RGB", "PNG", s, (10, 200, 30)), False),
    "png-rgba": (lambda s: encode("RGBA", "PNG", s, (10, 200, 30, 128)), True),
    "png-la": (lambda s: encode("LA", "PNG", s, (90, 128)), True),
    "png-l": (lambda s: encode("L", "PNG", s, 90), False),
    "png-1bit": (lambda s: encode("1", "PNG", s, 1), False),
    "png-16bit": (lambda s: encode("I;16", "PNG", s, 40000), False),
    "png-palette": (lambda s: encode("P", "PNG", s, 3), False),
    "png-palette-trns": (lambda s: encode("P", "PNG", s, 3, transparency=3), True),
    "png-l-key": (lambda s: encode("L", "PNG", s, 90, transparency=90), True),
    "png-rgb-key": (lambda s: encode("RGB", "PNG", s, (1, 2, 3), transparency=(1, 2, 3)), True),
    "jpeg-baseline": (lambda s: encode("RGB", "JPEG", s, (10, 200, 30)), False),
    "jpeg-gray": (lambda s: encode("L", "JPEG", s, 90), False),
    "jpeg-progressive": (lambda s: encode("RGB", "JPEG", s, (10, 200, 30), progressive=True), False),
    "jpeg-exif-icc": (lambda s: encode("RGB", "JPEG", s, (9, 9, 9), progressive=True,
                                       exif=b"Exif\x00\x00" + b"\x00" * 64, icc_profile=b"\x00" * 70000),
                      False),
    "webp-lossy": (lambda s: encode("RGB", "WEBP", s, (10, 200, 30)), False),
    "webp-lossless": (lambda s: encode("RGB", "WEBP", s, (10, 200, 30), lossless=True), False),
    "webp-lossless-alpha": (lambda s: encode("RGBA", "WEBP", s, (10, 200, 30, 128), lossless=True), True),
    "webp-lossy-alpha": (lambda s: encode("RGBA", "WEBP", s, (10, 200, 30, 128)), True),
}


@pytest.mark.parametrize("name", CASES)
def test_probe_reads_pil_pictures(name: str) -> None:
    make, alpha = CASES[name]
    data = make(SIZE)
    fmt = name.split("-")[0]
    assert sniff(data) == fmt and fmt in PICTURE_TYPES
    assert probe(data) == Picture(fmt, 96, 64, alpha)
    assert probe(data).pixels == 96 * 64
    assert Image.open(io.BytesIO(data)).has_transparency_data is alpha  # PIL agrees on what was written


def test_the_chunks_and_segments_are_the_ones_meant() -> None:
    """The cases above exercise what they are named for, not what PIL happened to choose."""
    assert b"tRNS" in CASES["png-palette-trns"][0](SIZE) and b"tRNS" in CASES["png-rgb-key"][0](SIZE)
    assert b"tRNS" not in CASES["png-palette"][0](SIZE)
    assert CASES["png-16bit"][0](SIZE)[24] == 16  # IHDR bit depth
    assert b"\xff\xc0" in CASES["jpeg-baseline"][0](SIZE)
    exif_icc = CASES["jpeg-exif-icc"][0](SIZE)
    assert b"\xff\xc2" in exif_icc  # SOF2, after the APP1 (EXIF) and two APP2 (ICC) segments
    assert exif_icc.index(b"\xff\xe1") < exif_icc.index(b"\xff\xe2") < exif_icc.index(b"\xff\xc2")
    assert exif_icc.count(b"ICC_PROFILE") == 2
    webp = {name: CASES[name][0](SIZE)[12:16] for name in CASES if name.startswith("webp")}
    assert webp == {"webp-lossy": b"VP8 ", "webp-lossless": b"VP8L", "webp-lossless-alpha": b"VP8L",
                    "webp-lossy-alpha": b"VP8X"}


def test_interlaced_png() -> None:
    data = png(96, 64, colour=6, interlace=1)
    assert Image.open(io.BytesIO(data)).size == (96, 64)
    assert probe(data) == Picture("png", 96, 64, True)


def test_png_key_chunks_among_others_before_idat() -> None:
    text = chunk(b"tEXt", b"Comment\x00hello") + chunk(b"gAMA", struct.pack(">I", 45455))
    assert probe(png(5, 7, before=text)) == Picture("png", 5, 7, False)
    palette = chunk(b"PLTE", b"\x00" * 6)
    assert probe(png(5, 7, colour=3, before=palette + text + chunk(b"tRNS", b"\x00"))).alpha is True


def test_animated_webp() -> None:
    frames = [Image.new("RGBA", SIZE, (255, 0, 0, 100)), Image.new("RGBA", SIZE, (0, 0, 255, 100))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=50)
    data = buffer.getvalue()
    assert data[12:16] == b"VP8X" and data[20] & 0x02  # the animation flag
    assert probe(data) == Picture("webp", 96, 64, True)


def test_jpeg_fill_bytes_and_garbage_between_segments() -> None:
    data = CASES["jpeg-baseline"][0](SIZE)
    sof = data.index(b"\xff\xc0")
    assert probe(data[:sof] + b"\xff\xff\xff" + data[sof:]) == Picture("jpeg", 96, 64, False)
    assert probe(data[:sof] + b"junk" + data[sof:]) == Picture("jpeg", 96, 64, False)
    assert probe(data[:2] + b"\xff\xd0\xff\x01" + data[2:]) == Picture("jpeg", 96, 64, False)  # standalone


def test_decompression_bomb_is_sized_not_decoded() -> None:
    data = png(100_000, 100_000)
    assert len(data) < 100
    started = time.perf_counter()
    picture = probe(data)
    assert time.perf_counter() - started < 0.05
    assert picture == Picture("png", 100_000, 100_000, False) and picture.pixels == 10**10


def test_sniff() -> None:
    assert sniff(b"\x89PNG\r\n\x1a\n") == "png"
    assert sniff(b"\xff\xd8\xff") == "jpeg"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBP") == "webp"
    for data in (b"", b"\x89PNG\r\n\x1a", b"\xff\xd8", b"RIFF\x00\x00\x00\x00WEB", b"RIFF\x00\x00\x00\x00WAVE",
                 b"GIF89a", b"BM", b"<svg"):
        assert sniff(data) is None


@pytest.mark.parametrize("data", [
    b"", b"\x00", random.Random(0).randbytes(4096), encode("RGB", "GIF"), encode("RGB", "BMP"), encode("RGB", "TIFF"),
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
], ids=["empty", "zero", "random", "gif", "bmp", "tiff", "png-magic", "jpeg-magic", "webp-magic", "svg"])
def test_refuses_what_is_not_a_picture(data: bytes) -> None:
    with pytest.raises(Unreadable):
        probe(data)


def test_refuses_damaged_headers() -> None:
    refused = {
        "png first chunk not IHDR": b"\x89PNG\r\n\x1a\n" + chunk(b"gAMA", b"\x00" * 4) + png(5, 5)[8:],
        "png IHDR of a wrong length": b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", b"\x00" * 17) + png(5, 5)[33:],
        "png zero width": png(0, 64),
        "png zero height": png(96, 0),
        "png no IDAT": png(5, 5).replace(b"IDAT", b"iDAT"),
        "png chunk running past the end": png(5, 5, before=struct.pack(">I", 2**31) + b"tEXt"),
        "png chunks without end": png(5, 5, before=chunk(b"tEXt", b"x") * 70),
        "jpeg without SOF before EOI": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 9 + b"\xff\xd9",
        "jpeg SOI EOI": b"\xff\xd8\xff\xd9",
        "jpeg segment length under 2": b"\xff\xd8\xff\xe0\x00\x01\xff\xc0",
        "jpeg zero height": b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x60" + b"\x00" * 20,
        "webp unknown chunk": riff(b"ABCD", b"\x00" * 32),
        "webp VP8L bad signature": riff(b"VP8L", b"\x2e" + b"\x00" * 16),
        "webp VP8 bad start code": riff(b"VP8 ", b"\x00" * 3 + b"\x9d\x01\x2b" + b"\x10\x00" * 8),
        "webp VP8 zero width": riff(b"VP8 ", b"\x00" * 3 + b"\x9d\x01\x2a" + b"\x00\xc0\x40\x00" + b"\x00" * 8),
    }
    for why, data in refused.items():
        with pytest.raises(Unreadable):
            probe(data)
            pytest.fail(why)


def header_length(data: bytes) -> int:
    """How many bytes a picture's header takes: probe needs all of them, and no more."""
    if data.startswith(b"\x89PNG"):
        return data.index(b"IDAT") + 4
    if data.startswith(b"\xff\xd8"):
        at = 2
        while data[at + 1] not in (0xC0, 0xC2):  # walk the segments to the frame header
            at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
        return at + 2 + 7  # marker, length, precision, height, width
    return 20 + {b"VP8X": 10, b"VP8L": 5, b"VP8 ": 10}[data[12:16]]


@pytest.mark.parametrize("name", CASES)
def test_every_cut_short_header_is_refused(name: str) -> None:
    data = CASES[name][0](SIZE)
    full, needed = probe(data), header_length(data)
    assert needed < len(data)
    for length in range(len(data) if len(data) < 2048 else needed + 64):
        if length < needed:
            with pytest.raises(Unreadable):
                probe(data[:length])
        else:
            assert probe(data[:length]) == full


def test_cut_short_hand_built_headers() -> None:
    for data in (png(100_000, 100_000), png(3, 4, colour=3, before=chunk(b"PLTE", b"\x00" * 3)
                                            + chunk(b"tRNS", b"\x00"))):
        full, needed = probe(data), header_length(data)
        for length in range(len(data) + 1):
            if length < needed:
                with pytest.raises(Unreadable):
                    probe(data[:length])
            else:
                assert probe(data[:length]) == full


def test_damaged_bytes_raise_only_unreadable() -> None:
    """Bytes flipped at random in each header give a picture or Unreadable, never another error."""
    rng = random.Random(7)
    for make, _alpha in CASES.values():
        data = make((7, 5))
        needed = header_length(data)
        for _ in range(60):
            damaged = bytearray(data[:needed + 16])
            for _ in range(rng.randint(1, 4)):
                damaged[rng.randrange(3, needed)] = rng.randrange(256)
            try:
                probe(bytes(damaged))
            except Unreadable:
                pass


@pytest.mark.parametrize("name", CASES)
def test_random_sizes_agree_with_pil(name: str) -> None:
    make, alpha = CASES[name]
    rng = random.Random(name)
    fmt = name.split("-")[0]
    for _ in range(50):
        size = (rng.randint(1, 300), rng.randint(1, 300))
        data = make(size)
        opened = Image.open(io.BytesIO(data))
        assert opened.size == size
        assert probe(data) == Picture(fmt, *size, alpha)
        assert opened.has_transparency_data is alpha


def test_a_16_bit_colour_key_is_no_alpha() -> None:
    """PIL (as most decoders) drops a 16-bit picture's ``tRNS`` colour key: a mask made so would repaint
    nothing, so it is no alpha channel; an 8-bit one is."""
    key = chunk(b"tRNS", struct.pack(">H", 0))
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    for depth, alpha in ((16, False), (8, True)):
        ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, depth, 0, 0, 0, 0))
        assert probe(b"\x89PNG\r\n\x1a\n" + ihdr + key + idat).alpha is alpha, depth


def test_junk_before_a_jpeg_frame_is_skipped_at_c_speed() -> None:
    """64 MiB of junk (or of fill bytes) after the start marker: refused, or read past, without a byte-by-byte
    Python loop (one took 2 s of the gateway's event loop per request)."""
    jpeg = encode("RGB", "JPEG")
    first = 4 + struct.unpack(">H", jpeg[4:6])[0]  # the end of its first segment (APP0)
    assert probe(jpeg[:first] + bytes(64 << 20) + jpeg[first:]).width == SIZE[0]
    for junk in (bytes(64 << 20), b"\xff" * (64 << 20)):
        with pytest.raises(Unreadable):
            probe(jpeg[:first] + junk)
