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

The rules are here; each endpoint's request type counts itself against them (its ``cost``
method: ``ChatCompletionRequest.cost``, ``CompletionRequest.cost``, ``ImageRequest.cost``), and
the shared request flow (``gateway.flow``) asks for it once per request. This module imports no
endpoint, so tenancy stays below the endpoints.
"""

from __future__ import annotations

import msgspec

#: Characters per token of the estimate.
CHARS_PER_TOKEN = 4
#: Tokens an image in a chat message is reckoned at (OpenAI's count for a 512x512 tile at high detail).
IMAGE_PART_TOKENS = 765
#: Tokens a chat message adds around its content (role, separators of the chat template).
MESSAGE_OVERHEAD_TOKENS = 4


class Cost(msgspec.Struct, frozen=True):
    """What one request takes from its key's per-minute budgets at admission."""

    #: Tokens reserved (prompt estimate + most output); None: not metered in tokens (images).
    tokens: int | None = None
    #: Images asked for.
    images: int = 0


def tokens_of(chars: int) -> int:
    """The estimated tokens of ``chars`` characters of text."""
    return -(-chars // CHARS_PER_TOKEN)
