"""The fault suite's steady load (:mod:`tests.fault.load`), sent through the ``openai`` SDK with
an API key, as the deployment's clients send it.

Every request is judged by the fault suite's own :func:`~tests.fault.load.judge` against an
engine whose tokens are numbered (``--numbered``: token i is ``"<i> "``), and counted in its
:class:`~tests.fault.load.Report`: completed, clean error (OpenAI's error envelope), lost,
duplicated. One difference: the SDK stops reading a stream at ``[DONE]`` and raises at an error
event, so a stream counts as ended with ``[DONE]`` when the SDK's iteration ended on its own
(an answer cut short still misses tokens or its ``finish_reason``, and counts as lost).
"""

from __future__ import annotations

import asyncio
import random
import time

import openai

from tests.fault.load import (
    COMPLETED,
    LOST,
    RETRY_PAUSE_S,
    Answer,
    LoadThread,
    Outcome,
    judge,
)


class SdkLoad(LoadThread):
    """``clients`` clients sending chat completions (half of them streamed) to ``base_urls`` with
    ``api_key`` until :meth:`stop`; ``deadline_s`` is the gateways' request timeout (an answer at or
    after it is lost)."""

    def __init__(self, base_urls: list[str], api_key: str, *, model: str, tokens: int, clients: int,
                 deadline_s: float) -> None:
        super().__init__(model=model, tokens=tokens, clients=clients, deadline_s=deadline_s,
                         client_timeout_s=deadline_s + 10)
        self.base_urls = base_urls
        self.api_key = api_key

    async def _main(self) -> None:
        sdks = [openai.AsyncOpenAI(base_url=f"{u}/v1", api_key=self.api_key, max_retries=0,
                                   timeout=self.client_timeout_s) for u in self.base_urls]
        try:
            await asyncio.gather(*(self._client(sdks, random.Random(i)) for i in range(self.clients)))
        finally:
            for sdk in sdks:
                await sdk.close()

    async def _client(self, sdks: list[openai.AsyncOpenAI], rng: random.Random) -> None:
        while not self._stopping.is_set():
            i = rng.randrange(len(sdks))
            answer = Answer(stream=rng.random() < 0.5)
            failure: str | None = None
            start = time.monotonic() - self.t0
            try:
                async with asyncio.timeout(self.client_timeout_s):
                    await self._request(sdks[i], answer)
            except TimeoutError:
                failure = f"client timeout ({self.client_timeout_s:g}s)"
            except openai.APIStatusError as e:
                answer.status, answer.error = e.status_code, _inner(e.body)
            except openai.APIConnectionError as e:  # APITimeoutError too
                failure = f"{type(e).__name__} without an error envelope"
            except openai.APIError as e:  # an error event mid-stream (after the 200)
                answer.error, answer.done = _inner(e.body), True
            end = time.monotonic() - self.t0
            kind, detail = judge(answer, failure, self.tokens)
            if kind != LOST and end - start >= self.deadline_s:
                kind, detail = LOST, f"answered after its deadline ({detail or kind})"
            self.outcomes.append(Outcome(answer.stream, self.base_urls[i], start, end, kind, detail, answer.first))
            if kind != COMPLETED:
                await asyncio.sleep(RETRY_PAUSE_S)

    async def _request(self, sdk: openai.AsyncOpenAI, answer: Answer) -> None:
        messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "count"}]
        if not answer.stream:
            chat = await sdk.chat.completions.create(model=self.model, messages=messages)
            answer.status = 200
            for choice in chat.choices:
                answer.text.append(choice.message.content or "")
                answer.finish_reason = choice.finish_reason
            return
        stream = await sdk.chat.completions.create(model=self.model, messages=messages, stream=True)
        answer.status = 200
        async for chunk in stream:
            for c in chunk.choices:
                if c.delta.content:
                    if answer.first is None:
                        answer.first = time.monotonic() - self.t0
                    answer.text.append(c.delta.content)
                if c.finish_reason:
                    answer.finish_reason = c.finish_reason
        answer.done = True


def _inner(body: object) -> object:
    """The inside of OpenAI's error envelope, whether the SDK unwrapped it or not."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]
    return body
