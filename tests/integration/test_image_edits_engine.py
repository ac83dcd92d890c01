"""Image edits on the diffusers backend and the real tiny Stable Diffusion pipeline: image-to-image and
inpainting in the step loop, against diffusers' own img2img and inpainting pipelines built from the
same components; seeded edits the same alone, batched with generations and joined midway; the
strength's steps; the mask's kept pixels; previews; every refusal before any output; and one edit
through a real Worker, its blob store and Redis.

Images are compared as decoded pixel arrays with ``TOLERANCE`` (see ``test_diffusers_engine``).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engines.backend import JobRejected
from engines.contract.messages import BlobRef, Job, JobOptions, Usage
from engines.diffusers_engine import DiffusersBackend, DiffusersSettings

TOLERANCE = 2
W, H = 96, 64
#: The mask's repainted box: the left half (alpha 0 there).
LEFT = (0, 0, W // 2, H)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def picture(seed: int = 0, size: tuple[int, int] = (W, H)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def mask(size: tuple[int, int] = (W, H), box: tuple[int, int, int, int] = LEFT) -> Image.Image:
    m = Image.new("RGBA", size, (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), box)
    return m


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


class Out:
    """A JobOutput holding an edit's pictures (what the worker reads from the blob store)."""

    def __init__(self, blobs: list[bytes]) -> None:
        self.blobs = blobs
        self.images: list[tuple[bytes, dict[str, Any]]] = []
        self.usage: Usage | None = None

    def started(self) -> None: ...

    async def image(self, data: bytes, **meta: Any) -> None:
        self.images.append((data, meta))

    def done(self, usage: Usage) -> None:
        self.usage = usage

    async def inputs(self) -> list[bytes]:
        return self.blobs

    async def fetch(self, url: str, param: str) -> bytes:
        raise JobRejected(f"no fetching here ({url})", param=param)

    def finals(self) -> list[tuple[bytes, dict[str, Any]]]:
        return sorted((i for i in self.images if i[1]["partial"] is None), key=lambda i: i[1]["index"])


def edit(blobs: list[bytes], job_id: str | None = None, kind: str = "image_edit", **fields: Any) -> Job:
    body = {"prompt": "a red cat", "images": ["input:0"], "num_inference_steps": 10, "seed": 5, **fields}
    return Job(id=job_id or os.urandom(4).hex(), kind=kind, model="tiny-sd", body=json.dumps(body).encode(),
               reply_to="", deadline_ms=int((time.time() + 60) * 1000))


@pytest.fixture
async def backend(tiny_sd_dir: Path) -> AsyncIterator[DiffusersBackend]:
    b = DiffusersBackend(DiffusersSettings(model=str(tiny_sd_dir), served_name="tiny-sd"))
    await b.start()
    b.steps_log = []  # type: ignore[attr-defined]
    b.batcher.on_step = lambda w, h, members: b.steps_log.append((w, h, members))  # type: ignore[attr-defined]
    yield b
    await b.close()


async def run(backend: DiffusersBackend, job: Job, blobs: list[bytes]) -> Out:
    out = Out(blobs)
    await backend.run(job, out)
    return out


async def test_an_edit_engine_announces_edits_and_matches_diffusers_img2img(backend: DiffusersBackend) -> None:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    assert backend.kinds == {"image", "image_edit"}
    src = picture()
    out = await run(backend, edit([png(src)], strength=0.6), [png(src)])
    (data, meta), = out.finals()
    assert (meta["width"], meta["height"], meta["seed"]) == (W, H, 5)
    assert backend.batcher.steps_run == 6  # int(10 x 0.6): the strength's share of the steps
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(backend.pipe)  # the same components, no copy
    ref = await asyncio.to_thread(lambda: img2img("a red cat", image=src, strength=0.6, num_inference_steps=10,
                                                  generator=torch.Generator("cpu").manual_seed(5)).images[0])
    assert np.abs(pixels(data) - pixels(png(ref))).max() <= TOLERANCE
    assert np.abs(pixels(data) - pixels(png(src))).mean() > 10  # it did change


