"""A Responses request as the chat completions request its job carries.

Every chat engine (vLLM, the upstream kind, the synthetic engine) serves the Responses API this
way: ``instructions`` becomes the first (system) message, message items messages, consecutive
``function_call`` items one assistant message's ``tool_calls``, ``function_call_output`` items
tool messages; replayed ``reasoning`` items are dropped (as chat templates drop past reasoning);
function tools, ``tool_choice``, ``text.format`` and ``reasoning.effort`` map to their chat
fields. What cannot be mapped (hosted tools and their items, stored items, files) is a 400
naming it. Bounds are those chat requests have, named by the Responses parameter.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from msgspec import UNSET

from engines.contract.media import MediaPolicy, MediaRefused
from gateway.chat.protocol import ChatCompletionRequest
from gateway.common.bounds import ModelContext, at_most, nested_at_most, room
from gateway.errors import InvalidRequest
from gateway.responses.protocol import ResponseRequest, TextFormatJsonObject, TextFormatJsonSchema
from gateway.settings import RequestBounds
from gateway.tenancy.cost import Cost
from gateway.tenancy.principal import ANONYMOUS

_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
#: Input item types of hosted tools or stored state: a 400 naming the item's type.
_UNSERVED_ITEMS = {
    "item_reference": "items are not stored by this server yet; send the item itself",
}
_UNSERVED_ITEM = "items of hosted tools are not served by this server (only function tools are)"
_UNSERVED_PART = {
    "input_file": "file inputs are not served by this server",
    "input_audio": "audio inputs are not served by this server",
}


def unsupported(param: str, what: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"Unsupported value: {what} is not supported by this server: {why}.", param=param,
                          code="unsupported_value")


def _string(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        if value is None:
            raise InvalidRequest(f"Missing required parameter: '{param}.{key}'.", param=f"{param}.{key}",
                                 code="missing_required_parameter")
        raise InvalidRequest(f"Invalid type for '{param}.{key}': expected a string.", param=f"{param}.{key}",
                             code="invalid_type")
    return value


class _Input:
    """The chat messages of one request's ``instructions`` and ``input``, made item by item."""

    __slots__ = ("limits", "policy", "messages", "images", "calls_open")

    def __init__(self, limits: RequestBounds) -> None:
        self.limits = limits
        self.policy: MediaPolicy | None = None
        self.messages: list[dict[str, Any]] = []
        self.images = 0
        #: Whether the last message is an assistant message further function calls join.
        self.calls_open = False

    def item(self, i: int, item: dict[str, Any]) -> None:
        param = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            self._message(param, item)
        elif kind == "function_call":
            self._call(param, item)
        elif kind == "function_call_output":
            self._no_namespace(param, item)
            self.calls_open = False
            self.messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", param),
                                  "content": self._output(param, item.get("output"))})
        elif kind == "reasoning":
            return  # replayed reasoning: dropped from the prompt (``fields.py``)
        elif kind is None:
            raise InvalidRequest(f"Missing required parameter: '{param}.type'.", param=f"{param}.type",
                                 code="missing_required_parameter")
        else:
            raise unsupported(f"{param}.type", f"an input item of type {kind!r}",
                              _UNSERVED_ITEMS.get(str(kind), _UNSERVED_ITEM))

    def system(self, text: str) -> None:
        """A system message; one right after another joins it (Codex sends several developer
        messages in a row, and many chat templates take one system message only)."""
        last = self.messages[-1] if self.messages else None
        if last is not None and last["role"] == "system" and isinstance(last["content"], str):
            last["content"] += "\n\n" + text
        else:
            self.messages.append({"role": "system", "content": text})
        self.calls_open = False

    def _message(self, param: str, item: dict[str, Any]) -> None:
        role = item.get("role")
        role = _ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise InvalidRequest(f"Invalid value for '{param}.role': expected one of user, assistant, system, "
                                 "developer.", param=f"{param}.role", code="invalid_value")
        content = item.get("content")
        if not isinstance(content, (str, list)):
            raise InvalidRequest(f"Invalid type for '{param}.content': expected a string or a list of content "
                                 "parts.", param=f"{param}.content", code="invalid_type")
        if isinstance(content, list):
            content = self._parts(f"{param}.content", content)
        if role == "system" and isinstance(content, str):
            self.system(content)
            return
        self.messages.append({"role": role, "content": content})
        self.calls_open = role == "assistant"

    def _parts(self, param: str, parts: list[Any]) -> str | list[dict[str, Any]]:
        at_most(param, "content parts", len(parts), self.limits.max_content_parts)
        out: list[dict[str, Any]] = []
        texts = True
        for j, part in enumerate(parts):
            where = f"{param}[{j}]"
            if not isinstance(part, dict):
                raise InvalidRequest(f"Invalid type for '{where}': expected a content part object.", param=where,
                                     code="invalid_type")
            kind = part.get("type")
            if not isinstance(kind, str):
                raise InvalidRequest(f"Invalid value for '{where}.type': expected a content part type.",
                                     param=f"{where}.type", code="invalid_value")
            if kind in ("input_text", "output_text"):
                out.append({"type": "text", "text": _string(part, "text", where)})
            elif kind == "refusal":
                out.append({"type": "text", "text": _string(part, "refusal", where)})
            elif kind == "input_image":
                texts = False
                out.append(self._image(where, part))
            elif kind in _UNSERVED_PART:
                raise unsupported(f"{where}.type", f"a content part of type {kind!r}", _UNSERVED_PART[kind])
            else:
                raise InvalidRequest(f"Invalid value for '{where}.type': {kind!r} is not a content part type.",
                                     param=f"{where}.type", code="invalid_value")
        if texts:  # as vLLM renders text parts for a template that takes strings
            return "\n".join(p["text"] for p in out)
        return out

    def _image(self, where: str, part: dict[str, Any]) -> dict[str, Any]:
        if part.get("file_id") is not None:
            raise unsupported(f"{where}.file_id", "an image by `file_id`",
                              "files are not stored by this server; send `image_url` (a data: URL)")
        url = _string(part, "image_url", where)
        self.images += 1
        at_most("input", "images", self.images, self.limits.max_images)
        if self.policy is None:
            self.policy = MediaPolicy(self.limits.media_domains)
        try:
            self.policy.check(url)
        except MediaRefused as exc:
            raise InvalidRequest(exc.message, param=f"{where}.image_url", code=exc.code) from None
        image: dict[str, Any] = {"url": url}
        detail = part.get("detail")
        if isinstance(detail, str):
            image["detail"] = detail
        return {"type": "image_url", "image_url": image}

    @staticmethod
    def _no_namespace(param: str, item: dict[str, Any]) -> None:
        if item.get("namespace") is not None:
            raise unsupported(f"{param}.namespace", "a call into a tool namespace",
                              "namespaced tools are not served (only function tools are)")

    def _call(self, param: str, item: dict[str, Any]) -> None:
        self._no_namespace(param, item)
        call = {"id": _string(item, "call_id", param), "type": "function",
                "function": {"name": _string(item, "name", param), "arguments": _string(item, "arguments", param)}}
        if self.calls_open:
            last = self.messages[-1]
            calls = last.setdefault("tool_calls", [])
            at_most(param, "function calls in a row", len(calls) + 1, self.limits.max_tool_calls)
            calls.append(call)
            if last["content"] == "":
                last["content"] = None
        else:
            self.messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            self.calls_open = True

    def _output(self, param: str, output: Any) -> str:
        if isinstance(output, str):
            return output
        if isinstance(output, list):
            texts = []
            for j, part in enumerate(output):
                where = f"{param}.output[{j}]"
                if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
                    raise unsupported(where, "a function call output part other than text",
                                      "tool results reach the model as text")
                texts.append(_string(part, "text", where))
            return "\n".join(texts)
        raise InvalidRequest(f"Invalid type for '{param}.output': expected a string or a list of text parts.",
                             param=f"{param}.output", code="invalid_type")


