"""Images with the official `openai` SDK: base64, a URL, a seed, and a streamed generation with partial images."""

from __future__ import annotations

import base64
import os
import urllib.request

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


if __name__ == "__main__":
    main()
