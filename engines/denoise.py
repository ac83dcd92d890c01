"""Step-level continuous batching for UNet diffusion pipelines (Stable Diffusion 1.x/2.x, SDXL).

One denoising loop, in one dedicated thread, advances every running image by one scheduler
step at a time. Each image owns its scheduler, timestep index, generator, guidance and prompt
embeddings, so images of different requests, step counts and guidance scales share one UNet
call; a new image joins at the next step, a finished one leaves to the VAE at once. What one
step may mix is limited by tensor shapes: images of one size (and one text-embedding shape)
only, never several sizes, up to a pixel budget (oldest first); size groups take turns.

The asyncio side talks to the loop through :class:`Request`: :meth:`StepLoop.submit` puts one
in the inbox, and the loop hands back :class:`Frame` (a decoded image) or :class:`Failure`
through ``Request.emit``, which must be thread-safe. Setting ``Request.cancelled`` drops the
request's images before the next step.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engines.backend import JobRejected
from engines.diffusion import decode_latents, encode_picture, encode_prompt, overlay, preview_steps, \
    start_latents
from engines.image_job import ImageSpec

log = logging.getLogger("conduit.engine.diffusers")

@dataclass(eq=False)
class Frame:
    """A decoded image (PIL) of a request: final when ``partial`` is None."""

    index: int
    seed: int
    image: Any
    partial: int | None = None
    joined: bool = False
    batch: int = 1


@dataclass(eq=False)
class Failure:
    """The request failed; ``error`` is raised by the job (JobRejected or another exception)."""

    error: BaseException


@dataclass(eq=False)
class Request:
    """One job's images in a batcher; ``emit`` receives its Frames and Failure from any thread."""

    job_id: str
    spec: ImageSpec
    emit: Callable[[Frame | Failure], None]
    #: Epoch ms after which the job fails with 504 (0: none).
    deadline_ms: int = 0
    #: Set by the job's side (client gone, job over): its images leave before the next step.
    cancelled: bool = False
    #: Set once a Failure was emitted.
    failed: bool = False
    #: Denoising steps its images took part in (UNet calls), for tests and logs.
    steps_run: int = 0
    prompt_tokens: int = 0

    def fail(self, error: BaseException) -> None:
        if not self.failed:
            self.failed = True
            self.emit(Failure(error))


def deadline_error() -> JobRejected:
    return JobRejected("The request's deadline passed while its images were being generated.", status=504,
                       code="deadline_exceeded", type="timeout_error")


def expired(req: Request) -> bool:
    return bool(req.deadline_ms) and time.time() * 1000 >= req.deadline_ms


@dataclass(eq=False)
class _Image:
    req: Request
    index: int
    seed: int
    generator: Any
    scheduler: Any
    latents: Any
    #: Conditional and (with classifier-free guidance) unconditional UNet conditioning:
    #: (encoder_hidden_states, added_cond_kwargs or None).
    cond: tuple[Any, Any]
    uncond: tuple[Any, Any] | None
    key: tuple[int, ...]
    order: int
    previews: dict[int, list[int]]
    done_steps: int = 0
    joined: bool = False
    batch: int = 0
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    #: An edit's: the step it starts at, its picture's latents, its noise and its mask (1: repaint).
    first: int = 0
    init: Any = None
    noise: Any = None
    mask: Any = None

    @property
    def total(self) -> int:
        return len(self.scheduler.timesteps)