def _tools(req: ResponseRequest, limits: RequestBounds) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(req.tools or ()):
        param = f"tools[{i}]"
        kind = tool.get("type")
        if kind == "namespace":
            raise unsupported(f"{param}.type", "a tool namespace", "declare its tools as function tools (the Codex "
                              "CLI sends one unless its config says `[agents] enabled = false`)")
        if kind != "function":
            raise unsupported(f"{param}.type", f"a tool of type {kind!r}",
                              "hosted tools are not run by this server; declare a function tool and run it yourself")
        name = _string(tool, "name", param)
        if not _FUNCTION_NAME.match(name):
            raise InvalidRequest(f"Invalid '{param}.name': {name!r} does not match '^[a-zA-Z0-9_-]{{1,64}}$'.",
                                 param=f"{param}.name", code="invalid_value")
        function: dict[str, Any] = {"name": name}
        description = tool.get("description")
        if description is not None:
            function["description"] = _string(tool, "description", param)
        parameters = tool.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise InvalidRequest(f"Invalid type for '{param}.parameters': expected an object.",
                                     param=f"{param}.parameters", code="invalid_type")
            nested_at_most(f"{param}.parameters", parameters, limits.max_json_depth)
            function["parameters"] = parameters
        strict = tool.get("strict")
        if isinstance(strict, bool):
            function["strict"] = strict
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(req: ResponseRequest, tools: list[dict[str, Any]]) -> Any:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        if choice == "required" and not tools:
            raise InvalidRequest("`tool_choice` requires `tools`.", param="tool_choice")
        return choice
    kind = choice.get("type")
    if kind != "function":
        raise unsupported("tool_choice.type", f"a tool choice of type {kind!r}",
                          "only function tools are served (or none, auto, required)")
    name = _string(choice, "name", "tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise InvalidRequest(f"Tool `{name}` named in `tool_choice` is not in `tools`.", param="tool_choice")
    return {"type": "function", "function": {"name": name}}


class Translated:
    """A decoded Responses request and the chat request its job carries: what the request flow
    (``gateway.flow``) asks of a request: ``model``, ``stream``, ``cost``."""

    __slots__ = ("request", "chat", "body", "model", "stream", "counting", "owner", "prior")

    def __init__(self, request: ResponseRequest, chat: ChatCompletionRequest, body: dict[str, Any], *,
                 counting: bool = False) -> None:
        self.request = request
        self.chat = chat
        self.body = body
        self.model = request.model
        #: Only its input's tokens are asked for (``/v1/responses/input_tokens``): never streamed, and
        #: charged as a request only.
        self.counting = counting
        self.stream = bool(request.stream) and not counting
        #: The API key the request runs as (its stored responses are that key\'s).
        self.owner = ANONYMOUS
        #: The stored items a ``previous_response_id`` continues (its input, then its output), if any.
        self.prior: list[dict[str, Any]] | None = None

    def cost(self, limits: RequestBounds) -> Cost:
        return Cost(tokens=None) if self.counting else self.chat.cost(limits)

    def job_body(self, model: ModelContext, limits: RequestBounds) -> bytes:
        """The job's body once the model's engines are known: what it may generate checked against
        them (the chat checks, their 400s naming the Responses parameters)."""
        try:
            cap = self.chat.fits(model, limits)
        except InvalidRequest as exc:
            raise renamed(exc) from None
        body = self.body
        if cap is not None:  # it named no max_output_tokens and could generate more than a request may
            body = {**body, "max_completion_tokens": cap}
        return msgspec.json.encode(body)


    def check_context(self, model: ModelContext) -> None:
        """An input certainly longer than the model's context (its characters over the most any
        token spells) is a 400, as for a response: counting it would be free work for an engine."""
        if not model.max_chars_per_token:
            return
        chars = 0
        for m in self.body["messages"]:
            content = m["content"]
            if isinstance(content, str):
                chars += len(content)
            elif content:
                chars += sum(len(p["text"]) for p in content if p["type"] == "text")
        try:
            room(model, "messages", "max_completion_tokens", None, chars)
        except InvalidRequest as exc:
            raise renamed(exc) from None


_RENAMES = (("max_completion_tokens", "max_output_tokens"), ("max_tokens", "max_output_tokens"),
            ("messages", "input"))


def renamed(exc: InvalidRequest) -> InvalidRequest:
    """A chat check's 400 with the Responses parameter names."""
    message, param = exc.message, exc.param
    for chat, responses in _RENAMES:
        message = message.replace(chat, responses)
        if param is not None:
            param = param.replace(chat, responses)
    return InvalidRequest(message, param=param, code=exc.code)


def translate(req: ResponseRequest, limits: RequestBounds, *, counting: bool = False) -> Translated:
    """``req`` as a chat completions request (see the module docstring)."""
    given = _Input(limits)
    if req.instructions:
        given.system(req.instructions)
    if isinstance(req.input, str):
        given.messages.append({"role": "user", "content": req.input})
    else:
        for i, item in enumerate(req.input):
            given.item(i, item)
    if not given.messages:
        raise InvalidRequest("Invalid 'input': it holds no message for the model (reasoning items alone are "
                             "not a prompt).", param="input", code="invalid_value")
    tools = _tools(req, limits)
    body: dict[str, Any] = {"model": req.model, "messages": given.messages}
    if tools:
        body["tools"] = tools
    choice = _tool_choice(req, tools)
    if choice is not None:
        body["tool_choice"] = choice
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "user"):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    fmt = req.text.format if req.text is not None else None
    if isinstance(fmt, TextFormatJsonSchema):
        nested_at_most("text.format.schema", fmt.schema, limits.max_json_depth)
        schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema}
        if fmt.description is not UNSET:
            schema["description"] = fmt.description
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif isinstance(fmt, TextFormatJsonObject):
        body["response_format"] = {"type": "json_object"}
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["reasoning_effort"] = req.reasoning.effort
    if req.logprobs():
        body["logprobs"] = True
        body["top_logprobs"] = req.top_logprobs or 0
    if req.stream and not counting:
        body["stream"] = True
    try:
        chat = msgspec.convert(body, ChatCompletionRequest)
    except msgspec.ValidationError as exc:  # what the item checks above let through
        raise InvalidRequest(f"Invalid request: {exc}.", param="input", code="invalid_value") from None
    return Translated(req, chat, body, counting=counting)
