"""What the step loop (``engines.denoise``) computes with a pipeline's own components, as its
pipelines compute it: prompt embeddings, latents decoded to pictures, and for image edits
pictures encoded to latents, the strength's first step and the mask at latent resolution.

Image-to-image and inpainting use the components the engine already holds (the UNet, the VAE,
the text encoders and the scheduler's configuration): no second pipeline, no second copy of the
weights. Inpainting follows diffusers' ``StableDiffusionInpaintPipeline`` for a UNet of 4 input
channels: every step, the region the mask keeps is replaced by the input's latents noised to the
step's level, so the repainted region grows out of the kept one; after decoding, the kept pixels
are the input's own (:func:`overlay`).
"""

from __future__ import annotations

from typing import Any

from engines.image_job import ImageSpec

#: Pipelines the loop drives (their UNet call and prompt encoding are known here).
STEP_PIPELINES = frozenset({"StableDiffusionPipeline", "StableDiffusionXLPipeline"})


def step_supported(pipe: Any) -> bool:
    """Whether :class:`StepLoop` can drive ``pipe`` (else requests are batched whole)."""
    return (type(pipe).__name__ in STEP_PIPELINES and getattr(pipe, "unet", None) is not None
            and pipe.unet.config.get("time_cond_proj_dim") is None)  # LCM-style guidance embedding: no


def preview_steps(total: int, k: int) -> dict[int, list[int]]:
    """After which step (1-based) each of ``k`` previews is made: evenly spaced, never at step 0."""
    at: dict[int, list[int]] = {}
    for j in range(k):
        at.setdefault(max(1, min(total, total * (j + 1) // (k + 1))), []).append(j)
    return at


def encode_prompt(pipe: Any, spec: ImageSpec, device: Any, sdxl: bool) -> tuple[Any, Any, Any]:
    """(prompt embeddings, the prompt's UNet inputs, the negative prompt's or None): as the pipeline encodes them."""
    cfg = spec.guidance > 1.0
    if sdxl:
        pe, npe, pooled, npooled = pipe.encode_prompt(
            spec.prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=spec.negative_prompt)
        proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None \
            else int(pooled.shape[-1])
        size = (spec.height, spec.width)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype,
                                          text_encoder_projection_dim=proj).to(device)
        return (pe, (pe, {"text_embeds": pooled, "time_ids": time_ids}),
                (npe, {"text_embeds": npooled, "time_ids": time_ids}) if cfg else None)
    pe, npe = pipe.encode_prompt(spec.prompt, device, 1, cfg, spec.negative_prompt)
    return pe, (pe, None), ((npe, None) if cfg else None)


def decode_latents(pipe: Any, latents: Any) -> list[Any]:
    """A batch of latents -> PIL images, as the pipeline's own decode does."""
    vae = pipe.vae
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:  # SDXL-family VAEs that declare latent statistics
        import torch

        m = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        s = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        latents = latents * s / cfg.scaling_factor + m
    else:
        latents = latents / cfg.scaling_factor
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


def first_step(steps: int, strength: float, order: int) -> int:
    """Index in the scheduler's timesteps where an edit of ``strength`` starts (diffusers'
    ``get_timesteps``): strength 1 starts from noise at step 0, 0.5 halfway."""
    return max(steps - min(int(steps * strength), steps), 0) * order


def start_latents(pipe: Any, sched: Any, spec: ImageSpec, i: int, picture: Any, gen: Any, shape: tuple[int, ...],
                  dtype: Any) -> tuple[int, Any, Any, Any, Any]:
    """Image ``i``'s (its first step, its starting latents; an edit's: its picture's latents, its
    noise and its mask at latent resolution or None), drawn as diffusers' text-to-image, img2img and
    inpainting pipelines draw one image's with its own generator. ``picture``: an edit's picture's
    latent distribution; ``sched`` has its timesteps set."""
    from diffusers.utils.torch_utils import randn_tensor

    device = pipe._execution_device if hasattr(pipe, "_execution_device") else pipe.device
    if picture is None:
        return 0, randn_tensor(shape, generator=gen, device=device, dtype=dtype) * sched.init_noise_sigma, None, None, None
    first = first_step(spec.steps, spec.strength, sched.order)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(first)
    init = scaled_latents(pipe, picture.sample(gen)).to(dtype)
    noise = randn_tensor(shape, generator=gen, device=device, dtype=dtype)
    mask = latent_mask(spec.masks[i], shape, device, dtype) if spec.masks[i] is not None else None
    if mask is not None and spec.strength >= 1.0:  # the repainted region starts from noise alone
        latents = noise * sched.init_noise_sigma
    else:
        latents = sched.add_noise(init, noise, sched.timesteps[first:first + 1])
    return first, latents, init, noise, mask


def encode_picture(pipe: Any, picture: Any, width: int, height: int) -> Any:
    """The VAE's latent distribution of ``picture`` (PIL, already ``width`` x ``height``)."""
    vae = pipe.vae
    x = pipe.image_processor.preprocess(picture, height=height, width=width)
    return vae.encode(x.to(device=vae.device, dtype=vae.dtype)).latent_dist


def scaled_latents(pipe: Any, latents: Any) -> Any:
    """A VAE sample as the UNet sees latents (the inverse of :func:`decode_latents`' scaling)."""
    cfg = pipe.vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        import torch

        m = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        s = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return (latents - m) * cfg.scaling_factor / s
    return latents * cfg.scaling_factor


def latent_mask(mask: Any, shape: tuple[int, ...], device: Any, dtype: Any) -> Any:
    """A mask (PIL ``L``, 255 where the picture is repainted) as a (1, 1, h, w) tensor of 0 and 1
    at latent resolution, as diffusers' inpainting pipeline shrinks it (binarized, nearest)."""
    import numpy as np
    import torch

    m = torch.from_numpy((np.asarray(mask, dtype=np.uint8) >= 128).astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(m, size=shape[-2:]).to(device=device, dtype=dtype)


def overlay(image: Any, source: Any, mask: Any) -> Any:
    """``image`` with the pixels the mask keeps (0 in ``mask``) taken from ``source``, exactly."""
    from PIL import Image

    return Image.composite(image, source, mask)
