"""The chat and completions requests (``gateway/*/protocol.py``) through ``RequestDecoder``: valid
bodies pass, invalid ones name the field; the error envelope."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway.errors import InvalidRequest, encode_error
from gateway.settings import RequestBounds
from gateway.chat.protocol import ChatCompletionRequest, ImagePart, NamedToolChoice, TextPart
from gateway.common.bounds import ModelContext
from gateway.common.decoding import RequestDecoder
from gateway.common.protocol import REFUSED, JsonSchemaResponseFormat
from gateway.completions.protocol import CompletionRequest
from gateway.models.protocol import Model, ModelList
from tests.openai_schema import validate

USER = {"role": "user", "content": "Hello"}


class Decoders:
    """The chat and completions decoders, as the gateway builds them."""

    def __init__(self, limits: RequestBounds | None = None) -> None:
        self.chat = RequestDecoder(ChatCompletionRequest, limits).decode
        self.completion = RequestDecoder(CompletionRequest, limits).decode


@pytest.fixture(scope="module")
def decoder() -> Decoders:
    return Decoders()


def chat_body(**fields: Any) -> bytes:
    return json.dumps({"model": "tiny", "messages": [USER], **fields}).encode()


def completion_body(**fields: Any) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "Once upon", **fields}).encode()


def rejected(call: Any, body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        call(body)
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.message
    return err


# ---- chat: valid -----------------------------------------------------------------------------


def test_chat_minimal(decoder: Decoders) -> None:
    req = decoder.chat(chat_body())
    assert isinstance(req, ChatCompletionRequest)
    assert req.model == "tiny"
    assert req.messages[0].role == "user" and req.messages[0].content == "Hello"
    assert req.stream is None and req.stop is None


def test_chat_content_parts(decoder: Decoders) -> None:
    req = decoder.chat(json.dumps({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in"},
        {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
    ]}]}).encode())
    text, image = req.messages[0].content  # type: ignore[misc]
    assert isinstance(text, TextPart) and text.text == "What is in"
    assert isinstance(image, ImagePart) and image.image_url.url == PNG


PNG = "data:image/png;base64,iVBORw0KGgo="


def image_body(url: str, *, before: int = 0) -> bytes:
    """A chat request whose image is at ``url``, in its last message (after ``before`` others)."""
    return json.dumps({"model": "tiny", "messages": [USER] * before + [{"role": "user", "content": [
        {"type": "text", "text": "What is in"}, {"type": "image_url", "image_url": {"url": url}}]}]}).encode()


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/a.png", "http://169.254.169.254/latest/meta-data/",
                                 "https://example.com/a.png", "http://2130706433/", "file:///etc/passwd", "a.png"])
def test_image_urls_are_refused_by_default(decoder: Decoders, url: str) -> None:
    """Engines fetch image URLs from inside their network: by default none is accepted, only data: URLs."""
    err = rejected(decoder.chat, image_body(url))
    assert (err.param, err.code) == ("messages[0].content[1].image_url.url", "media_url_not_allowed")
    assert "data:" in err.message


def test_image_urls_of_allowed_domains_at_public_addresses_only() -> None:
    chat = Decoders(RequestBounds(media_domains=["example.com", "127.0.0.1"])).chat
    chat(image_body("https://example.com/a.png"))
    chat(image_body(PNG))
    for url, code in (("https://evil.example.org/a.png", "media_domain_not_allowed"),
                      ("http://0x7f.1/a.png", "media_address_not_allowed"),
                      ("https://example.com\\@127.0.0.1/", "invalid_media_url")):
        err = rejected(chat, image_body(url, before=2))
        assert (err.param, err.code) == ("messages[2].content[1].image_url.url", code)


def test_chat_tool_conversation(decoder: Decoders) -> None:
    body = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "Be brief."},
            USER,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
        ],
        "tools": [
            {"type": "function", "function": {
                "name": "get_weather", "description": "Weather now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "get_time"}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    }
    req = decoder.chat(json.dumps(body).encode())
    assert [m.role for m in req.messages] == ["system", "user", "assistant", "tool"]
    assert req.messages[2].tool_calls is not None and req.messages[2].tool_calls[0].function.name == "get_weather"
    assert req.messages[3].tool_call_id == "call_1"
    assert isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name == "get_weather"
    assert req.tools is not None and [t.function.name for t in req.tools] == ["get_weather", "get_time"]


@pytest.mark.parametrize("choice", ["none", "auto", "required"])
def test_chat_tool_choice_strings(decoder: Decoders, choice: str) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert decoder.chat(chat_body(tools=tools, tool_choice=choice)).tool_choice == choice


def test_chat_response_format_json_schema(decoder: Decoders) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    req = decoder.chat(chat_body(response_format={"type": "json_schema", "json_schema": {
        "name": "answer_1", "schema": schema, "strict": True}}))
    assert isinstance(req.response_format, JsonSchemaResponseFormat)
    assert req.response_format.json_schema.schema == schema
    assert req.response_format.json_schema.strict is True


@pytest.mark.parametrize("stop", ["\n", ["a"], ["a", "b", "c", "d"], None])
def test_chat_stop(decoder: Decoders, stop: Any) -> None:
    assert decoder.chat(chat_body(stop=stop)).stop == stop


def test_chat_streaming_options_and_sampling(decoder: Decoders) -> None:
    req = decoder.chat(chat_body(stream=True, stream_options={"include_usage": True}, temperature=2, top_p=0,
                                 n=3, logprobs=True, top_logprobs=20, seed=-1, max_completion_tokens=5))
    assert req.stream_options is not None and req.stream_options.include_usage is True
    assert (req.temperature, req.n, req.top_logprobs) == (2, 3, 20)


def test_chat_unknown_fields_pass_through(decoder: Decoders) -> None:
    # vLLM extensions are let through to the engine.
    req = decoder.chat(chat_body(top_k=5, min_p=0.1, messages=[{**USER, "extra": 1}]))
    assert req.model == "tiny"


# ---- chat: invalid ---------------------------------------------------------------------------


def test_malformed_json(decoder: Decoders) -> None:
    err = rejected(decoder.chat, b'{"model": "tiny", "messages": [')
    assert err.code == "invalid_json"
    assert err.param is None


@pytest.mark.parametrize("body", [b"", b"   \n"])
def test_empty_body(decoder: Decoders, body: bytes) -> None:
    err = rejected(decoder.chat, body)
    assert err.param is None
    assert "empty" in err.message


def test_body_not_an_object(decoder: Decoders) -> None:
    err = rejected(decoder.chat, b"[1, 2]")
    assert err.param is None


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"messages": [USER]}, "model", "missing_required_parameter"),
    ({"model": "tiny"}, "messages", "missing_required_parameter"),
    ({"model": "tiny", "messages": []}, "messages", "invalid_value"),
    ({"model": "tiny", "messages": [{"role": 1, "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"model": "tiny", "messages": [USER, {"role": "robot", "content": "x"}]}, "messages[1].role", "invalid_value"),
    ({"model": "tiny", "messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "messages[0].content[0].type", "invalid_value"),
    ({"model": 5, "messages": [USER]}, "model", "invalid_value"),
])
def test_chat_schema_errors_name_the_field(decoder: Decoders, body: dict[str, Any], param: str,
                                           code: str) -> None:
    err = rejected(decoder.chat, json.dumps(body).encode())
    assert err.param == param
    assert err.code == code
    assert param in err.message


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": 3}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 7}, "stop"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "has space"}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
])
def test_chat_out_of_range(decoder: Decoders, fields: dict[str, Any], param: str) -> None:
    err = rejected(decoder.chat, chat_body(**fields))
    assert err.param == param
    assert err.code == "invalid_value"


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"top_logprobs": 2, "logprobs": False}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "get_time"}}],
      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
])
def test_chat_cross_field_rules(decoder: Decoders, fields: dict[str, Any], param: str) -> None:
    err = rejected(decoder.chat, chat_body(**fields))
    assert err.param == param


def test_unknown_tool_is_named(decoder: Decoders) -> None:
    err = rejected(decoder.chat, chat_body(tools=[{"type": "function", "function": {"name": "a"}}],
                                           tool_choice={"type": "function", "function": {"name": "zeta"}}))
    assert "zeta" in err.message


# ---- completions -----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["Once upon", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_forms(decoder: Decoders, prompt: Any) -> None:
    req = decoder.completion(completion_body(prompt=prompt))
    assert isinstance(req, CompletionRequest)
    assert req.prompt == prompt


@pytest.mark.parametrize(("prompt", "param"), [
    (["a", 1], "prompt"),
    ([[1, 2], 3], "prompt"),
    (["a", [1]], "prompt"),
    ([], "prompt"),
    ([[]], "prompt[0]"),
    ([["a"]], "prompt[0][0]"),
    (None, "prompt"),
    ({"text": "x"}, "prompt"),
])
def test_completion_bad_prompt(decoder: Decoders, prompt: Any, param: str) -> None:
    assert rejected(decoder.completion, completion_body(prompt=prompt)).param == param


def test_completion_missing_prompt(decoder: Decoders) -> None:
    err = rejected(decoder.completion, b'{"model": "tiny"}')
    assert (err.param, err.code) == ("prompt", "missing_required_parameter")


@pytest.mark.parametrize(("fields", "param"), [
    ({"logprobs": 6}, "logprobs"),
    ({"stop": ["1", "2", "3", "4", "5"]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"stream": True, "best_of": 3}, "best_of"),
    ({"n": 0}, "n"),
])
def test_completion_invalid(decoder: Decoders, fields: dict[str, Any], param: str) -> None:
    assert rejected(decoder.completion, completion_body(**fields)).param == param


def test_completion_valid_options(decoder: Decoders) -> None:
    req = decoder.completion(completion_body(echo=True, logprobs=5, max_tokens=0, suffix="!", best_of=2, n=2,
                                             stream=True, stream_options={"include_usage": True}, stop="\n"))
    assert (req.logprobs, req.max_tokens, req.best_of) == (5, 0, 2)


# ---- bounds on one request's work (RequestBounds.max_*) -------------------------------------

LIMITS = RequestBounds()
TOOL = {"type": "function", "function": {"name": "f"}}
CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def nested(depth: int) -> dict[str, Any]:
    """An object ``depth`` containers deep (``{}`` is 1), objects and arrays alternating."""
    value: Any = {}
    for level in range(depth - 1, 0, -1):
        value = {"p": value} if level % 2 else [value]
    return value  # type: ignore[no-any-return]


# (endpoint, request fields for a count, the default limit on that count, param named beyond it)
BOUNDS = [
    pytest.param("chat", lambda k: {"messages": [USER] * k}, LIMITS.max_messages, "messages", id="messages"),
    pytest.param("chat", lambda k: {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * k}]},
                 LIMITS.max_content_parts, "messages[0].content", id="content-parts"),
    # Images are counted over the whole request, not per message.
    pytest.param("chat", lambda k: {"messages": [{"role": "user", "content": [IMAGE] * (k // 2)},
                                                 {"role": "user", "content": [IMAGE] * (k - k // 2)}]},
                 LIMITS.max_images, "messages", id="images"),
    pytest.param("chat", lambda k: {"messages": [USER, {"role": "assistant", "tool_calls": [CALL] * k}]},
                 LIMITS.max_tool_calls, "messages[1].tool_calls", id="tool-calls"),
    pytest.param("chat", lambda k: {"tools": [TOOL] * k}, LIMITS.max_tools, "tools", id="tools"),
    pytest.param("chat", lambda k: {"logit_bias": {str(i): 1 for i in range(k)}}, LIMITS.max_logit_bias,
                 "logit_bias", id="chat-logit-bias"),
    pytest.param("chat", lambda k: {"tools": [TOOL, {"type": "function", "function": {
        "name": "g", "parameters": nested(k)}}]}, LIMITS.max_json_depth, "tools[1].function.parameters",
                 id="tool-parameters-depth"),
    pytest.param("chat", lambda k: {"response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": nested(k)}}}, LIMITS.max_json_depth, "response_format.json_schema.schema",
                 id="json-schema-depth"),
    pytest.param("completion", lambda k: {"prompt": ["a"] * k}, LIMITS.max_prompts, "prompt", id="prompts"),
    pytest.param("completion", lambda k: {"prompt": [7] * k}, LIMITS.max_prompt_tokens, "prompt", id="token-ids"),
    pytest.param("completion", lambda k: {"prompt": [[7], [7] * k]}, LIMITS.max_prompt_tokens, "prompt[1]",
                 id="token-ids-in-a-batch"),
    pytest.param("completion", lambda k: {"logit_bias": {str(i): 1 for i in range(k)}}, LIMITS.max_logit_bias,
                 "logit_bias", id="completion-logit-bias"),
]


@pytest.mark.parametrize(("endpoint", "fields", "limit", "param"), BOUNDS)
def test_bound_at_the_limit_passes_one_over_is_400(decoder: Decoders, endpoint: str, fields: Any,
                                                    limit: int, param: str) -> None:
    make = chat_body if endpoint == "chat" else completion_body
    call = decoder.chat if endpoint == "chat" else decoder.completion
    call(make(**fields(limit)))
    err = rejected(call, make(**fields(limit + 1)))
    assert (err.param, err.code) == (param, "invalid_value")
    assert f"'{param}'" in err.message and str(limit) in err.message


def test_defaults_are_openais_limits() -> None:
    # Where OpenAI enforces a limit, every request it accepts is accepted here too.
    assert (LIMITS.max_choices, LIMITS.max_messages, LIMITS.max_images, LIMITS.max_tools, LIMITS.max_tool_calls,
            LIMITS.max_logit_bias) == (128, 2048, 500, 128, 128, 300)


@pytest.mark.parametrize(("fields", "param"), [
    ({"prompt": ["a", "b"], "n": 64}, None),         # 128 choices
    ({"prompt": ["a", "b", "c"], "n": 43}, "n"),     # 129
    ({"prompt": [1, 2, 3], "n": 128}, None),         # one token-id prompt
    ({"prompt": [[1], [2]], "n": 128}, "n"),         # two token-id prompts: 256
    ({"prompt": ["a"] * 6, "best_of": 20}, None),    # 120 sequences sampled
    ({"prompt": ["a"] * 7, "n": 2, "best_of": 20}, "best_of"),  # 140: best_of is what to lower
    ({"prompt": ["a"] * 20_000, "n": 128}, "prompt"),  # the issue's 100 KB body
])
def test_completion_choices_are_n_times_prompts(decoder: Decoders, fields: dict[str, Any],
                                                param: str | None) -> None:
    body = completion_body(**fields)
    if param is None:
        decoder.completion(body)
        return
    err = rejected(decoder.completion, body)
    assert (err.param, err.code) == (param, "invalid_value")
    assert "128" in err.message


def test_limits_come_from_the_settings() -> None:
    decoder = Decoders(RequestBounds(max_choices=4, max_prompts=2, max_messages=1))
    assert decoder.chat(chat_body(n=4)).n == 4
    assert rejected(decoder.chat, chat_body(n=5)).param == "n"
    assert rejected(decoder.chat, chat_body(messages=[USER, USER])).param == "messages"
    decoder.completion(completion_body(prompt=["a", "b"], n=2))
    assert rejected(decoder.completion, completion_body(prompt=["a", "b", "c"])).param == "prompt"
    assert rejected(decoder.completion, completion_body(prompt=["a", "b"], n=3)).param == "n"


# ---- the error envelope ----------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{", b"", chat_body(temperature=3), b'{"model": "tiny"}',
                                  chat_body(top_logprobs=1)])
def test_error_envelope_matches_openai(decoder: Decoders, body: bytes) -> None:
    err = rejected(decoder.chat, body)
    envelope = msgspec.json.decode(encode_error(err))
    assert list(envelope) == ["error"]
    assert set(envelope["error"]) == {"message", "type", "param", "code"}
    assert envelope["error"]["message"] == err.message
    assert envelope["error"]["param"] == err.param
    assert isinstance(envelope["error"]["code"], str) and envelope["error"]["code"]
    validate("ErrorResponse", envelope)


def test_error_envelope_keeps_param() -> None:
    envelope = msgspec.json.decode(encode_error(InvalidRequest("bad", param="messages[0].role", code="invalid_value")))
    assert envelope == {"error": {"message": "bad", "type": "invalid_request_error", "param": "messages[0].role",
                                  "code": "invalid_value"}}
    validate("ErrorResponse", envelope)


# ---- GET /v1/models ---------------------------------------------------------------------------


def test_model_list_matches_openai() -> None:
    body = msgspec.json.decode(msgspec.json.encode(ModelList(data=[Model(id="tiny", created=1_700_000_000),
                                                                   Model(id="big", created=5, owned_by="me")])))
    validate("ListModelsResponse", body)
    assert body == {"object": "list", "data": [
        {"id": "tiny", "created": 1_700_000_000, "object": "model", "owned_by": "conduit"},
        {"id": "big", "created": 5, "object": "model", "owned_by": "me"}]}
    validate("ListModelsResponse", {"object": "list", "data": []})


# ---- bodies msgspec cannot even read are still a 400, never a 500 -----------------------------


@pytest.mark.parametrize("body", [
    b'{"model": "tiny", "messages": [{"role": "user", "content": "caf\xe9"}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "extra": ' + b"[" * 100_000
    + b"]" * 100_000 + b"}",
], ids=["invalid-utf8", "deeply-nested"])
def test_undecodable_bodies_are_invalid_json(decoder: Decoders, body: bytes) -> None:
    err = rejected(decoder.chat, body)
    assert err.code == "invalid_json"


# ---- what a request may generate, against the model's context (ModelContext) ------------------

TINY = ModelContext(max_model_len=2048, max_chars_per_token=16)
ISSUE_BODY = {"n": 128, "max_tokens": 1000, "logprobs": True, "top_logprobs": 20, "ignore_eos": True}


def fits(decoder: Decoders, body: bytes, model: ModelContext = TINY, **settings: Any) -> InvalidRequest | None:
    req = decoder.completion(body) if b'"prompt"' in body else decoder.chat(body)
    try:
        req.fits(model, RequestBounds(**settings))
    except InvalidRequest as exc:
        return exc
    return None


def test_the_issue_body_is_refused_at_the_door(decoder: Decoders) -> None:
    """128 x (1 + 20) = 2,688 candidates a step (max 256); and 128 x 1000 x 21 = 2,688,000 in all."""
    err = fits(decoder, chat_body(**ISSUE_BODY))
    assert err is not None and err.param == "top_logprobs" and err.code == "invalid_value"
    assert "2688 tokens and logprob candidates a step" in err.message
    err = fits(decoder, chat_body(**ISSUE_BODY), max_step_candidates=4096)
    assert err is not None and err.param == "max_tokens" and "2688000" in err.message and "524288" in err.message


@pytest.mark.parametrize("model", [TINY, ModelContext()])
def test_the_output_one_request_may_cause_is_bounded(decoder: Decoders, model: ModelContext) -> None:
    """n x max_tokens x (1 + top_logprobs) at most max_output_work (524,288), context known or not."""
    largest = {"n": 12, "logprobs": True, "top_logprobs": 20, "max_tokens": 2040}  # 252 a step, 514,080 in all
    assert fits(decoder, chat_body(**largest), model) is None
    err = fits(decoder, chat_body(**{**largest, "max_tokens": 2100}), model)
    if model.max_model_len is None:
        assert fits(decoder, chat_body(**{**largest, "max_tokens": 2080}), model) is None  # 524,160
        assert err is not None and err.param == "max_tokens" and "529200" in err.message
    else:
        assert err is not None and "at most 2048" in err.message  # more than the whole context
    assert fits(decoder, chat_body(**{**largest, "n": 13}), model) is not None  # 273 a step


def test_without_max_tokens_a_request_is_capped_not_refused(decoder: Decoders) -> None:
    """A chat request that names no max_tokens may run to the context; where that could pass
    max_output_work it gets the largest max_tokens that fits (as a model's own output limit caps
    it), and one that names a max_tokens over it is refused."""
    long = ModelContext(max_model_len=131_072, max_chars_per_token=16)
    body = chat_body(n=5, logprobs=True, top_logprobs=5)  # 5 x 131,071 x 6 could be 3.9 M
    assert decoder.chat(body).fits(long, RequestBounds()) == 524_288 // 30
    assert decoder.chat(chat_body(n=5)).fits(long, RequestBounds()) == 524_288 // 5
    assert decoder.chat(chat_body()).fits(long, RequestBounds()) is None  # 131,071 fits
    assert fits(decoder, chat_body(n=5, logprobs=True, top_logprobs=5, max_tokens=20_000), long) is not None
    assert decoder.chat(chat_body(n=12, logprobs=True, top_logprobs=20)).fits(TINY, RequestBounds()) is None
    # Completions default to 16 tokens, as OpenAI's and vLLM's do: nothing to cap.
    assert decoder.completion(completion_body(n=5, logprobs=5)).fits(long, RequestBounds()) is None


def test_echo_and_min_tokens(decoder: Decoders) -> None:
    long = ModelContext(max_model_len=131_072, max_chars_per_token=128)
    last = {"role": "assistant", "content": " " * 100_000}
    echo = chat_body(messages=[USER, last], n=8, echo=True, continue_final_message=True, max_tokens=1)
    err = fits(decoder, echo, long)  # vLLM starts each of the 8 choices with the 100,000 bytes
    assert err is not None and "echoed from the prompt" in err.message
    assert fits(decoder, chat_body(messages=[USER, last], n=2, echo=True, max_tokens=1), long) is None
    # A cap set for a request without max_tokens must still leave room for its min_tokens.
    capped = decoder.chat(chat_body(n=5, min_tokens=200_000))
    with pytest.raises(InvalidRequest) as exc:
        capped.fits(ModelContext(max_model_len=262_144, max_chars_per_token=16), RequestBounds())  # cap 104,857
    assert exc.value.param == "min_tokens"
    for body in (chat_body(min_tokens=10, max_tokens=5), completion_body(min_tokens=17)):
        with pytest.raises(InvalidRequest) as exc:
            decoder.completion(body) if b'"prompt"' in body else decoder.chat(body)
        assert exc.value.param == "min_tokens"


def test_one_request_takes_at_most_half_an_engines_batch(decoder: Decoders) -> None:
    engine = ModelContext(max_model_len=1024, max_chars_per_token=16, max_sequences=128)
    err = fits(decoder, chat_body(n=65, max_tokens=4), engine)
    assert err is not None and err.param == "n" and "run 128 at a time" in err.message
    assert fits(decoder, chat_body(n=64, max_tokens=4), engine) is None
    assert fits(decoder, completion_body(prompt=["a"] * 33, best_of=2, max_tokens=4), engine) is not None
    assert fits(decoder, chat_body(n=65, max_tokens=4), engine, max_batch_share=1.0) is None


def test_completions_count_every_prompt_best_of_and_echo(decoder: Decoders) -> None:
    assert fits(decoder, completion_body(prompt=["a"] * 128, max_tokens=2000, logprobs=5)) is not None  # 768 a step
    assert fits(decoder, completion_body(prompt=["a"] * 128, max_tokens=1000)) is None  # 128,000
    assert fits(decoder, completion_body(n=4, best_of=20, max_tokens=1000, logprobs=5)) is None  # 120,000
    assert fits(decoder, completion_body(n=20, best_of=20, max_tokens=10000, logprobs=5), ModelContext()) is not None
    # echo returns every prompt token (with its candidates) once per choice.
    long_prompt = "x " * 40_000  # 80,000 bytes: at most 80,001 tokens
    assert fits(decoder, completion_body(prompt=long_prompt, max_tokens=1, echo=True, logprobs=5, n=3),
                ModelContext()) is not None
    assert fits(decoder, completion_body(prompt=long_prompt, max_tokens=1, echo=True), ModelContext()) is None
    err = fits(decoder, completion_body(prompt=long_prompt, max_tokens=1, prompt_logprobs=20), ModelContext())
    assert err is not None and "echoed from the prompt" in err.message


def test_prompts_past_the_context_are_refused_before_queueing(decoder: Decoders) -> None:
    # 2048 tokens x 16 characters at most each: 32,768 characters can never fit.
    err = fits(decoder, chat_body(messages=[{"role": "user", "content": "a" * 32_768}]))
    assert err is not None and err.code == "context_length_exceeded" and err.param == "messages"
    assert "maximum context length is 2048 tokens" in err.message
    assert fits(decoder, chat_body(messages=[{"role": "user", "content": "a" * 32_000}], max_tokens=5)) is None
    # A prompt that may fit is left to the engine, which counts it exactly.
    assert fits(decoder, chat_body(messages=[{"role": "user", "content": "a" * 32_000}])) is None
    # Unless it is truncated by the engine anyway (vLLM's truncate_prompt_tokens).
    assert fits(decoder, chat_body(messages=[{"role": "user", "content": "a" * 40_000}],
                                   truncate_prompt_tokens=100)) is None
    err = fits(decoder, completion_body(prompt=list(range(2048))))
    assert err is not None and err.code == "context_length_exceeded" and "contains 2048 tokens" in err.message
    err = fits(decoder, completion_body(prompt=[[1, 2], list(range(3000))]))
    assert err is not None and err.param == "prompt"
    err = fits(decoder, chat_body(max_tokens=4096))
    assert err is not None and err.param == "max_tokens" and "at most 2048" in err.message
    err = fits(decoder, chat_body(max_completion_tokens=4096))
    assert err is not None and err.param == "max_completion_tokens"
    assert fits(decoder, chat_body(max_tokens=4096), ModelContext()) is None  # context unknown: the engine decides


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_refused_vllm_extensions_are_400s_naming_them(decoder: Decoders, field: str) -> None:
    body = completion_body(**{field: 1}) if field == "prompt_embeds" else chat_body(**{field: 1})
    with pytest.raises(InvalidRequest) as exc:
        decoder.completion(body) if field == "prompt_embeds" else decoder.chat(body)
    assert exc.value.param == field and exc.value.code == "unsupported_parameter"
    assert field in exc.value.message


@pytest.mark.parametrize(("fields", "param"), [
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"bad_words": ["w"] * 129}, "bad_words"),
    ({"bad_words": ["w" * 257]}, "bad_words[0]"),
    ({"allowed_token_ids": list(range(262_145))}, "allowed_token_ids"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"structured_outputs": {"regex": "a" * 65_537}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["a"] * 1025}}, "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": "g", "unknown": 1}}, "structured_outputs"),
    ({"structured_outputs": {"json": json.loads("[" * 65 + "]" * 65)}}, None),
    ({"chat_template_kwargs": json.loads('{"a":' * 65 + "1" + "}" * 65)}, "chat_template_kwargs"),
    ({"cache_salt": "s" * 257}, "cache_salt"),
])
def test_vllm_extensions_are_bounded(decoder: Decoders, fields: dict[str, Any], param: str | None) -> None:
    with pytest.raises(InvalidRequest) as exc:
        decoder.chat(chat_body(**fields))
    if param is not None:
        assert exc.value.param == param
    # Within the bounds they pass (and reach the engine: engines.vllm_engine.REQUEST_FIELDS).
    decoder.chat(chat_body(stop_token_ids=[1, 2], bad_words=["w"], allowed_token_ids=[1, 2, 3], prompt_logprobs=2,
                           min_tokens=1, structured_outputs={"regex": "[ab]+"}, top_k=5, min_p=0.1,
                           chat_template_kwargs={"enable_thinking": False}, cache_salt="s"))