async def test_inpainting_keeps_the_unmasked_pixels_and_repaints_as_diffusers_does(backend: DiffusersBackend) -> None:
    import torch
    from diffusers import StableDiffusionInpaintPipeline

    src, m = picture(1), mask()
    for strength in (1.0, 0.7):
        out = await run(backend, edit([png(src), png(m)], mask="input:1", strength=strength), [png(src), png(m)])
        got, source = pixels(out.finals()[0][0]), pixels(png(src))
        assert np.array_equal(got[:, W // 2:], source[:, W // 2:])  # kept: the input's own pixels
        assert np.abs(got[:, :W // 2] - source[:, :W // 2]).mean() > 10  # repainted
        white = Image.new("L", (W, H), 0)
        white.paste(255, LEFT)  # diffusers' mask: white is repainted
        inpaint = StableDiffusionInpaintPipeline.from_pipe(backend.pipe)
        ref = await asyncio.to_thread(lambda: inpaint(
            "a red cat", image=src, mask_image=white, strength=strength, num_inference_steps=10, height=H, width=W,
            generator=torch.Generator("cpu").manual_seed(5)).images[0])
        assert np.abs(got[:, :W // 2] - pixels(png(ref))[:, :W // 2]).max() <= TOLERANCE, strength


async def test_a_seeded_edit_is_the_same_alone_batched_with_generations_and_joined_midway(
        backend: DiffusersBackend) -> None:
    blobs = [png(picture(2)), png(mask())]
    alone = (await run(backend, edit(blobs, "alone", mask="input:1", strength=0.8), blobs)).finals()[0]
    assert alone[1]["batch"] == 1

    def generation(seed: int, steps: int) -> Job:
        body = {"prompt": "a blue dog", "seed": seed, "num_inference_steps": steps, "size": f"{W}x{H}"}
        return Job(id=f"g{seed}", kind="image", model="tiny-sd", body=json.dumps(body).encode(), reply_to="",
                   deadline_ms=int((time.time() + 60) * 1000))

    outs = await asyncio.gather(run(backend, generation(7, 9), []),
                                run(backend, edit(blobs, "batched", mask="input:1", strength=0.8), blobs),
                                run(backend, edit([blobs[0]], "plain", strength=0.5), [blobs[0]]))
    batched = outs[1].finals()[0]
    assert batched[1]["batch"] == 3
    assert any({"g7", "batched", "plain"} == {j for j, _ in members} for *_, members in backend.steps_log)

    long = asyncio.create_task(run(backend, generation(9, 60), []))
    deadline = time.monotonic() + 20
    while len(backend.steps_log) < len(backend.steps_log) * 0 + 14 or backend.steps_log[-1][2][0][0] != "g9":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)
    joined = (await run(backend, edit(blobs, "joined", mask="input:1", strength=0.8), blobs)).finals()[0]
    await long
    assert joined[1]["joined"] is True and joined[1]["batch"] == 2
    for other in (batched, joined):
        assert np.abs(pixels(alone[0]) - pixels(other[0])).max() <= TOLERANCE
    different = (await run(backend, edit(blobs, "other", mask="input:1", strength=0.8, seed=6), blobs)).finals()[0]
    assert np.abs(pixels(alone[0]) - pixels(different[0])).max() > 10 * TOLERANCE


async def test_several_pictures_are_each_edited_n_times_at_the_first_ones_size(backend: DiffusersBackend) -> None:
    a, b = picture(3), picture(4, (48, 80))
    out = await run(backend, edit([png(a), png(b)], images=["input:0", "input:1"], n=2, strength=0.5),
                    [png(a), png(b)])
    finals = out.finals()
    assert [m["index"] for _, m in finals] == [0, 1, 2, 3]
    assert [m["seed"] for _, m in finals] == [5, 6, 7, 8]
    assert {(m["width"], m["height"]) for _, m in finals} == {(W, H)}
    # Images 0-1 are the first picture's edits (seeds 5, 6), 2-3 the second's, resized (seeds 7, 8).
    b_fitted = png(b.resize((W, H), Image.Resampling.LANCZOS))
    for first, source, seed in ((0, png(a), 5), (2, b_fitted, 7)):
        alone = (await run(backend, edit([source], n=2, strength=0.5, seed=seed), [source])).finals()
        for i in range(2):
            assert np.abs(pixels(finals[first + i][0]) - pixels(alone[i][0])).max() <= TOLERANCE, (first, i)


async def test_size_defaults_to_the_pictures_rounded_to_a_multiple_of_8(backend: DiffusersBackend) -> None:
    src = picture(5, (101, 67))
    out = await run(backend, edit([png(src)], strength=0.3, num_inference_steps=4), [png(src)])
    assert (out.finals()[0][1]["width"], out.finals()[0][1]["height"]) == (104, 64)
    out = await run(backend, edit([png(src)], strength=0.3, num_inference_steps=4, size="64x64"), [png(src)])
    assert (out.finals()[0][1]["width"], out.finals()[0][1]["height"]) == (64, 64)


async def test_edits_stream_previews_over_their_own_steps(backend: DiffusersBackend) -> None:
    blobs = [png(picture(6)), png(mask())]
    out = await run(backend, edit(blobs, mask="input:1", strength=0.5, stream=True, partial_images=2), blobs)
    partial = [m["partial"] for _, m in out.images if m["partial"] is not None]
    assert partial == [0, 1] and out.images[-1][1]["partial"] is None
    source = pixels(blobs[0])
    for data, _ in out.images:  # every preview keeps the unmasked pixels too
        assert np.array_equal(pixels(data)[:, W // 2:], source[:, W // 2:])


def bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (it would take gigabytes decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("blobs, fields, param, code", [
    ([b"GIF89a" + b"\0" * 64], {}, "image", "invalid_image_format"),
    ([png(picture())[:40]], {}, "image", "invalid_image_format"),  # cut inside its header
    ([png(picture())[:200]], {}, "image", "invalid_image"),  # its header whole, its data cut short
    ([bomb(100_000, 100_000)], {}, "image", "image_too_large"),
    ([png(picture()), jpeg(picture())], {"mask": "input:1"}, "mask", "invalid_mask"),  # no alpha
    ([png(picture()), png(mask((64, 64), (0, 0, 8, 8)))], {"mask": "input:1"}, "mask", "invalid_mask"),
    ([png(picture())], {"strength": 0.05}, "strength", None),  # no step of 10
    ([png(picture())], {"strength": 1.5}, "strength", None),
    ([png(picture())], {"images": ["input:3"]}, "image", None),
    ([png(picture())], {"images": []}, "image", None),
    ([png(picture())] * 2, {"images": ["input:0", "input:1"], "n": 9}, "n", None),
    ([png(picture())], {"size": "60x60"}, "size", None),
])
async def test_bad_edits_are_refused_before_any_output(backend: DiffusersBackend, blobs: list[bytes],
                                                       fields: dict[str, Any], param: str, code: str | None) -> None:
    out = Out(blobs)
    with pytest.raises(JobRejected) as refused:
        await backend.run(edit(blobs, **fields), out)
    assert refused.value.status == 400 and refused.value.param == param, refused.value.message
    if code is not None:
        assert refused.value.code == code
    assert out.images == [] and backend.batcher.steps_run == 0


async def test_an_edit_through_a_real_worker_reads_its_pictures_from_the_blob_store(tiny_sd_dir: Path,
                                                                                    redis_server: Any) -> None:
    """The job names its pictures by reference and the worker reads them from the Redis blob store; a job
    whose pictures are gone fails 503 ``input_lost`` before any output (its client may send it again)."""
    import msgspec
    import redis.asyncio as aioredis

    from engines.contract.keys import Keys
    from engines.contract.messages import Done, Failed, ImageReady, Started
    from engines.contract.store import RedisImageStore, new_input_ref
    from tests.integration.test_diffusers_engine import through_a_worker

    keys = Keys(f"edit-{os.urandom(3).hex()}")
    src = png(picture(7))
    ref = new_input_ref("png")
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        await RedisImageStore(r, keys).put(ref, src, 60_000)
    finally:
        await r.aclose()
    results = []
    for job_id, name in (("edit-ok", ref), ("edit-lost", new_input_ref("png"))):
        job = msgspec.structs.replace(edit([], job_id, strength=0.5, num_inference_steps=4),
                                      options=JobOptions(inputs=[BlobRef(name, "image/png", len(src))]))
        results.append(await through_a_worker(tiny_sd_dir, redis_server.url, keys, job))
        keys = Keys(f"{keys.prefix}-2")  # (a reply stream of its own; the lost picture is nowhere)
    ok, lost = results
    assert [type(e) for e in ok] == [Started, ImageReady, Done], ok
    assert (ok[1].width, ok[1].height) == (W, H)
    assert [type(e) for e in lost] == [Failed], lost
    assert (lost[0].status, lost[0].code) == (503, "input_lost")


async def test_sdxl_edits_match_diffusers_sdxl_img2img(tiny_sd_dir: Path, tmp_path: Path) -> None:
    """SDXL's VAE scaling and added conditioning in an edit: the same image as its img2img pipeline."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from tests.integration.test_diffusers_engine import build_tiny_sdxl

    model = await asyncio.to_thread(build_tiny_sdxl, tmp_path / "tiny-sdxl", tiny_sd_dir / "tokenizer")
    backend = DiffusersBackend(DiffusersSettings(model=str(model), served_name="tiny-sd"))
    await backend.start()
    try:
        src = picture(8, (64, 64))
        out = await run(backend, edit([png(src)], strength=0.6, num_inference_steps=5), [png(src)])
        img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(backend.pipe)
        ref = await asyncio.to_thread(lambda: img2img("a red cat", image=src, strength=0.6, num_inference_steps=5, guidance_scale=7.5,
                                                      generator=torch.Generator("cpu").manual_seed(5)).images[0])
    finally:
        await backend.close()
    assert np.abs(pixels(out.finals()[0][0]) - pixels(png(ref))).max() <= TOLERANCE


async def test_request_batching_edits_on_the_pipelines_own_img2img_and_inpainting(tiny_sd_dir: Path,
                                                                                 backend: DiffusersBackend) -> None:
    """Where the step loop does not run (``batching: request``), an edit runs on the pipeline's img2img and
    inpainting variants (``from_pipe``: the same weights): the same images as the step loop's, kept pixels
    kept, previews with the final image."""
    requested = DiffusersBackend(DiffusersSettings(model=str(tiny_sd_dir), served_name="tiny-sd", batching="request"))
    await requested.start()
    try:
        assert requested.kinds == {"image", "image_edit"}
        assert requested.batcher._pipes and all(p.unet is requested.pipe.unet for p in requested.batcher._pipes.values())
        a, b, m = png(picture(11)), png(picture(12)), png(mask())
        fields = {"images": ["input:0", "input:1"], "mask": "input:2", "n": 2, "strength": 0.7, "stream": True,
                  "partial_images": 1}
        got = (await run(requested, edit([a, b, m], **fields), [a, b, m])).finals()
        expected = (await run(backend, edit([a, b, m], **fields), [a, b, m])).finals()
    finally:
        await requested.close()
    assert [meta["seed"] for _, meta in got] == [5, 6, 7, 8]
    for (data, _), (ref, _) in zip(got, expected, strict=True):
        assert np.abs(pixels(data) - pixels(ref)).max() <= TOLERANCE
    assert np.array_equal(pixels(got[0][0])[:, W // 2:], pixels(a)[:, W // 2:])
