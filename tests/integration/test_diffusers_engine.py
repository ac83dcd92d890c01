"""The diffusers backend on the real tiny Stable Diffusion pipeline: step-level continuous
batching (same image alone, batched or joined midway; sizes never mixed; pixel budget;
cancellation), outputs, validation, the request-level fallback, and one job through a real
Worker and Redis.

Images are compared as decoded pixel arrays (uint8). Batching changes the shapes the CPU
kernels (oneDNN/MKL GEMMs, convolutions) see, and with them the order of float additions, so
the same seed may differ in the last float bits when batched; after the VAE and the rounding
to uint8, that is at most 1 level in a few pixels. ``TOLERANCE`` allows that and nothing
more: a different seed or a wrong step differs by tens of levels (asserted below too).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engines.backend import JobRejected
from engines.diffusers_engine import DiffusersBackend, DiffusersSettings
from engines.tiny import build_tiny_sd
from engines.contract.keys import Keys
from engines.contract.messages import Failed, Job, Usage

#: Largest per-pixel difference (uint8 levels) allowed between the same seed's images
#: computed in different batches (see the module docstring).
TOLERANCE = 2


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Stable Diffusion pipeline, built once per session."""
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """64x64 images need no parallel kernels; with two OpenMP threads on a 2-core machine that
    other processes also load, spinning threads slow every kernel tenfold or more."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Collect:
    """A JobOutput that keeps everything a job writes."""

    def __init__(self) -> None:
        self.started_calls = 0
        self.images: list[tuple[bytes, dict[str, Any]]] = []
        self.usage: Usage | None = None

    def started(self) -> None:
        self.started_calls += 1

    def delta(self, *_: object) -> None:
        raise AssertionError("an image job writes no deltas")

    async def image(self, data: bytes, **meta: Any) -> None:
        assert self.usage is None
        self.images.append((data, meta))

    def done(self, usage: Usage) -> None:
        self.usage = usage

    def finals(self) -> list[tuple[bytes, dict[str, Any]]]:
        return sorted((i for i in self.images if i[1]["partial"] is None), key=lambda i: i[1]["index"])

    def final(self) -> tuple[bytes, dict[str, Any]]:
        (only,) = self.finals()
        return only


def job(body: dict[str, Any], *, id: str | None = None, deadline_s: float = 60) -> Job:
    return Job(id=id or os.urandom(4).hex(), kind="image", model="tiny-sd", body=json.dumps(body).encode(),
               reply_to="", deadline_ms=int((time.time() + deadline_s) * 1000))


def body(seed: int = 1, steps: int = 4, size: str = "64x64", **extra: Any) -> dict[str, Any]:
    return {"prompt": "a red cat on a mat", "seed": seed, "num_inference_steps": steps, "size": size, **extra}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


async def start(model: Path, **settings: Any) -> DiffusersBackend:
    backend = DiffusersBackend(DiffusersSettings(model=str(model), served_name="tiny-sd", **settings))
    await backend.start()
    return backend


@pytest.fixture
async def backend(tiny_sd: Path) -> AsyncIterator[DiffusersBackend]:
    b = await start(tiny_sd)
    b.steps_log = []  # type: ignore[attr-defined]
    b.batcher.on_step = lambda w, h, members: b.steps_log.append((w, h, members))  # type: ignore[attr-defined]
    yield b
    await b.close()


async def run(backend: DiffusersBackend, j: Job) -> Collect:
    out = Collect()
    await backend.run(j, out)
    return out


async def wait_for(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


async def test_a_seeded_image_is_the_same_alone_batched_and_joined_midway(backend: DiffusersBackend) -> None:
    alone = await run(backend, job(body(seed=42, steps=6), id="alone"))
    data, meta = alone.final()
    assert (meta["seed"], meta["batch"], meta["joined"]) == (42, 1, False)

    # The same as diffusers' own pipeline call with the same seed.
    import torch

    reference = await asyncio.to_thread(lambda: backend.pipe(
        "a red cat on a mat", num_inference_steps=6, height=64, width=64, guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(42)).images[0])
    buf = io.BytesIO()
    reference.save(buf, format="PNG")
    diffs = {"pipeline": max_diff(data, buf.getvalue())}

    batched = await asyncio.gather(*(run(backend, job(body(seed=s, steps=6 if s == 42 else 9), id=f"b{s}"))
                                     for s in (7, 42, 8)))
    b_data, b_meta = batched[1].final()
    assert b_meta["batch"] > 1
    diffs["batched"] = max_diff(data, b_data)

    long = asyncio.create_task(run(backend, job(body(seed=5, steps=60), id="long")))
    await wait_for(lambda: any(m[0][0] == "long" for *_, m in backend.steps_log[-1:]) and len(backend.steps_log) > 3)
    joined = await run(backend, job(body(seed=42, steps=6), id="joined"))
    await long
    j_data, j_meta = joined.final()
    assert j_meta["joined"] is True and j_meta["batch"] == 2, j_meta
    assert long.result().final()[1]["joined"] is False
    diffs["joined"] = max_diff(data, j_data)
    print("max abs pixel difference vs alone:", diffs)
    assert max(diffs.values()) <= TOLERANCE, diffs
    assert max_diff(data, alone.finals()[0][0]) == 0
    # A different seed is far outside the tolerance: the comparison can fail.
    assert max_diff(data, batched[0].final()[0]) > 10 * TOLERANCE


async def test_sizes_never_share_a_step_and_take_turns(backend: DiffusersBackend) -> None:
    sizes = {"wide": "128x64", "tall": "64x128", "square": "64x64"}
    outs = await asyncio.gather(*(run(backend, job(body(seed=i, steps=8, size=size, n=2), id=name))
                                  for i, (name, size) in enumerate(sizes.items())))
    for out, size in zip(outs, sizes.values()):
        for data, meta in out.finals():
            assert f"{meta['width']}x{meta['height']}" == size == "x".join(map(str, Image.open(io.BytesIO(data)).size))
    log = backend.steps_log  # type: ignore[attr-defined]
    for w, h, members in log:
        assert {sizes[job_id] for job_id, _ in members} == {f"{w}x{h}"}, (w, h, members)
    # Round robin: while two sizes are both running, neither takes two steps in a row.
    span = {s: [i for i, (w, h, _) in enumerate(log) if f"{w}x{h}" == s] for s in sizes.values()}
    for a in span.values():
        for b in span.values():
            if a is b:
                continue
            lo, hi = max(a[0], b[0]), min(a[-1], b[-1])
            both = [i for i in range(lo, hi + 1) if i in a or i in b]
            for i, k in zip(both, both[1:]):
                assert not (i in a and k in a), f"size took steps {i} and {k} in a row: {log}"
    assert len(log) == 3 * 8  # each group (2 images) fits the budget: one step per group per step


async def test_the_pixel_budget_caps_images_per_step(tiny_sd: Path) -> None:
    backend = await start(tiny_sd, max_batch_pixels=2 * 64 * 64)
    steps: list[int] = []
    backend.batcher.on_step = lambda w, h, members: steps.append(len(members))
    try:
        out = await run(backend, job(body(seed=3, steps=3, n=5)))
    finally:
        await backend.close()
    assert max(steps) == 2 and sum(steps) == 5 * 3, steps
    assert [m["batch"] for _, m in out.finals()] == [2, 2, 2, 2, 1]
    assert len({d for d, _ in out.finals()}) == 5


async def test_a_cancelled_jobs_images_get_no_more_steps(backend: DiffusersBackend) -> None:
    counts: dict[str, int] = {}
    backend.batcher.on_step = lambda w, h, members: [counts.__setitem__(j, counts.get(j, 0) + 1) for j, _ in members]
    task = asyncio.create_task(run(backend, job(body(seed=1, steps=150), id="leaver")))
    await wait_for(lambda: counts.get("leaver", 0) >= 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    at_cancel = counts["leaver"]
    # Another job runs to the end: the loop has gone on well past the cancellation.
    await run(backend, job(body(seed=2, steps=6), id="stayer"))
    assert counts["stayer"] == 6
    assert counts["leaver"] <= at_cancel + 1 < 150, counts  # at most the step already under way


async def test_n_images_have_consecutive_seeds_and_differ(backend: DiffusersBackend) -> None:
    out = await run(backend, job(body(seed=100, steps=4, n=3)))
    finals = out.finals()
    assert [m["seed"] for _, m in finals] == [100, 101, 102]
    assert [m["index"] for _, m in finals] == [0, 1, 2]
    assert min(max_diff(a, b) for i, (a, _) in enumerate(finals) for b, _ in finals[i + 1:]) > 10 * TOLERANCE
    assert out.started_calls == 1 and out.usage is not None and out.usage.prompt_tokens > 2
    # Without a seed, each image gets its own random one.
    random = (await run(backend, job({"prompt": "x", "n": 2, "num_inference_steps": 2}))).finals()
    assert len({m["seed"] for _, m in random}) == 2


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_output_formats_decode_to_the_requested_size(backend: DiffusersBackend, fmt: str) -> None:
    out = await run(backend, job(body(steps=2, size="64x128", output_format=fmt, output_compression=80)))
    data, meta = out.final()
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == ({"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt], (64, 128))
    assert (meta["format"], meta["width"], meta["height"]) == (fmt, 64, 128)


@pytest.mark.parametrize("batching", ["step", "request"])
async def test_partial_images_come_before_the_final(tiny_sd: Path, batching: str) -> None:
    backend = await start(tiny_sd, batching=batching)
    try:
        streamed = await run(backend, job(body(steps=6, n=2, stream=True, partial_images=3)))
        collected = await run(backend, job(body(steps=6, partial_images=3)))  # not streaming: no previews
    finally:
        await backend.close()
    for index in (0, 1):
        order = [m["partial"] for _, m in streamed.images if m["index"] == index]
        assert order == [0, 1, 2, None], order
    assert all(Image.open(io.BytesIO(d)).size == (64, 64) for d, _ in streamed.images)
    assert [m["partial"] for _, m in collected.images] == [None]


@pytest.mark.parametrize(("change", "param"), [
    ({"size": "32x32"}, "size"), ({"size": "4096x64"}, "size"), ({"size": "100x64"}, "size"),
    ({"size": "big"}, "size"), ({"num_inference_steps": 151}, "num_inference_steps"),
    ({"num_inference_steps": 0}, "num_inference_steps"), ({"background": "transparent"}, "background"),
    ({"guidance_scale": 51}, "guidance_scale"), ({"n": 11}, "n"), ({"n": 0}, "n"),
    ({"output_format": "gif"}, "output_format"), ({"quality": "ultra"}, "quality"),
    ({"partial_images": 4}, "partial_images"), ({"seed": -1}, "seed"), ({"prompt": ""}, "prompt"),
])
async def test_bad_parameters_are_rejected_before_any_output(backend: DiffusersBackend, change: dict[str, Any],
                                                            param: str) -> None:
    out = Collect()
    with pytest.raises(JobRejected) as info:
        await backend.run(job({**body(), **change}), out)
    assert (info.value.status, info.value.param, info.value.type) == (400, param, "invalid_request_error")
    assert out.started_calls == 0 and not out.images


async def test_a_job_whose_deadline_passes_fails_with_504(backend: DiffusersBackend) -> None:
    for deadline_s in (-1, 0.05):  # passed before it started; passing while it denoises (150 steps)
        with pytest.raises(JobRejected) as info:
            await run(backend, job(body(steps=150), deadline_s=deadline_s))
        assert (info.value.status, info.value.code, info.value.type) == (504, "deadline_exceeded", "timeout_error")
    assert (await run(backend, job(body(steps=2)))).final()  # the loop carries on


async def test_a_failing_step_fails_only_its_jobs(backend: DiffusersBackend) -> None:
    """A UNet call that raises (here for 128-pixel-wide inputs) fails the jobs in that step only."""
    unet = backend.pipe.unet
    forward = unet.forward

    def failing(sample: Any, *args: Any, **kwargs: Any) -> Any:
        if sample.shape[-1] == 128 // 8:
            raise RuntimeError("injected fault")
        return forward(sample, *args, **kwargs)

    unet.forward = failing
    try:
        bad, good = await asyncio.gather(run(backend, job(body(steps=4, size="128x64"))),
                                         run(backend, job(body(steps=4))), return_exceptions=True)
    finally:
        unet.forward = forward
    assert isinstance(bad, RuntimeError) and "injected fault" in str(bad)
    assert isinstance(good, Collect) and good.final()


async def test_request_level_batching_runs_same_shaped_jobs_together(tiny_sd: Path, backend: DiffusersBackend) -> None:
    step_image = (await run(backend, job(body(seed=42, steps=6)))).final()[0]
    fallback = await start(tiny_sd, batching="request", batch_window_ms=50)
    try:
        outs = await asyncio.gather(*(run(fallback, job(body(seed=s, steps=6))) for s in (42, 43)),
                                    run(fallback, job(body(seed=44, steps=6, size="64x128"))))
    finally:
        await fallback.close()
    (d42, m42), (d43, m43), (d44, m44) = (o.final() for o in outs)
    assert (m42["batch"], m43["batch"], m44["batch"]) == (2, 2, 1)  # same shape together; another size alone
    assert (m42["seed"], m42["joined"]) == (42, False)
    assert Image.open(io.BytesIO(d44)).size == (64, 128)
    assert max_diff(d42, step_image) <= TOLERANCE  # the same seed, the same image, either way
    assert max_diff(d42, d43) > 10 * TOLERANCE


async def through_a_worker(tiny_sd: Path, redis_url: str, keys: Keys, j: Job,
                           watch: Callable[[list[Any]], Awaitable[None]] | None = None, **settings: Any) -> list[Any]:
    """Run ``j`` on a real Worker (the diffusers backend with ``settings``) and Redis at ``redis_url``,
    under ``keys``; its events as read from its reply stream, each batch read also given to ``watch``."""
    import redis.asyncio as aioredis

    from engines.contract.messages import Codec, Done
    from engines.worker import Worker, WorkerSettings

    worker = Worker(DiffusersBackend(DiffusersSettings(model=str(tiny_sd), served_name="tiny-sd", **settings)),
                    WorkerSettings(redis_url=redis_url, key_prefix=keys.prefix))
    serving = asyncio.create_task(worker.run())
    r = aioredis.Redis.from_url(redis_url)
    codec = Codec()
    try:
        j.reply_to = keys.replies("gw-test")
        await r.xadd(j.reply_to, {b"h": b"1"})  # a gateway's reply stream exists while it lives
        await r.xadd(keys.jobs("tiny-sd"), {b"j": codec.encode(j)})
        events: list[Any] = []
        last = b"0"
        deadline = time.monotonic() + 60
        while not events or not isinstance(events[-1], Done | Failed):
            assert time.monotonic() < deadline and not serving.done(), events
            for _, entries in await r.xread({j.reply_to: last}, block=200) or []:
                for entry_id, fields in entries:
                    last = entry_id
                    if b"e" in fields:
                        got = codec.decode_events(fields[b"e"])[0]
                        events += got
                        if watch is not None:
                            await watch(got)
        return events
    finally:
        worker.stop()
        await serving
        await r.aclose()


async def test_an_image_job_through_a_real_worker_and_redis(tiny_sd: Path, redis_server: Any) -> None:
    """Started, ImageReady (its bytes in the Redis image store), Done, on the job's reply stream."""
    import redis.asyncio as aioredis

    from engines.contract.store import RedisImageStore
    from engines.contract.messages import Done, ImageReady, Started

    keys = Keys(f"img-{os.urandom(3).hex()}")
    events = await through_a_worker(tiny_sd, redis_server.url, keys,
                                    job(body(seed=9, steps=3, output_format="webp"), id="img-job"))
    assert [type(e) for e in events] == [Started, ImageReady, Done], events
    ready = events[1]
    assert (ready.index, ready.seed, ready.format, ready.width, ready.height, ready.partial) == \
           (0, 9, "webp", 64, 64, None)
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        data = await RedisImageStore(r, keys).get(ready.ref)
    finally:
        await r.aclose()
    assert data is not None and Image.open(io.BytesIO(data)).format == "WEBP"
    assert events[2].usage.prompt_tokens > 0


