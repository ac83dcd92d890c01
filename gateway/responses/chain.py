"""A request's input items as a stored response keeps them (each with an id, in the shapes of
OpenAI's ``ItemResource``), and a ``previous_response_id`` request's input rebuilt from the store:
the previous response's input items, then its output items, then the new input. The previous
response's ``instructions`` are not carried over (OpenAI's rule): only the new request's apply.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import logging

import msgspec

from engines.contract.lane import REDIS_ERRORS
from gateway.common.bounds import at_most
from gateway.errors import InvalidRequest
from gateway.responses.convert import Translated, translate
from gateway.responses.records import ResultRecords
from gateway.responses.store import store_unavailable
from gateway.settings import RequestBounds
from gateway.tenancy.principal import Principal

log = logging.getLogger("conduit.gateway")
_ITEMS = msgspec.json.Decoder(list[dict[str, Any]])
_OUTPUT = msgspec.json.Decoder(dict[str, Any])
#: The id prefix of an item of each type that came without one.
_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(12).hex()}"


def _content(role: str, content: Any) -> Any:
    """A message's content as a list of parts (an assistant's text as ``output_text``, with the
    ``annotations`` and ``logprobs`` OpenAI's output message has)."""
    if isinstance(content, str):
        return [{"type": "output_text", "text": content, "annotations": [], "logprobs": []} if role == "assistant"
                else {"type": "input_text", "text": content}]
    if role == "assistant":
        return [{**p, "annotations": p.get("annotations") or [], "logprobs": p.get("logprobs") or []}
                if p.get("type") == "output_text" else p for p in content]
    return content


#: The longest item id a client may give an item it sends (OpenAI's are about 50 characters).
MAX_ITEM_ID = 64


def stored_items(given: str | list[dict[str, Any]], prior: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """A request's ``input`` as stored: a string is one user message; each item gets an id (``msg_``,
    ``fc_``, ``fco_``, ``rs_``) and a status where it has none, and a message's content its parts. A
    client's id is kept only if it is a string of at most ``MAX_ITEM_ID`` characters that no earlier item
    of the record (``prior``: the conversation it continues) or of this input has; any other gets a fresh
    one, so ``input_items``' ``after`` finds one item. (The input was translated first: every item here
    is of a type Conduit serves.)"""
    if isinstance(given, str):
        return [{"id": _new_id("msg"), "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": given}]}]
    taken = {item.get("id") for item in prior}
    out = []
    for item in given:
        kind = item.get("type", "message")
        sent = item.get("id")
        ok = isinstance(sent, str) and 0 < len(sent) <= MAX_ITEM_ID and sent not in taken
        stored = {**item, "type": kind, "id": sent if ok else _new_id(_PREFIX[kind])}
        taken.add(stored["id"])
        if kind == "message":
            stored["content"] = _content(item["role"], item["content"])
            stored.setdefault("status", "completed")
        elif kind == "reasoning":
            stored.setdefault("summary", [])
        else:
            stored.setdefault("status", "completed")
        out.append(stored)
    return out


async def continued(t: Translated, records: ResultRecords, owner: Principal, bounds: RequestBounds) -> Translated:
    """``t`` with its conversation: the input rebuilt from the previous response (``owner``'s, 400
    ``previous_response_not_found`` otherwise, as OpenAI answers; a background one as its record
    stands: 400 ``previous_response_in_progress`` until it has ended) and translated as a whole, its
    bounds checked on the whole (a conversation holds at most ``max_messages`` items)."""
    req = t.request
    previous = req.previous_response_id
    assert previous is not None
    record = await records.store.load(owner.key_id, previous)
    if record is None:
        raise InvalidRequest(f"Previous response with id '{previous}' not found.", param="previous_response_id",
                             code="previous_response_not_found")
    try:
        response = _OUTPUT.decode(await records.current(owner, record))
    except REDIS_ERRORS as exc:
        log.warning("a background response's record cannot be read: %s", exc)
        raise store_unavailable() from None
    if response["status"] in ("queued", "in_progress"):
        raise InvalidRequest(f"Previous response with id '{previous}' is still {response['status']}; continue it "
                             "once it has ended.", param="previous_response_id", code="previous_response_in_progress")
    prior = [*_ITEMS.decode(record.input), *response["output"]]
    own = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    at_most("input", "input items (with the previous responses' input and output)", len(prior) + len(own),
            bounds.max_messages)
    whole = translate(msgspec.structs.replace(req, input=[*prior, *own]), bounds, counting=t.counting)
    whole.request = req  # the response echoes the request as it was sent
    whole.prior = prior
    return whole
