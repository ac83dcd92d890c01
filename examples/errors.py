"""Conduit's errors as the `openai` SDK raises them: each is OpenAI's error envelope with its status."""

from __future__ import annotations

import os

import openai
from openai import OpenAI

BASE = os.environ.get("CONDUIT_URL", "http://127.0.0.1:8000/v1")
MODEL = os.environ.get("MODEL", "tiny-llama")
client = OpenAI(base_url=BASE, api_key=os.environ["OPENAI_API_KEY"], max_retries=0)
HI = [{"role": "user", "content": "Hi"}]


def main() -> None:
    try:  # 401 invalid_api_key: the SDK's AuthenticationError
        OpenAI(base_url=BASE, api_key="cdt-000000000000-not-a-real-key", max_retries=0).models.list()
    except openai.AuthenticationError as exc:
        print("401:", exc.code, "-", exc.message)

    try:  # 404 model_not_found
        client.chat.completions.create(model="no-such-model", messages=HI)  # type: ignore[arg-type]
    except openai.NotFoundError as exc:
        print("404:", exc.code, "param", exc.param)

    try:  # 400 invalid_value, naming the field
        client.chat.completions.create(model=MODEL, messages=HI, temperature=3)  # type: ignore[arg-type]
    except openai.BadRequestError as exc:
        print("400:", exc.code, "param", exc.param)

    # 429 rate_limit_exceeded (a key over one of its limits) is the SDK's RateLimitError, with
    # Retry-After; the SDK waits and retries it by itself unless max_retries=0.
    print("429: openai.RateLimitError is", openai.RateLimitError.__name__)


if __name__ == "__main__":
    main()