async def test_a_streamed_image_job_without_previews_is_not_marked_as_shown(tiny_sd: Path, redis_server: Any) -> None:
    """A streamed job with ``partial_images`` 0 sends its client nothing before it ends (its final
    images go out with its ``Done``), so its job key must not say its output began once its first
    image is ready: an engine that dies before the last one leaves a job another engine runs again,
    not one it fails with ``engine_lost`` (an error where a retry was owed)."""
    import redis.asyncio as aioredis

    from engines.contract.messages import Done, ImageReady, Started

    keys = Keys(f"img-{os.urandom(3).hex()}")
    j = job(body(seed=3, steps=30, n=2), id="img-stream")
    j.stream = True
    job_key = keys.job("tiny-sd", j.id)
    marks: list[bytes | None] = []  # the job key, read as each final image arrives before the end
    r = aioredis.Redis.from_url(redis_server.url)

    async def watch(got: list[Any]) -> None:
        if any(isinstance(e, ImageReady) for e in got) and not isinstance(got[-1], Done):
            marks.append(await r.get(job_key))

    try:
        await r.set(job_key, b"q", px=60_000)  # as the gateway's submit script makes it
        # One 64x64 image per step: the job's second image is denoised after its first is ready.
        events = await through_a_worker(tiny_sd, redis_server.url, keys, j, watch, max_batch_pixels=64 * 64)
    finally:
        await r.aclose()
    assert [type(e) for e in events] == [Started, ImageReady, ImageReady, Done], events
    assert marks and marks[0] == b"q", marks


