"""One response's output, made from its chat job's deltas: its items (reasoning, message, function
calls, in the order the model produced them) and, for a streamed response, OpenAI's events in the
spec's order, each with its ``sequence_number``.

An item opens at its first output and closes when output of another item begins or the job ends:
reasoning text is one ``reasoning`` item, text one ``message`` item with one ``output_text`` part,
each tool call one ``function_call`` item. Events: ``response.created``, ``response.in_progress``;
per item ``response.output_item.added``, then for a message (and reasoning)
``response.content_part.added``, its text deltas, their ``.done``, ``response.content_part.done``;
for a call ``response.function_call_arguments.delta``/``.done``; ``response.output_item.done``;
then ``response.completed`` or ``response.incomplete`` (or ``error`` and ``response.failed``).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from engines.contract.messages import ChoiceDelta, Usage
from gateway.errors import ConduitError
from gateway.responses.objects import (
    FunctionCallItem,
    IncompleteDetails,
    LogProb,
    MessageItem,
    OutputItem,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponseError,
    ResponseObject,
    logprobs_of,
    usage_of,
)

_MESSAGE, _REASONING, _CALL = 0, 1, 2
_ENC = msgspec.json.Encoder()
_NO_LOGPROBS = b"[]"


class _Open:
    """The item being made: its kind, place and what it has so far."""

    __slots__ = ("kind", "index", "id", "text", "logprobs", "tool", "name", "call_id", "head")

    def __init__(self, kind: int, index: int, item_id: str) -> None:
        self.kind = kind
        self.index = index
        self.id = item_id
        self.text: list[str] = []
        self.logprobs: list[LogProb] = []
        self.tool = -1
        self.name = ""
        self.call_id = ""
        #: The JSON every delta event of this item starts with (streaming).
        self.head = b""


def response_error(exc: ConduitError) -> ResponseError:
    """A failure as the ``Response.error`` OpenAI's codes allow."""
    code = "rate_limit_exceeded" if exc.status == 429 else "invalid_prompt" if exc.status == 400 else "server_error"
    return ResponseError(code=code, message=exc.message)


