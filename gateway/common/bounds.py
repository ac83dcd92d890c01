"""The door's bounds on what one generation request may do, shared by chat and completions.

Checked once the model's engines are known (:class:`ModelContext`, what they announce), before
anything is queued: a prompt against the model's context, ``n`` x ``max_tokens`` x (1 + logprob
candidates) against ``max_output_work``, the sequences a request takes of an engine's batch, and
the sizes of a request's parts (``at_most``, ``nested_at_most``), each a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gateway.errors import InvalidRequest
from gateway.settings import RequestBounds


class ModelContext(NamedTuple):
    """What the live engines of a model announce (``EngineInfo``; None: not announced)."""

    #: Tokens of prompt and output together (the smallest of the model's engines).
    max_model_len: int | None = None
    #: The most characters one token of the model's vocabulary spells (its longest entry): a text
    #: of ``c`` characters is at least ``c / max_chars_per_token`` tokens, as vLLM reckons too.
    max_chars_per_token: int | None = None
    #: Sequences an engine of the model runs at once (its batch; the smallest of its engines).
    max_sequences: int | None = None
    #: The length of the model's vectors (an embedding model's; the largest of its engines).
    embedding_size: int | None = None

def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8: the most tokens it can be (byte-level vocabularies)."""
    return len(text) if text.isascii() else len(text.encode())


def context_exceeded(context: int, tokens: int, param: str, *, exact: bool) -> None:
    what = "your messages resulted in" if param == "messages" else "your prompt contains"
    raise InvalidRequest(f"This model's maximum context length is {context} tokens. However, {what} "
                         f"{'' if exact else 'at least '}{tokens} tokens. Please reduce the length of the {param}.",
                         param=param, code="context_length_exceeded")


def room(model: ModelContext, prompt_param: str, param: str, most: int | None, chars: int,
          prompt_tokens: int = 0) -> int | None:
    """The most tokens one choice may generate: ``most`` (the request's ``max_tokens``) within the
    model's context less the prompt (``chars`` of text, or ``prompt_tokens`` known), as vLLM clamps it.
    Refuses a ``max_tokens`` over the whole context and a prompt that fills it (as vLLM would, but
    before the request costs a queue slot and a tokenisation)."""
    context = model.max_model_len
    if context is None:
        return most
    if most is not None and most > context:
        raise InvalidRequest(f"{param} is too large: {most}. This model supports at most {context} completion "
                             f"tokens, whereas you provided {most}.", param=param, code="invalid_value")
    if chars and model.max_chars_per_token:
        prompt_tokens = -(-chars // model.max_chars_per_token)
        if prompt_tokens >= context:
            context_exceeded(context, prompt_tokens, prompt_param, exact=False)
    room = context - prompt_tokens
    return room if most is None else min(most, room)


def step_at_most(limits: RequestBounds, model: ModelContext, sequences: int, top: int, top_param: str) -> None:
    """Refuse a request that would take more than ``max_batch_share`` of an engine's batch, or whose
    every engine step makes more than ``max_step_candidates`` tokens and logprob candidates: an
    engine renders each of them on the loop that also serves every other request."""
    if model.max_sequences is not None:
        share = max(int(model.max_sequences * limits.max_batch_share), 1)
        if sequences > share:
            raise InvalidRequest(f"Invalid 'n': this request asks for {sequences} sequences at once, but this model's "
                                 f"engines run {model.max_sequences} at a time and one request may take at most "
                                 f"{share}.", param="n", code="invalid_value")
    per_step = sequences * (1 + top)
    if per_step > limits.max_step_candidates:
        raise InvalidRequest(f"Invalid '{top_param if top else 'n'}': this request makes {per_step} tokens and logprob "
                             f"candidates a step ({sequences} sequences x (1 + {top} candidates)), but this server "
                             f"allows at most {limits.max_step_candidates}. Lower `n` or `{top_param}`.",
                             param=top_param if top else "n", code="invalid_value")


def work_at_most(limits: RequestBounds, most: int | None, sequences: int, top: int, echoed: int, param: str,
                  top_param: str, *, defaulted: bool) -> int | None:
    """Refuse a request whose output (tokens of every choice with their logprob candidates, plus what
    ``echo`` / ``prompt_logprobs`` return) may pass ``max_output_work``; for one that named no
    ``max_tokens`` (``defaulted``), the largest ``max_tokens`` that fits instead (None: it fits)."""
    per_choice = most if most is not None else limits.default_max_tokens_estimate
    work = sequences * per_choice * (1 + top) + echoed
    if work <= limits.max_output_work:
        return None
    if defaulted:  # as a model's own output limit caps a request that names none (OpenAI's too)
        cap = (limits.max_output_work - echoed) // (sequences * (1 + top))
        if cap >= 1:
            return cap
    unset = (f" (`{param}` is unset: the model's context less the prompt)" if most is not None else
             f" (`{param}` is unset)") if defaulted else ""
    factors = [f"{sequences} choices", f"{per_choice} tokens each{unset}"]
    if top:
        factors.append(f"1 + {top} logprob candidates per token")
    if echoed:
        factors.append(f"plus {echoed} tokens and candidates echoed from the prompt")
    raise InvalidRequest(f"Invalid '{param}': this request may generate up to {work} tokens and logprob candidates "
                         f"({', '.join(factors)}), but this server allows at most {limits.max_output_work} per "
                         f"request. Lower `n`, `{param}` or `{top_param}`.", param=param, code="invalid_value")


def min_tokens_at_most(min_tokens: int | None, most: int | None) -> None:
    """vLLM's own rule, here so that an engine is not asked (an engine's refusal is charged a request)."""
    if min_tokens and most is not None and min_tokens > most:
        raise InvalidRequest(f"Invalid 'min_tokens': it must be at most `max_tokens` ({most}), but got {min_tokens}.",
                             param="min_tokens", code="invalid_value")


def at_most(param: str, what: str, count: int, limit: int) -> None:
    if count > limit:
        raise InvalidRequest(f"Invalid '{param}': too many {what}. This server accepts at most {limit}, but got "
                             f"{count}.", param=param, code="invalid_value")


def nested_at_most(param: str, value: Any, limit: int) -> None:
    """Refuse decoded JSON nested deeper than ``limit`` objects/arrays (``{}`` is 1 deep).

    Level by level, without recursion; ``type() is`` rather than ``isinstance`` keeps it to
    about 60 ns a node (decoding the node cost more).
    """
    level = [value] if type(value) is dict or type(value) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise InvalidRequest(f"Invalid '{param}': nested too deeply. This server accepts JSON nested at most "
                                 f"{limit} levels deep.", param=param, code="invalid_value")
        below: list[Any] = []
        append = below.append
        for v in level:
            for c in (v.values() if type(v) is dict else v):
                if type(c) is dict or type(c) is list:
                    append(c)
        level = below


