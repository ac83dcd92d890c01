"""Whole-request batching for any diffusers text-to-image pipeline (``DiffusersSettings.batching``
``request``): jobs of the same size, steps and guidance that arrive within ``batch_window_ms`` run as
one pipeline call; an edit runs on the pipeline's own img2img and inpainting variants. The step loop
(``engines.denoise``) is the better batcher where it runs; this is the one for every other pipeline.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from engines.denoise import Frame, Request, deadline_error, expired
from engines.diffusion import decode_latents, overlay, preview_steps
from telemetry.engine_instruments import EngineMetrics

if TYPE_CHECKING:
    from engines.diffusers_engine import DiffusersSettings

log = logging.getLogger("conduit.engine.diffusers")


class RequestBatcher:
    """Whole requests with equal (size, steps, guidance) arriving within a window run as one pipeline call."""

    def __init__(self, pipe: Any, settings: DiffusersSettings, metrics: EngineMetrics, model: str) -> None:
        self.pipe = pipe
        self.settings = settings
        self.metrics = metrics
        self.model = model
        self.steps_run = 0
        self.on_step: Any = None
        self._pending: dict[tuple[int, int, int, float], list[Request]] = {}
        #: Its img2img and inpainting pipelines, made from its own at start (:meth:`edits`).
        self._pipes: dict[Any, Any] = {}
        # One thread: pipeline calls run one after another (one model, one device).
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="diffusers-batch")
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, req: Request) -> None:
        s = req.spec
        if s.sources:  # an edit: its own pipeline calls, one request at a time (see :meth:`_edit`)
            task = asyncio.get_running_loop().create_task(self._run_edit(req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        key = (s.width, s.height, s.steps, s.guidance)
        waiting = self._pending.setdefault(key, [])
        waiting.append(req)
        if len(waiting) == 1:
            task = asyncio.get_running_loop().create_task(self._flush(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self, key: tuple[int, int, int, float]) -> None:
        await asyncio.sleep(self.settings.batch_window_ms / 1000)
        loop = asyncio.get_running_loop()
        while waiting := self._pending.get(key):
            batch, pixels = [], 0
            while waiting:
                area = waiting[0].spec.width * waiting[0].spec.height * waiting[0].spec.n
                if batch and pixels + area > self.settings.max_batch_pixels:
                    break
                batch.append(waiting.pop(0))
                pixels += area
            if not waiting:
                del self._pending[key]
            try:
                await loop.run_in_executor(self._executor, self._generate, batch)
            except Exception as exc:  # noqa: BLE001 - its jobs fail; later batches still run
                log.exception("request batch failed")
                for req in batch:
                    req.fail(RuntimeError(f"generating the images failed: {exc}"))

    def _generate(self, batch: list[Request]) -> None:
        import torch

        live = []
        for req in batch:
            if expired(req):
                req.fail(deadline_error())
            elif not req.cancelled:
                live.append(req)
        if not live:
            return
        spec = live[0].spec
        rows = [(req, i, seed) for req in live for i, seed in enumerate(req.spec.seeds)]
        previews: dict[int, list[tuple[int, list[int]]]] = {}  # step -> [(row, partial numbers)]
        for n, (req, _, _) in enumerate(rows):
            for at, parts in preview_steps(spec.steps, req.spec.partial_images).items():
                previews.setdefault(at, []).append((n, parts))

        def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            self.steps_run += 1
            self.metrics.denoise_step(self.model, len(rows))
            for req in live:
                req.steps_run += 1
            due = previews.get(i + 1)
            if due and i + 1 < spec.steps:  # previews of the noisy latents (the last is the final)
                latents = kwargs["latents"]
                images = decode_latents(pipe, torch.cat([latents[n:n + 1] for n, _ in due]))
                for (n, parts), image in zip(due, images):
                    req, index, seed = rows[n]
                    for j in parts:
                        req.emit(Frame(index, seed, image, partial=j, batch=len(rows)))
            return {}

        tok = self.pipe.tokenizer
        for req in live:
            req.prompt_tokens = len(tok(req.spec.prompt, truncation=True, max_length=tok.model_max_length).input_ids)
        try:
            with torch.inference_mode():
                images = self.pipe(
                    prompt=[req.spec.prompt for req, _, _ in rows],
                    negative_prompt=[req.spec.negative_prompt or "" for req, _, _ in rows],
                    generator=[torch.Generator("cpu").manual_seed(seed) for _, _, seed in rows],
                    num_inference_steps=spec.steps, guidance_scale=spec.guidance, height=spec.height,
                    width=spec.width, output_type="pil", callback_on_step_end=on_step_end).images
        except Exception as exc:  # noqa: BLE001 - fails this batch's jobs only
            log.exception("pipeline call failed (%d images)", len(rows))
            for req in live:
                req.fail(RuntimeError(f"generating the images failed: {exc}"))
            return
        for (req, index, seed), image in zip(rows, images):
            for at, parts in preview_steps(spec.steps, req.spec.partial_images).items():
                if at >= spec.steps:  # previews due at the last step: the final image itself
                    for j in parts:
                        req.emit(Frame(index, seed, image, partial=j, batch=len(rows)))
            req.emit(Frame(index, seed, image, batch=len(rows)))

    def edits(self) -> bool:
        """Make the pipeline's img2img and inpainting pipelines (``from_pipe``: its components, no copy of
        the weights); whether it has both (else the engine does not announce edits)."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        try:
            for kind in (AutoPipelineForImage2Image, AutoPipelineForInpainting):
                self._pipes[kind] = kind.from_pipe(self.pipe)
                self._pipes[kind].set_progress_bar_config(disable=True)
        except ValueError as exc:  # diffusers has no such variant of this pipeline
            log.info("%s cannot edit (%s): image_edit jobs are not announced", type(self.pipe).__name__, exc)
            return False
        return True

    async def _run_edit(self, req: Request) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._edit, req)
        except Exception as exc:  # noqa: BLE001
            log.exception("edit failed")
            req.fail(RuntimeError(f"editing the images failed: {exc}"))

    def _edit(self, req: Request) -> None:
        """An edit on the pipeline's own img2img and inpainting pipelines (``from_pipe``: its components, no
        copy of the weights): the masked images in one call, the others in another; previews come with
        the final images (the steps are not the step loop's to show)."""
        import torch
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        if expired(req):
            req.fail(deadline_error())
            return
        if req.cancelled:
            return
        spec = req.spec
        tok = self.pipe.tokenizer
        req.prompt_tokens = len(tok(spec.prompt, truncation=True, max_length=tok.model_max_length).input_ids)
        masked = [i for i, m in enumerate(spec.masks) if m is not None]
        whole = [i for i, m in enumerate(spec.masks) if m is None]
        per_call = max(self.settings.max_batch_pixels // (spec.width * spec.height), 1)  # (the pixel budget)
        calls = [(rows[i:i + per_call], kind) for rows, kind in ((masked, AutoPipelineForInpainting),
                                                                 (whole, AutoPipelineForImage2Image))
                 for i in range(0, len(rows), per_call)]
        for rows, kind in calls:
            if req.cancelled:
                return
            pipe = self._pipes[kind]
            extra = {"mask_image": [spec.masks[i] for i in rows]} if kind is AutoPipelineForInpainting else {}
            with torch.inference_mode():
                images = pipe(prompt=[spec.prompt] * len(rows), negative_prompt=[spec.negative_prompt or ""] * len(rows),
                              image=[spec.sources[i] for i in rows], strength=spec.strength,
                              generator=[torch.Generator("cpu").manual_seed(spec.seeds[i]) for i in rows],
                              num_inference_steps=spec.steps, guidance_scale=spec.guidance, height=spec.height,
                              width=spec.width, output_type="pil", **extra).images
            self.steps_run += int(spec.steps * spec.strength)
            req.steps_run += int(spec.steps * spec.strength)
            for i, image in zip(rows, images, strict=True):
                if spec.masks[i] is not None:
                    image = overlay(image, spec.sources[i], spec.masks[i])
                for j in range(spec.partial_images):
                    req.emit(Frame(i, spec.seeds[i], image, partial=j, batch=len(rows)))
                req.emit(Frame(i, spec.seeds[i], image, batch=len(rows)))

    def stop(self) -> None:
        """Run nothing more; requests not yet run fail (called from a thread, after the worker drained)."""
        for task in list(self._tasks):
            task.get_loop().call_soon_threadsafe(task.cancel)
        self._executor.shutdown(wait=True, cancel_futures=True)
        for waiting in self._pending.values():
            for req in waiting:
                req.fail(RuntimeError("the engine stopped before the images were done"))
        self._pending.clear()