def build_tiny_sdxl(path: Path, tokenizer_dir: Path) -> Path:
    """A tiny random SDXL pipeline (diffusers' own test-size configuration, two text encoders)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=64)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.eos_token_id)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(config), tokenizer=tokenizer,
                                     text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=tokenizer,
                                     unet=unet, scheduler=scheduler)
    pipe.save_pretrained(path)
    return path


async def test_sdxl_runs_in_the_step_loop_with_its_added_conditioning(tiny_sd: Path, tmp_path: Path) -> None:
    """SDXL's pooled text embeddings and time ids ride along per row: batched = alone = the pipeline."""
    import torch

    model = await asyncio.to_thread(build_tiny_sdxl, tmp_path / "tiny-sdxl", tiny_sd / "tokenizer")
    backend = await start(model)
    try:
        assert backend.batcher.sdxl and (backend.limits.default_width, backend.limits.default_height) == (64, 64)
        alone = (await run(backend, job(body(seed=4, steps=4)))).final()[0]
        outs = await asyncio.gather(*(run(backend, job(body(seed=s, steps=4, guidance_scale=g)))
                                      for s, g in ((4, 7.5), (5, 3.0), (6, 1.0))))
        reference = await asyncio.to_thread(lambda: backend.pipe(
            "a red cat on a mat", num_inference_steps=4, height=64, width=64, guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(4)).images[0])
    finally:
        await backend.close()
    buf = io.BytesIO()
    reference.save(buf, format="PNG")
    (batched, meta), *_ = (o.final() for o in outs)
    assert meta["batch"] == 3
    print("SDXL max abs pixel difference vs alone:", max_diff(alone, batched), max_diff(alone, buf.getvalue()))
    assert max_diff(alone, batched) <= TOLERANCE and max_diff(alone, buf.getvalue()) <= TOLERANCE
    assert max_diff(alone, outs[1].final()[0]) > 10 * TOLERANCE


async def test_a_compiled_pipeline_serves_the_same_images(tiny_sd: Path, backend: DiffusersBackend) -> None:
    """``compile``: UNet and VAE decoder wrapped by torch.compile (channels_last) and warmed up at
    start. Dynamo's ``eager`` backend traces the same graphs without generating code (inductor needs
    a C compiler and minutes on a CPU), so this checks everything around the compiled modules."""
    expected = (await run(backend, job(body(seed=11, steps=3, n=2)))).finals()
    compiled = await start(tiny_sd, compile=True, compile_backend="eager")
    try:
        assert type(compiled.pipe.unet).__name__ == "OptimizedModule"
        got = (await run(compiled, job(body(seed=11, steps=3, n=2)))).finals()
    finally:
        await compiled.close()
    assert [m["seed"] for _, m in got] == [11, 12]
    assert all(max_diff(a, b) <= TOLERANCE for (a, _), (b, _) in zip(expected, got))