class StepLoop:
    """The denoising loop over all running images (see the module docstring)."""

    def __init__(self, pipe: Any, *, max_batch_pixels: int, metrics: Any, model: str) -> None:
        import torch

        self.pipe = pipe
        self.max_batch_pixels = max_batch_pixels
        self.metrics = metrics
        self.model = model
        self.device = pipe._execution_device if hasattr(pipe, "_execution_device") else pipe.device
        self.sdxl = type(pipe).__name__ == "StableDiffusionXLPipeline"
        params = set(inspect.signature(pipe.scheduler.step).parameters)
        self._step_eta = "eta" in params
        self._step_generator = "generator" in params
        self._torch = torch
        #: Called in the loop thread after each step with (width, height, [(job_id, index), ...]).
        self.on_step: Callable[[int, int, list[tuple[str, int]]], None] | None = None
        #: UNet calls made so far.
        self.steps_run = 0
        self._inbox: list[Request] = []
        self._cond = threading.Condition()
        self._groups: dict[tuple[int, ...], list[_Image]] = {}
        self._turns: deque[tuple[int, ...]] = deque()
        self._order = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="denoise-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; requests still running fail. Joins the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()
        self._fail_all(RuntimeError("the engine stopped before the images were done"))

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            new, self._inbox = self._inbox, []
        for req in {*new, *(img.req for group in self._groups.values() for img in group)}:
            req.fail(error)
        self._groups.clear()
        self._turns.clear()

    def submit(self, req: Request) -> None:
        """Queue ``req``; its images join the loop before its next step."""
        with self._cond:
            self._inbox.append(req)
            self._cond.notify()

    def running(self) -> int:
        """Images being denoised now (read from any thread; approximate)."""
        return sum(len(g) for g in list(self._groups.values()))

    # ---- the loop thread --------------------------------------------------------------

    def _run(self) -> None:
        with self._torch.inference_mode():
            while True:
                with self._cond:
                    while not self._inbox and not self._groups and not self._stopped:
                        self._cond.wait()
                    if self._stopped:
                        return
                    new, self._inbox = self._inbox, []
                try:
                    for req in new:
                        self._admit(req)
                    self._prune()
                    batch = self._take()
                    if batch:
                        self._step(batch)
                except Exception as exc:  # noqa: BLE001 - a bug here must not leave jobs waiting forever
                    log.exception("the denoising loop failed; failing its %d images", self.running())
                    self._fail_all(RuntimeError(f"the denoising loop failed: {exc}"))

    def _admit(self, req: Request) -> None:
        """Encode the prompt once and add the request's images, each with its own scheduler and noise."""
        if req.cancelled:
            return
        if expired(req):
            req.fail(deadline_error())
            return
        try:
            images = self._prepare(req)
        except Exception as exc:  # noqa: BLE001 - fails this request only
            log.exception("preparing job %s failed", req.job_id)
            req.fail(RuntimeError(f"preparing the request failed: {exc}"))
            return
        group = self._groups.get(images[0].key)
        # Joined: the group was already mid-denoising when these images arrived.
        joined = bool(group) and any(img.done_steps > img.first for img in group)  # type: ignore[union-attr]
        if group is None:
            group = self._groups[images[0].key] = []
            self._turns.append(images[0].key)
        for img in images:
            img.joined = joined
            group.append(img)

    def _prepare(self, req: Request) -> list[_Image]:
        torch, pipe, spec = self._torch, self.pipe, req.spec
        tok = pipe.tokenizer
        req.prompt_tokens = len(tok(spec.prompt, truncation=True, max_length=tok.model_max_length).input_ids)
        pe, cond, uncond = encode_prompt(pipe, spec, self.device, self.sdxl)
        scale = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, spec.height // scale, spec.width // scale)
        key = (spec.width, spec.height, *pe.shape[1:])
        images = []
        # An edit's pictures, each encoded once (``n`` images of one picture share the object).
        pictures = {id(p): encode_picture(pipe, p, spec.width, spec.height) for p in spec.sources}
        for i, seed in enumerate(spec.seeds):
            gen = torch.Generator("cpu").manual_seed(seed)
            sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
            sched.set_timesteps(spec.steps, device=self.device)
            picture = pictures[id(spec.sources[i])] if spec.sources else None
            first, latents, init, noise, mask = start_latents(pipe, sched, spec, i, picture, gen, shape, pe.dtype)
            kwargs: dict[str, Any] = {}
            if self._step_eta:
                kwargs["eta"] = 0.0
            if self._step_generator:
                kwargs["generator"] = gen
            self._order += 1
            previews = preview_steps(len(sched.timesteps) - first, spec.partial_images)
            images.append(_Image(req=req, index=i, seed=seed, generator=gen, scheduler=sched, latents=latents,
                                 cond=cond, uncond=uncond, key=key, order=self._order,
                                 previews={first + at: parts for at, parts in previews.items()},
                                 step_kwargs=kwargs, first=first, done_steps=first, init=init, noise=noise,
                                 mask=mask))
        return images

    def _drop(self, keep: Callable[[_Image], bool]) -> None:
        for key in list(self._groups):
            group = self._groups[key] = [img for img in self._groups[key] if keep(img)]
            if not group:
                del self._groups[key]
                self._turns.remove(key)

    def _prune(self) -> None:
        """Drop images of cancelled, failed and expired requests (no more UNet work for them)."""
        for group in self._groups.values():
            for img in group:
                if not img.req.failed and not img.req.cancelled and expired(img.req):
                    img.req.fail(deadline_error())
        self._drop(lambda img: not (img.req.cancelled or img.req.failed))

    def _take(self) -> list[_Image]:
        """The next size group's oldest images, up to the pixel budget (at least one)."""
        if not self._turns:
            return []
        key = self._turns[0]
        self._turns.rotate(-1)  # the next step serves the next size
        batch, pixels = [], 0
        for img in self._groups[key]:  # in arrival order
            area = img.req.spec.width * img.req.spec.height
            if batch and pixels + area > self.max_batch_pixels:
                break
            batch.append(img)
            pixels += area
        return batch

    def _step(self, batch: list[_Image]) -> None:
        """One UNet call for ``batch``; then each image's guidance, scheduler step, previews, exit."""
        try:
            finished, previews = self._denoise(batch)
        except Exception as exc:  # noqa: BLE001 - fails the jobs of this step only; the loop goes on
            log.exception("denoising step failed (%d images)", len(batch))
            for img in batch:
                img.req.fail(exc if isinstance(exc, JobRejected) else RuntimeError(f"denoising failed: {exc}"))
            self._drop(lambda img: not img.req.failed)
            return
        spec = batch[0].req.spec
        if self.on_step is not None:
            self.on_step(spec.width, spec.height, [(img.req.job_id, img.index) for img in batch])
        try:
            if previews:
                pil = self._decode([lat for _, lat, _ in previews])
                for (img, _, parts), image in zip(previews, pil):
                    image = _kept(img, image)
                    for j in parts:
                        img.req.emit(Frame(img.index, img.seed, image, partial=j, joined=img.joined,
                                           batch=img.batch))
            if finished:
                self._drop(lambda img: img not in finished)
                pil = self._decode([img.latents for img in finished])
                for img, image in zip(finished, pil):
                    image = _kept(img, image)
                    img.req.emit(Frame(img.index, img.seed, image, joined=img.joined, batch=img.batch))
        except Exception as exc:  # noqa: BLE001
            log.exception("decoding failed")
            for img in {*finished, *(p[0] for p in previews)}:
                img.req.fail(RuntimeError(f"decoding the image failed: {exc}"))
            self._drop(lambda img: not img.req.failed)

    def _denoise(self, batch: list[_Image]) -> tuple[list[_Image], list[tuple[_Image, Any, list[int]]]]:
        torch = self._torch
        rows, states, times, added = [], [], [], []
        for img in batch:
            t = img.scheduler.timesteps[img.done_steps]
            x = img.scheduler.scale_model_input(img.latents, t)
            for hidden, extra in ([img.uncond] if img.uncond is not None else []) + [img.cond]:
                rows.append(x)
                states.append(hidden)
                times.append(t.reshape(()))
                added.append(extra)
        kwargs: dict[str, Any] = {}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {k: torch.cat([a[k] for a in added]) for k in ("text_embeds", "time_ids")}
        # A 1-D timestep tensor: every row its own timestep (the UNet's time embedding is per sample).
        noise = self.pipe.unet(torch.cat(rows), torch.stack(times), encoder_hidden_states=torch.cat(states),
                               return_dict=False, **kwargs)[0]
        self.steps_run += 1
        self.metrics.denoise_step(self.model, len(batch))
        finished, previews, row = [], [], 0
        for img in batch:
            if img.uncond is not None:
                uncond, text = noise[row:row + 1], noise[row + 1:row + 2]
                eps = uncond + img.req.spec.guidance * (text - uncond)
                row += 2
            else:
                eps = noise[row:row + 1]
                row += 1
            t = img.scheduler.timesteps[img.done_steps]
            out = img.scheduler.step(eps, t, img.latents, **img.step_kwargs, return_dict=True)
            img.latents = out.prev_sample
            img.done_steps += 1
            img.batch = max(img.batch, len(batch))
            img.req.steps_run += 1
            x0 = getattr(out, "pred_original_sample", None)
            if img.mask is not None:
                _blend(img)
                if x0 is not None:
                    x0 = (1 - img.mask) * img.init + img.mask * x0
            parts = img.previews.get(img.done_steps)
            if parts and img.done_steps < img.total:
                previews.append((img, img.latents if x0 is None else x0, parts))
            elif parts:  # previews due at the last step: the final image itself
                previews.append((img, img.latents, parts))
            if img.done_steps >= img.total:
                finished.append(img)
        return finished, previews

    def _decode(self, latents: list[Any]) -> list[Any]:
        """Latents of one size -> PIL images, in one VAE call."""
        return decode_latents(self.pipe, self._torch.cat(latents))


def _blend(img: _Image) -> None:
    """An inpainting step's end: the kept region back to the input's latents, noised to the next
    step's level (none after the last), as diffusers' inpainting pipeline does for a 4-channel UNet."""
    kept = img.init
    if img.done_steps < img.total:
        at = img.done_steps
        kept = img.scheduler.add_noise(img.init, img.noise, img.scheduler.timesteps[at:at + 1])
    img.latents = (1 - img.mask) * kept + img.mask * img.latents


def _kept(img: _Image, image: Any) -> Any:
    """A decoded image of an inpainting edit with the pixels its mask keeps taken from its input."""
    spec = img.req.spec
    if not spec.masks or spec.masks[img.index] is None:
        return image
    return overlay(image, spec.sources[img.index], spec.masks[img.index])