class ResponseOutput:
    """A response's output items as its deltas arrive; with ``stream``, its events appended to the
    ``out`` each call is given."""

    __slots__ = ("head", "hex", "stream", "items", "open", "seq", "finish", "begun")

    def __init__(self, head: ResponseObject, *, stream: bool) -> None:
        #: The response as asked (echoed fields), status in_progress and no output.
        self.head = head
        self.hex = head.id.partition("_")[2]
        self.stream = stream
        self.items: list[OutputItem] = []
        self.open: _Open | None = None
        self.seq = 0
        self.finish: str | None = None
        self.begun = False

    # ---- events -------------------------------------------------------------------------

    def _event(self, out: bytearray, kind: str, fields: dict[str, Any]) -> None:
        fields["sequence_number"] = self.seq
        self.seq += 1
        out += b"event: " + kind.encode() + b"\ndata: " + _ENC.encode({"type": kind, **fields}) + b"\n\n"

    def begin(self, out: bytearray) -> None:
        """``response.created`` and ``response.in_progress`` (once)."""
        if self.stream and not self.begun:
            self.begun = True
            self._event(out, "response.created", {"response": self.head})
            self._event(out, "response.in_progress", {"response": self.head})

    # ---- items --------------------------------------------------------------------------

    def restart(self) -> None:
        """Another attempt runs the job from scratch (nothing was shown): forget its output."""
        self.items.clear()
        self.open = None
        self.finish = None

    def add(self, d: ChoiceDelta, out: bytearray) -> None:
        """One delta of the response's (only) choice."""
        if d.reasoning:
            self._text(_REASONING, d.reasoning, None, out)
        if d.text or d.logprobs:  # a token may add no text yet (part of a character): its logprob still counts
            self._text(_MESSAGE, d.text, d.logprobs, out)
        for tc in d.tool_calls:
            item = self.open
            if item is None or item.kind != _CALL or item.tool != tc.index:
                item = self._start(_CALL, out, tc)
            if tc.name and not item.name:
                item.name = tc.name
            if tc.arguments:
                item.text.append(tc.arguments)
                if self.stream:
                    self._event(out, "response.function_call_arguments.delta",
                                {"item_id": item.id, "output_index": item.index, "delta": tc.arguments})
        if d.finish_reason is not None:
            self.finish = d.finish_reason

    def _text(self, kind: int, text: str, logprobs: Any, out: bytearray) -> None:
        item = self.open
        if item is None or item.kind != kind:
            item = self._start(kind, out)
        item.text.append(text)
        lp = logprobs_of(logprobs) if logprobs else None
        if lp:
            item.logprobs.extend(lp)
        if self.stream:
            seq = self.seq
            self.seq += 1
            if kind == _MESSAGE:
                out += b"event: response.output_text.delta\ndata: " + item.head + _ENC.encode(text) + \
                    b',"logprobs":' + (_ENC.encode(lp) if lp else _NO_LOGPROBS) + b',"sequence_number":%d}\n\n' % seq
            else:
                out += b"event: response.reasoning_text.delta\ndata: " + item.head + _ENC.encode(text) + \
                    b',"sequence_number":%d}\n\n' % seq

    def _start(self, kind: int, out: bytearray, tc: Any = None) -> _Open:
        self._close(out, "completed")
        index = len(self.items)
        prefix = ("msg", "rs", "fc")[kind]
        item = self.open = _Open(kind, index, f"{prefix}_{self.hex}{index:02d}")
        if kind == _CALL:
            item.tool = tc.index
            item.name = tc.name or ""
            item.call_id = tc.id or f"call_{self.hex}{index:02d}"
        if not self.stream:
            return item
        self._event(out, "response.output_item.added", {"output_index": index, "item": self._item(item, "in_progress")})
        if kind == _CALL:
            return item
        part = OutputText(text="", annotations=[], logprobs=[]) if kind == _MESSAGE else ReasoningText(text="")
        self._event(out, "response.content_part.added",
                    {"item_id": item.id, "output_index": index, "content_index": 0, "part": part})
        name = "response.output_text.delta" if kind == _MESSAGE else "response.reasoning_text.delta"
        item.head = (b'{"type":"%s","item_id":"%s","output_index":%d,"content_index":0,"delta":'
                     % (name.encode(), item.id.encode(), index))
        return item

    def _item(self, item: _Open, status: str) -> OutputItem:
        text = "".join(item.text)
        if item.kind == _MESSAGE:
            return MessageItem(id=item.id, status=status, content=[  # type: ignore[arg-type]
                OutputText(text=text, annotations=[], logprobs=item.logprobs)] if text or status != "in_progress"
                else [])
        if item.kind == _REASONING:
            return ReasoningItem(id=item.id, summary=[], status=status,  # type: ignore[arg-type]
                                 content=[ReasoningText(text=text)] if text or status != "in_progress" else [])
        return FunctionCallItem(id=item.id, call_id=item.call_id, name=item.name, arguments=text,
                                status=status)  # type: ignore[arg-type]

    def _close(self, out: bytearray, status: str) -> None:
        item = self.open
        if item is None:
            return
        self.open = None
        done = self._item(item, status)
        self.items.append(done)
        if not self.stream:
            return
        at = {"item_id": item.id, "output_index": item.index}
        if item.kind == _CALL:
            self._event(out, "response.function_call_arguments.done",
                        {**at, "name": item.name, "arguments": done.arguments})  # type: ignore[union-attr]
        else:
            part = done.content[0]  # type: ignore[union-attr]
            if item.kind == _MESSAGE:
                self._event(out, "response.output_text.done",
                            {**at, "content_index": 0, "text": part.text, "logprobs": item.logprobs})
            else:
                self._event(out, "response.reasoning_text.done", {**at, "content_index": 0, "text": part.text})
            self._event(out, "response.content_part.done", {**at, "content_index": 0, "part": part})
        self._event(out, "response.output_item.done", {"output_index": item.index, "item": done})

    # ---- the end ------------------------------------------------------------------------

    def finished(self, usage: Usage, out: bytearray, now: int | None = None) -> ResponseObject:
        """The response once its job is done (its last events appended when streaming); ``now``: its
        completion time (a background response's is its result record's, the same on every replica)."""
        reason = self.finish
        incomplete = reason == "length" or reason == "content_filter"
        self._close(out, "incomplete" if incomplete else "completed")
        if now is None:
            now = int(time.time())
        response = msgspec.structs.replace(
            self.head, status="incomplete" if incomplete else "completed", output=self.items, usage=usage_of(usage),
            completed_at=None if incomplete else now,
            incomplete_details=IncompleteDetails("max_output_tokens" if reason == "length" else "content_filter")
            if incomplete else None)
        if self.stream:
            self.begin(out)
            self._event(out, "response.incomplete" if incomplete else "response.completed", {"response": response})
        return response

    def failed(self, exc: ConduitError) -> bytes:
        """The stream's end after a failure: ``error``, then ``response.failed``."""
        out = bytearray()
        self.failure(exc, out)
        return bytes(out)

    def failure(self, exc: ConduitError, out: bytearray) -> ResponseObject:
        """The response failed (its partial output incomplete); streaming, ``error`` and then
        ``response.failed`` appended to ``out``."""
        response = msgspec.structs.replace(self.head, status="failed", output=self.so_far("incomplete"),
                                           error=response_error(exc))
        if self.stream:
            self.begin(out)
            self._event(out, "error", {"code": exc.code, "message": exc.message, "param": exc.param})
            self._event(out, "response.failed", {"response": response})
        return response

    def so_far(self, status: str) -> list[OutputItem]:
        """The output items made so far, an open one with ``status``."""
        return self.items if self.open is None else [*self.items, self._item(self.open, status)]
