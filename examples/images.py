"""Images with the official `openai` SDK: base64, a URL, a seed, a streamed generation with partial images, and an
edit that repaints what a mask marks."""

from __future__ import annotations

import base64
import io
import os
import urllib.request

from PIL import Image
from openai import OpenAI

client = OpenAI(base_url=os.environ.get("CONDUIT_URL", "http://127.0.0.1:8000/v1"), api_key=os.environ["OPENAI_API_KEY"])
MODEL = os.environ.get("IMAGE_MODEL", "tiny-sd")


def main() -> None:
    # base64, with the diffusion parameters OpenAI's API does not have (through extra_body).
    r = client.images.generate(model=MODEL, prompt="a lighthouse at dusk", size="64x64", n=2,
                               response_format="b64_json",
                               extra_body={"seed": 7, "num_inference_steps": 8, "negative_prompt": "blurry"})
    for i, image in enumerate(r.data):
        png = base64.b64decode(image.b64_json or "")
        print(f"image {i}: {len(png)} bytes of PNG, seed {image.model_extra['seed']}")  # type: ignore[index]

    # A URL served by the gateway (for `image_url_ttl_s`, an hour by default), as JPEG.
    r = client.images.generate(model=MODEL, prompt="a lighthouse at dusk", size="64x64", output_format="jpeg",
                               extra_body={"num_inference_steps": 8})
    url = r.data[0].url or ""
    with urllib.request.urlopen(url) as resp:  # noqa: S310 - the gateway's own URL
        print(f"url: {url} -> {resp.headers['Content-Type']}, {len(resp.read())} bytes")

    # Streamed: previews while it denoises, then the image.
    for event in client.images.generate(model=MODEL, prompt="a lighthouse at dusk", size="64x64", stream=True,
                                        partial_images=2, extra_body={"num_inference_steps": 8}):
        print(f"stream: {event.type} ({len(base64.b64decode(event.b64_json))} bytes)")

    # Edit the first image: the mask's fully transparent pixels (its left half) are repainted, every
    # other pixel stays the input's own. `strength` (an extension) says how far the result may go.
    picture = base64.b64decode(client.images.generate(
        model=MODEL, prompt="a lighthouse at dusk", size="64x64", response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 8}).data[0].b64_json or "")
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    edited = client.images.edit(model=MODEL, image=("lighthouse.png", picture, "image/png"),
                                mask=("mask.png", buf.getvalue(), "image/png"), prompt="a red lighthouse",
                                response_format="b64_json", extra_body={"num_inference_steps": 8, "strength": 1.0})
    before, after = (Image.open(io.BytesIO(b)).convert("RGB") for b in (picture, base64.b64decode(
        edited.data[0].b64_json or "")))
    kept = before.crop((32, 0, 64, 64)).tobytes() == after.crop((32, 0, 64, 64)).tobytes()
    print(f"edit: the right half kept pixel for pixel: {kept}")


if __name__ == "__main__":
    main()
