"""What a request will cost against its key's limits, estimated at admission (before any engine
sees it, so without a tokenizer).

Tokens: the prompt's characters / 4 (rounded up) plus the most the request may generate
(``max_completion_tokens`` / ``max_tokens``, or ``default_max_tokens_estimate`` when a chat
request names none, 16 for a completion, as the engines default it) times the sequences it asks for. Four characters a token is OpenAI's rule of thumb for
English; real tokenizers give about that or fewer tokens, so the prompt part rarely falls short,
and the output part is an upper bound. The reservation is reconciled with the real usage when
the request ends (``Limiter.release``), so a generous estimate costs nothing in the long run,
it only keeps a key from starting more work than its budget covers.

Images count against images per minute, not tokens (a diffusion model makes pixels).
"""

from __future__ import annotations

import msgspec

from gateway.images.protocol import ImageRequest
from gateway.protocol import COMPLETION_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, ImagePart, RefusalPart, TextPart
from gateway.settings import GatewaySettings

#: Characters per token of the estimate.
CHARS_PER_TOKEN = 4
#: Tokens an image in a chat message is reckoned at (OpenAI's count for a 512x512 tile at high detail).
IMAGE_PART_TOKENS = 765
#: Tokens a chat message adds around its content (role, separators of the chat template).
MESSAGE_OVERHEAD_TOKENS = 4

_JSON = msgspec.json.Encoder()


class Cost(msgspec.Struct, frozen=True):
    """What one request takes from its key's per-minute budgets at admission."""

    #: Tokens reserved (prompt estimate + most output); None: not metered in tokens (images).
    tokens: int | None = None
    #: Images asked for.
    images: int = 0


def _tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def chat_prompt_tokens(req: ChatCompletionRequest) -> int:
    """The estimated prompt of a chat request: its messages, tool calls and tool definitions."""
    chars = 0
    images = 0
    for m in req.messages:
        content = m.content
        if isinstance(content, str):
            chars += len(content)
        elif content:
            for part in content:
                if isinstance(part, TextPart):
                    chars += len(part.text)
                elif isinstance(part, RefusalPart):
                    chars += len(part.refusal)
                elif isinstance(part, ImagePart):
                    images += 1
        for call in m.tool_calls or ():
            chars += len(call.function.name) + len(call.function.arguments)
    for tool in req.tools or ():
        f = tool.function
        chars += len(f.name) + len(f.description or "") + (len(_JSON.encode(f.parameters)) if f.parameters else 0)
    return _tokens(chars) + images * IMAGE_PART_TOKENS + len(req.messages) * MESSAGE_OVERHEAD_TOKENS


def completion_prompt_tokens(req: CompletionRequest) -> int:
    """The estimated prompts of a completions request (token-id prompts count exactly)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return _tokens(len(prompt))
    total = 0
    for p in prompt:
        if isinstance(p, str):
            total += _tokens(len(p))
        elif isinstance(p, int):
            total += 1
        else:
            total += len(p)
    return total


def _prompts(req: CompletionRequest) -> int:
    prompt = req.prompt
    if isinstance(prompt, str):
        return 1
    if all(isinstance(p, int) for p in prompt):
        return 1  # one prompt given as token ids
    return len(prompt)


def estimate(req: ChatCompletionRequest | CompletionRequest | ImageRequest, settings: GatewaySettings) -> Cost:
    """The admission cost of a decoded request (see the module's docstring)."""
    if isinstance(req, ImageRequest):
        return Cost(tokens=None, images=req.n or 1)
    default = settings.default_max_tokens_estimate
    if isinstance(req, ChatCompletionRequest):
        most = req.max_completion_tokens or req.max_tokens or default
        return Cost(tokens=chat_prompt_tokens(req) + most * (req.n or 1))
    most = req.max_tokens if req.max_tokens is not None else COMPLETION_MAX_TOKENS  # OpenAI's and vLLM's default
    sequences = max(req.n or 1, req.best_of or 1) * _prompts(req)
    return Cost(tokens=completion_prompt_tokens(req) + most * sequences)
