"""The diffusers backend: text-to-image and image edit jobs on one diffusers pipeline, batched.

Two ways of batching, chosen by ``DiffusersSettings.batching``:

* ``step`` (UNet pipelines :func:`engines.denoise.step_supported` accepts): continuous
  batching at the level of denoising steps, :class:`engines.denoise.StepLoop`. Requests
  join and leave a running batch between steps; edits (img2img, inpainting) join it too.
* ``request`` (any text-to-image pipeline): :class:`engines.request_batch.RequestBatcher`, dynamic
  batching of whole requests: jobs of the same size, steps and guidance that arrive within
  ``batch_window_ms`` run as one pipeline call; edits run on the pipeline's img2img and inpainting
  variants, where diffusers has them.

Both hand back decoded images (:class:`engines.denoise.Frame`); :meth:`DiffusersBackend.run`
encodes them (png/jpeg/webp, off the event loop) and writes them to the job's output.
diffusers and torch are imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from typing import Any

import msgspec

from engines.backend import JobOutput
from engines.denoise import Failure, Frame, Request, StepLoop
from engines.diffusion import step_supported
from engines.image_edit import DECODES, resolve_edit
from engines.image_job import ImageLimits, encode_image, resolve
from engines.request_batch import RequestBatcher
from engines.contract.messages import Job, Usage
from telemetry.engine_instruments import EngineMetrics

log = logging.getLogger("conduit.engine.diffusers")


class DiffusersSettings(msgspec.Struct, kw_only=True):
    """How to serve one diffusers text-to-image pipeline (built at the entrypoint, passed in)."""

    #: A local diffusers pipeline directory (``model_index.json``).
    model: str
    #: The model name clients use; defaults to ``model``.
    served_name: str | None = None
    #: ``cpu``, ``cuda``, ``cuda:1``...; None: cuda when available, else cpu.
    device: str | None = None
    #: float32, float16 or bfloat16; None: float32 on cpu, float16 elsewhere.
    dtype: str | None = None
    #: torch.compile the UNet and the VAE decoder (channels_last), warmed up at start.
    compile: bool = False
    #: torch.compile's backend: ``inductor`` (generated kernels), or any other dynamo backend.
    compile_backend: str = "inductor"
    #: torch's CPU threads (``torch.set_num_threads``); None: torch's default. On a small,
    #: shared CPU, 1 avoids OpenMP threads spinning against other processes.
    threads: int | None = None
    #: Jobs held at once (their images wait in the step loop, cheaply).
    max_concurrency: int = 64
    #: ``step``, ``request``, or ``auto`` (step where the pipeline allows it).
    batching: str = "auto"
    #: Pixel budget of one denoising step: the sum of width*height of the images in it.
    max_batch_pixels: int = 16 * 512 * 512
    #: Request batching: how long the first job of a batch waits for others.
    batch_window_ms: float = 20.0
    #: Size of ``size: auto`` as (width, height); None: the UNet's native size.
    default_size: tuple[int, int] | None = None
    min_size: int = 64
    max_size: int = 2048
    default_steps: int = 30
    #: Steps per OpenAI ``quality`` (``auto`` uses ``default_steps``).
    quality_steps: dict[str, int] = msgspec.field(default_factory=lambda: {
        "low": 15, "medium": 30, "high": 50, "standard": 30, "hd": 50})
    max_steps: int = 150
    default_guidance: float = 7.5


class DiffusersBackend:
    """Runs image jobs on one diffusers pipeline in this process."""

    kind = "diffusers"
    #: ``image_edit`` too once started: in the step loop (edits join its batches), or on the pipeline's own
    #: img2img and inpainting pipelines.
    kinds = frozenset({"image"})

    def __init__(self, settings: DiffusersSettings) -> None:
        self.settings = settings
        self.served_name = settings.served_name or settings.model
        self.models = [self.served_name]
        self.max_concurrency = settings.max_concurrency
        self.max_model_len: int | None = None
        self.max_chars_per_token: int | None = None
        self.max_sequences: int | None = None
        #: Set by the engine entrypoint (``engines.main.serve``).
        self.metrics = EngineMetrics.noop()
        self.pipe: Any = None
        #: The batcher in use: a StepLoop or a RequestBatcher.
        self.batcher: Any = None
        self.limits: ImageLimits | None = None
        self._decoding = asyncio.Semaphore(DECODES)

    async def start(self) -> None:
        """Load the pipeline (in a thread: the event loop stays free), start the batcher, warm up."""
        started = time.perf_counter()
        self.pipe = pipe = await asyncio.to_thread(self._load)
        s = self.settings
        mode = s.batching
        if mode not in ("auto", "step", "request"):
            raise ValueError(f"batching must be auto, step or request, not {mode!r}")
        if mode == "auto":
            mode = "step" if step_supported(pipe) else "request"
        elif mode == "step" and not step_supported(pipe):
            raise ValueError(f"step batching does not support {type(pipe).__name__}; use batching='request'")
        if mode == "step":
            self.batcher = StepLoop(pipe, max_batch_pixels=s.max_batch_pixels, metrics=self.metrics,
                                    model=self.served_name)
            self.batcher.start()
        else:
            self.batcher = RequestBatcher(pipe, s, self.metrics, self.served_name)
        if mode == "step" or await asyncio.to_thread(self.batcher.edits):
            self.kinds = frozenset({"image", "image_edit"})
        # ``is not None``: a compiled UNet (OptimizedModule) refuses truth tests (it has no len()).
        unet = getattr(pipe, "unet", None)
        native = unet.config.sample_size * pipe.vae_scale_factor if unet is not None else 1024
        width, height = s.default_size or (native, native)
        self.limits = ImageLimits(
            default_width=width, default_height=height, min_size=max(s.min_size, 8), max_size=s.max_size,
            default_steps=s.default_steps, max_steps=s.max_steps, quality_steps=s.quality_steps,
            default_guidance=s.default_guidance)
        log.info("diffusers pipeline %s (%s) loaded in %.1f s; %s batching, default size %dx%d",
                 s.model, type(pipe).__name__, time.perf_counter() - started, mode, width, height)
        if s.compile:
            await self._warm_up()

    def _load(self) -> Any:
        import torch

        with warnings.catch_warnings():
            # Importing the auto pipeline imports every pipeline family; some of them call
            # torch.jit.script at import time, deprecated in torch 2.13 (not our code).
            warnings.filterwarnings("ignore", message=".*torch.jit.script. is deprecated", category=DeprecationWarning)
            from diffusers import AutoPipelineForText2Image

        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, s.dtype or ("float32" if device == "cpu" else "float16"))
        pipe = AutoPipelineForText2Image.from_pretrained(s.model, dtype=dtype)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        vae = pipe.vae
        if vae.dtype == torch.float16 and vae.config.get("force_upcast"):
            vae.to(torch.float32)  # SDXL's VAE overflows in float16; the pipeline upcasts it too
        if s.compile:
            for module in (pipe.unet, vae):
                module.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend=s.compile_backend)
            vae.decode = torch.compile(vae.decode, fullgraph=True, backend=s.compile_backend)
        return pipe

    async def _warm_up(self) -> None:
        """Compile for real before serving: one and two images, with guidance, at the default size."""
        assert self.limits is not None
        started = time.perf_counter()
        body = msgspec.json.encode({"prompt": "warm-up", "n": 2, "num_inference_steps": 2, "seed": 0})
        for n in (1, 2):
            frames = await self._generate(Job(id=f"warm-up-{n}", kind="image", model=self.served_name,
                                              body=body.replace(b'"n":2', b'"n":%d' % n), reply_to="",
                                              deadline_ms=0))
            assert len(frames) == n
        log.info("compile warm-up took %.1f s", time.perf_counter() - started)

    async def _generate(self, job: Job) -> list[Frame]:
        frames: list[Frame] = []

        class _Collect:
            def started(self) -> None: ...
            def delta(self, *_: Any) -> None: ...
            async def image(self, data: bytes, **kw: Any) -> None: frames.append(Frame(kw["index"], kw["seed"], data))
            def done(self, usage: Usage) -> None: ...

        await self.run(job, _Collect())
        return frames

    async def run(self, job: Job, out: JobOutput) -> None:
        """Validate the request, queue its images, and write each decoded image to ``out``."""
        assert self.limits is not None
        if job.kind == "image_edit":
            spec = await resolve_edit(job, out, self.limits, self._decoding)
        else:
            spec = resolve(job.body, self.limits)  # JobRejected (400) before any output
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue[Frame | Failure] = asyncio.Queue()

        def emit(item: Frame | Failure) -> None:  # from the batcher's thread
            try:
                loop.call_soon_threadsafe(frames.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody waits for it
                pass

        req = Request(job_id=job.id, spec=spec, emit=emit, deadline_ms=job.deadline_ms)
        self.batcher.submit(req)
        out.started()
        try:
            left = spec.n
            while left:
                item = await frames.get()
                if isinstance(item, Failure):
                    raise item.error
                data = await asyncio.to_thread(encode_image, item.image, spec.output_format, spec.output_compression)
                await out.image(data, index=item.index, format=spec.output_format, width=spec.width,
                                height=spec.height, seed=item.seed, partial=item.partial, joined=item.joined,
                                batch=item.batch)
                if item.partial is None:
                    left -= 1
                    self.metrics.image_generated(self.served_name, item.joined)
            out.done(Usage(prompt_tokens=req.prompt_tokens))
        finally:
            # Done, failed or cancelled (client gone): its images leave the loop before the next step.
            req.cancelled = True

    async def close(self) -> None:
        """Stop the batcher and release the pipeline."""
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.stop)
        self.batcher = self.pipe = None
