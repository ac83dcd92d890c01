"""The upstream engine's relay without a server: the body it sends, its errors mapped, its stream
read into events and usage counted when the upstream gives none (engines/upstream_relay.py).
tests/integration/test_upstream.py and tests/e2e/test_upstream_vllm.py run it against real servers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engines.backend import JobRejected
from engines.cli import build_parser, upstream_settings
from engines.contract.messages import ChoiceDelta, Generated, Usage
from engines.upstream import UpstreamSettings
from engines.upstream_models import ModelList
from engines.upstream_reads import MAX_LINE_BYTES, LineTooLong, Retryable, bounded_body, bounded_lines, mapped_error
from engines.upstream_relay import (
    MAX_REPORTED_TOKENS,
    REQUEST_FIELDS,
    Relay,
    StreamBroke,
    estimated_prompt_tokens,
    streams_from_upstream,
    upstream_request,
)
from engines.vllm_engine import REQUEST_FIELDS as VLLM_FIELDS


class Out:
    """A JobOutput that records what it is given."""

    def __init__(self) -> None:
        self.started_calls = 0
        self.deltas: list[tuple[list[ChoiceDelta], Usage | None, Generated | None]] = []
        self.usage: Usage | None = None

    def started(self) -> None:
        self.started_calls += 1

    def delta(self, choices: list[ChoiceDelta], usage: Usage | None = None, total: Generated | None = None) -> None:
        self.deltas.append((choices, usage, total))

    async def image(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("no images")

    def done(self, usage: Usage) -> None:
        self.usage = usage


def chunk(*choices: dict[str, Any], usage: dict[str, Any] | None = None) -> str:
    return "data: " + json.dumps({"choices": list(choices), **({"usage": usage} if usage else {})})


def test_the_body_keeps_the_allowlist_and_a_stream_always_asks_for_usage() -> None:
    body = {"model": "front", "messages": [{"role": "user", "content": "hi"}], "n": 2, "top_k": 5, "tools": [],
            "store": True, "metadata": {"a": "b"}, "request_id": "mine", "service_tier": "flex", "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True, "x-secret": "s"}}
    sent = upstream_request(body, "chat", "their-name")
    assert sent["model"] == "their-name" and sent["stream"] is True
    # Built, never copied: no other key of the client's stream_options reaches the upstream.
    assert sent["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    # continuous_usage_stats only where the client asked for usage on every chunk (vLLM's rule).
    for options in ({"continuous_usage_stats": True}, {"include_usage": True}, "junk", None):
        asked = upstream_request({"stream": True, "stream_options": options}, "chat", "m")
        assert asked["stream_options"] == {"include_usage": True}
    assert {"n", "top_k", "tools", "messages"} <= set(sent)
    assert not {"store", "metadata", "request_id", "service_tier"} & set(sent)
    # Without the client's stream options only OpenAI's include_usage is asked (no vLLM extension).
    assert upstream_request({"prompt": "x", "stream": True}, "completion", "m")["stream_options"] == {"include_usage": True}
    # The allowlist is the in-process vLLM engine's (what the gateway names and bounds) less request_id.
    for kind in ("chat", "completion"):
        assert VLLM_FIELDS[kind] - REQUEST_FIELDS[kind] == {"request_id"}


def test_errors_are_mapped_never_copied() -> None:
    bad = mapped_error(422, b'{"error": {"message": "n too big", "param": "n", "code": "invalid_value"}}', {}, "m")
    assert isinstance(bad, JobRejected) and (bad.status, bad.param, bad.message) == (400, "n", "n too big")
    for status in (401, 403):
        auth = mapped_error(status, b'{"error": {"message": "bad key", "code": "invalid_api_key"}}', {}, "m")
        assert isinstance(auth, JobRejected) and (auth.status, auth.code) == (502, "engine_error")
        assert "bad key" not in auth.message
    gone = mapped_error(404, b'{"detail": "Not Found"}', {}, "m")
    assert "Not Found" not in gone.message
    assert isinstance(gone, JobRejected) and (gone.status, gone.code) == (503, "model_unavailable")
    busy = mapped_error(429, b"slow down", {"retry-after": "3"}, "m")
    assert isinstance(busy, Retryable) and busy.retry_after_s == 3
    assert (busy.final.status, busy.final.code, busy.final.retry_after_s) == (429, "model_overloaded", 3)
    broken = mapped_error(500, b"<html>", {}, "m")
    assert isinstance(broken, Retryable) and broken.final.status == 502 and broken.retry_after_s is None
    down = mapped_error(503, b'{"error": {"message": "no engine"}}', {"retry-after": "2"}, "m")
    assert isinstance(down, Retryable) and (down.final.status, down.final.code, down.final.retry_after_s) == (
        503, "model_unavailable", 2)


def test_a_stream_with_usage_is_relayed_with_the_upstream_s_counts() -> None:
    out = Out()
    relay = Relay(out, {"n": 2}, "chat", "m")
    assert relay.line(chunk({"index": 0, "delta": {"role": "assistant", "content": ""}}))  # role only: nothing
    assert out.deltas == [] and out.started_calls == 0
    relay.line(chunk({"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}))
    relay.line(chunk({"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f"}}]}}))
    relay.line(chunk({"index": 0, "delta": {}, "finish_reason": "stop"}, {"index": 1, "delta": {},
                                                                          "finish_reason": "tool_calls"}))
    relay.line(chunk(usage={"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}))
    assert relay.line("data: [DONE]") is False
    relay.finish()
    assert out.usage == Usage(prompt_tokens=9, completion_tokens=4)
    assert [d.tool_calls[0].name for d in out.deltas[1][0]] == ["f"] and out.deltas[0][1] is None


def test_a_stream_without_usage_is_charged_what_it_relayed() -> None:
    out = Out()
    client = {"messages": [{"role": "user", "content": "x" * 40}]}
    relay = Relay(out, client, "chat", "m")
    relay.line(chunk({"index": 0, "delta": {"content": "a"}}))
    relay.line(chunk({"index": 0, "delta": {"content": "b"},
                      "logprobs": {"content": [{"token": "b", "logprob": -1.0}, {"token": "c", "logprob": -2.0}]}}))
    relay.line(chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}))
    relay.line(chunk({"index": 0, "delta": {}, "finish_reason": "stop"}))  # no token
    relay.line("data: [DONE]")
    relay.finish()
    prompt = estimated_prompt_tokens(client, "chat")
    assert prompt == -(-len(json.dumps(client["messages"], separators=(",", ":"))) // 4)
    assert out.usage == Usage(prompt_tokens=prompt, completion_tokens=4)  # 1 + 2 (logprobs) + 1
    assert [t for _, _, t in out.deltas] == [Generated(prompt, 1), Generated(prompt, 3), Generated(prompt, 4),
                                             Generated(prompt, 4)]


def test_failures_before_output_are_retryable_and_after_output_clean_errors() -> None:
    relay = Relay(Out(), {}, "completion", "m")
    with pytest.raises(JobRejected) as rejected:  # vLLM's error chunk before output keeps its meaning
        relay.line('data: {"error": {"message": "bad", "type": "BadRequestError", "param": "x", "code": 400}}')
    assert (rejected.value.status, rejected.value.param) == (400, "x")
    with pytest.raises(Retryable):
        relay.line("data: {not json")
    with pytest.raises(Retryable):  # an error event with a string code (OpenAI's, Conduit's): a server error
        relay.line('data: {"error": {"message": "boom", "type": "server_error", "code": "engine_lost"}}')
    relay.line(chunk({"index": 0, "text": "hi"}))
    with pytest.raises(StreamBroke) as broke:
        relay.line(chunk({"index": 0, "text": "", "finish_reason": "abort"}))
    assert (broke.value.status, broke.value.code) == (502, "engine_error")
    with pytest.raises(StreamBroke):
        relay.line('data: {"error": {"message": "boom", "code": "engine_lost"}}')
    assert isinstance(relay.broken("a stream that ended without [DONE]"), StreamBroke)


def test_settings_take_the_key_from_the_environment_or_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    parse = build_parser().parse_args
    base = ["serve", "--kind", "upstream", "--base-url", "https://up/v1"]
    monkeypatch.setenv("CONDUIT_UPSTREAM_API_KEY", "from-env")
    s = upstream_settings(parse([*base, "--served-name", "m", "--upstream-header", "X-Team: blue",
                                 "--upstream-ca-bundle", "/ca.pem", "--max-concurrency", "8"]))
    assert (s.api_key, s.headers, s.ca_bundle, s.max_concurrency, s.verify_tls) == (
        "from-env", {"X-Team": "blue"}, "/ca.pem", 8, True)
    assert "from-env" not in repr(s) and "from-env" not in repr(UpstreamSettings(base_url="u", api_key="from-env"))
    key = tmp_path / "key"
    key.write_text("from-file\n")
    s = upstream_settings(parse([*base, "--models", "auto", "--upstream-api-key-file", str(key)]))
    assert (s.api_key, s.models_auto, s.served_names) == ("from-file", True, [])
    for wrong in ([*base], [*base, "--served-name", "m", "--upstream-header", "no colon"],
                  [*base, "--models", "auto", "--upstream-model", "x"], ["serve", "--kind", "upstream"]):
        with pytest.raises(ValueError):
            upstream_settings(parse(wrong))
    with pytest.raises(SystemExit):  # no flag takes the key itself
        parse([*base, "--upstream-api-key", "sk-x"])


def test_only_a_client_s_mistake_relays_the_upstream_s_words_and_those_clipped() -> None:
    long = json.dumps({"error": {"message": "m" * 5000, "param": "p" * 500, "code": "bad"}}).encode()
    bad = mapped_error(400, long, {}, "m")
    assert isinstance(bad, JobRejected) and len(bad.message) == 500 and len(bad.param or "") <= 128
    secret = b'{"error": {"message": "org-1234 at 10.0.0.7 has used its tokens"}}'
    for status in (401, 403, 404, 409, 429, 500, 503):
        mapped = mapped_error(status, secret, {}, "m")
        final = mapped.final if isinstance(mapped, Retryable) else mapped
        assert isinstance(final, JobRejected) and "org-1234" not in final.message, status
    assert mapped_error(429, b"", {}, "m").final.message == "The model's upstream server is rate limited."
    # An exhausted quota is the operator's account, and no retry cures it: a 502 at once.
    for quota in (b'{"error": {"message": "x", "type": "insufficient_quota", "code": "insufficient_quota"}}',
                  b'{"error": {"message": "x", "type": "requests", "code": "insufficient_quota"}}'):
        out = mapped_error(429, quota, {"retry-after": "1"}, "m")
        assert isinstance(out, JobRejected) and not isinstance(out, Retryable)
        assert (out.status, out.code) == (502, "engine_error")


def test_an_error_event_after_output_is_logged_not_relayed() -> None:
    relay = Relay(Out(), {}, "completion", "m")
    relay.line(chunk({"index": 0, "text": "hi"}))
    with pytest.raises(StreamBroke) as broke:
        relay.line('data: {"error": {"message": "internal path /srv/secret", "code": "engine_lost"}}')
    assert "/srv/secret" not in broke.value.message


async def _chunks(*parts: bytes) -> Any:
    for p in parts:
        yield p


async def _lines(*parts: bytes, limit: int = MAX_LINE_BYTES) -> list[str]:
    return [line async for line in bounded_lines(_chunks(*parts), limit)]


async def test_stream_lines_are_read_with_a_bound() -> None:
    assert await _lines(b"data: a\r\n\r\nda", b"ta: \xc3", b"\xa9\n\ndata: [DONE]") == [
        "data: a", "", "data: \u00e9", "", "data: [DONE]"]
    assert await _lines(b"x" * 10 + b"\n", limit=10) == ["x" * 10]
    for parts in ((b"x" * 11 + b"\n",), (b"x" * 6, b"x" * 6), (b"x" * 6, b"x" * 5, b"x\n")):
        with pytest.raises(LineTooLong):
            await _lines(*parts, limit=10)
    assert await bounded_body(_chunks(b"a" * 40, b"b" * 40, b"c" * 40), 64) == b"a" * 40 + b"b" * 24


def test_a_line_too_long_is_a_clean_engine_error_never_retried() -> None:
    relay = Relay(Out(), {}, "completion", "m")
    early = relay.too_long()
    assert not isinstance(early, Retryable) and (early.status, early.code) == (502, "engine_error")
    relay.line(chunk({"index": 0, "text": "hi"}))
    assert isinstance(relay.too_long(), StreamBroke)


def test_models_auto_is_bounded_checked_and_drops_a_model_only_after_two_reads_lack_it(
        caplog: pytest.LogCaptureFixture) -> None:
    models = ModelList(models_max=3)
    listed = ["b", "a", "bad name", "x{tag}", 7, "z" * 129, "org/m-1.5:q4@v+2", "c", "d"]
    served = models.next([], listed)
    assert served == ["a", "b", "c"]  # the first 3 of the valid ones, sorted
    assert "MORE THAN --upstream-models-max" in caplog.text and "'x{tag}'" in caplog.text
    assert models.next(served, []) == served  # an empty read (an upstream restarting) drops nothing
    assert models.next(served, ["a", "b"]) == served  # one read without c keeps it
    assert models.next(served, ["a", "b", "e"]) == ["a", "b", "e"]  # the second drops it
    assert models.next(["a"], ["a", "b", "c", "d", "e"]) == ["a", "b", "c"]


async def test_upstream_http2_picks_httpx_with_h2_and_needs_h2(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import engines.upstream_flags as flags
    from engines.upstream_http import AiohttpTransport, HttpxTransport, transport

    parse = build_parser().parse_args
    base = ["serve", "--kind", "upstream", "--served-name", "m", "--base-url", "https://up/v1"]
    assert upstream_settings(parse(base)).http2 is False
    s = upstream_settings(parse([*base, "--upstream-http2"]))
    assert s.http2 is True
    picked = [transport(s), transport(UpstreamSettings(base_url="https://up/v1"))]
    assert [type(t) for t in picked] == [HttpxTransport, AiohttpTransport]
    for t in picked:
        await t.aclose()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(flags.importlib.util, "find_spec", lambda name, *a: None if name == "h2" else find_spec(name, *a))
    with pytest.raises(ValueError, match="--upstream-http2 needs the h2 package"):
        upstream_settings(parse([*base, "--upstream-http2"]))
    assert upstream_settings(parse(base)).http2 is False  # only the flag needs it


def test_settings_refuse_secrets_in_argv_and_negative_retries(tmp_path: Any) -> None:
    parse = build_parser().parse_args
    base = ["serve", "--kind", "upstream", "--served-name", "m"]
    for url in ("https://user:pw@up/v1", "https://up/v1?key=s", "https://up/v1#x", "ftp://up/v1", "up/v1"):
        with pytest.raises(ValueError, match="--base-url"):
            upstream_settings(parse([*base, "--base-url", url]))
    for bad in ("-1", "x"):
        with pytest.raises(SystemExit):
            parse([*base, "--base-url", "https://up/v1", "--upstream-retries", bad])
    with pytest.raises(SystemExit):
        parse([*base, "--base-url", "https://up/v1", "--upstream-models-max", "0"])
    headers = tmp_path / "headers"
    headers.write_text("# secrets\nX-Secret: s3cret\n\nX-Team:  red\n")
    s = upstream_settings(parse([*base, "--base-url", "https://up/v1", "--upstream-header", "X-Team: blue",
                                 "--upstream-header-file", str(headers), "--upstream-retries", "0"]))
    assert (s.headers, s.retries, s.models_max) == ({"X-Team": "red", "X-Secret": "s3cret"}, 0, 32)
    headers.write_text("X-Secret s3cret\n")
    with pytest.raises(ValueError) as wrong:
        upstream_settings(parse([*base, "--base-url", "https://up/v1", "--upstream-header-file", str(headers)]))
    assert "s3cret" not in str(wrong.value)
    # A header the HTTP client writes itself, or a value that would end the header, is refused at start.
    for header in ("Host: evil", "Content-Length: 0", "transfer-encoding: chunked", "X-A: b\rX-B: c"):
        with pytest.raises(ValueError):
            upstream_settings(parse([*base, "--base-url", "https://up/v1", "--upstream-header", header]))


async def test_the_engine_quiets_httpx_s_request_log() -> None:
    import logging

    from engines.upstream import UpstreamBackend

    backend = UpstreamBackend(UpstreamSettings(base_url="http://127.0.0.1:9/v1", served_names=["m"]))
    await backend.start()
    try:
        assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
        assert logging.getLogger("httpcore").getEffectiveLevel() >= logging.WARNING
    finally:
        await backend.close()


def test_conduit_engine_refuses_a_base_url_with_a_secret_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    from engines.cli import main

    rc = main(["serve", "--kind", "upstream", "--served-name", "m", "--redis-url", "redis://127.0.0.1:9/0",
               "--base-url", "https://user:sk-secret@up.example/v1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("conduit engine: --base-url") and "sk-secret" not in err


def test_an_upstream_s_usage_is_bounded_by_what_was_relayed_and_asked(caplog: pytest.LogCaptureFixture) -> None:
    """The upstream's counts are believed only within what Conduit saw: never negative (a credit on the
    key's bill, a total OpenAI's schema refuses), never fewer completion tokens than were relayed, never
    more than ``max_tokens`` per choice, and a prompt count no model could have; each clamp logged."""
    out = Out()
    relay = Relay(out, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 2}, "chat", "m")
    relay.line(chunk({"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}},
                     usage={"prompt_tokens": -1000000, "completion_tokens": -5}))
    relay.line(chunk({"index": 0, "delta": {}, "finish_reason": "length"}))
    relay.line(chunk(usage={"prompt_tokens": -1000000, "completion_tokens": -5}))
    relay.line("data: [DONE]")
    relay.finish()
    assert out.usage == Usage(prompt_tokens=0, completion_tokens=2)  # the two relayed tokens
    assert "usage" in caplog.text

    huge = Out()
    relay = Relay(huge, {"prompt": "hi", "max_tokens": 5, "n": 2}, "completion", "m")
    relay.line(chunk({"index": 0, "text": "a"}))
    relay.line(chunk(usage={"prompt_tokens": 10**15, "completion_tokens": 10**15}))
    relay.line("data: [DONE]")
    relay.finish()
    assert huge.usage is not None
    assert huge.usage.completion_tokens == 10  # max_tokens x n
    assert huge.usage.prompt_tokens <= MAX_REPORTED_TOKENS < 10**15

    honest = Out()  # an upstream that counts more per chunk than the deltas show is believed
    relay = Relay(honest, {"prompt": "hi"}, "completion", "m")
    relay.line(chunk({"index": 0, "text": "abc"}))
    relay.line(chunk(usage={"prompt_tokens": 3, "completion_tokens": 3}))
    relay.line("data: [DONE]")
    relay.finish()
    assert honest.usage == Usage(prompt_tokens=3, completion_tokens=3)


def test_continuous_usage_is_never_negative() -> None:
    out = Out()
    client = {"prompt": "hi", "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    relay = Relay(out, client, "completion", "m")
    relay.line(chunk({"index": 0, "text": "a"}, usage={"prompt_tokens": -7, "completion_tokens": -3}))
    _, usage, total = out.deltas[-1]
    assert usage is not None and usage.prompt_tokens >= 0 and usage.completion_tokens >= 0
    assert total is not None and total.prompt_tokens >= 0 and total.completion_tokens >= 0


def test_a_redirect_or_an_unknown_status_is_the_engine_s_fault_not_the_client_s(
        caplog: pytest.LogCaptureFixture) -> None:
    for status in (301, 307, 308, 304, 101, 200):
        err = mapped_error(status, b"", {"location": "http://169.254.169.254/"}, "m")
        assert isinstance(err, JobRejected) and (err.status, err.code) == (502, "engine_error"), status
        assert "169.254" not in err.message
    assert "307" in caplog.text
    err = mapped_error(413, b'{"error": {"message": "too big"}}', {}, "m")  # a 4xx stays the client's
    assert isinstance(err, JobRejected) and err.status == 400


def test_an_unreadable_chunk_s_details_stay_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    relay = Relay(Out(), {}, "completion", "m")
    relay.line(chunk({"index": 0, "text": "a"}))
    with pytest.raises(StreamBroke) as broke:
        relay.line('data: {"choices": [{"index": "SECRET-INTERNAL", "text": "b"}]}')
    assert "SECRET" not in broke.value.message and "Expected" not in broke.value.message
    assert "Expected" in caplog.text


def test_a_404_never_names_the_upstream_s_own_model_name(caplog: pytest.LogCaptureFixture) -> None:
    err = mapped_error(404, b'{"error": {"message": "no such model"}}', {}, "ft:internal-deployment-7f3a")
    assert isinstance(err, JobRejected) and (err.status, err.code) == (503, "model_unavailable")
    assert "internal-deployment" not in err.message
    assert "ft:internal-deployment-7f3a" in caplog.text  # the operator's log names it



def test_a_client_that_does_not_stream_is_answered_from_one_upstream_answer() -> None:
    """Not streamed to the client, not streamed from the upstream (one body to read and one delta a
    choice, not a chunk a token), unless it asks for logprobs (streamed: each line bounded, not a body
    of any size). ``stream_options`` never goes with a request that does not stream (vLLM refuses it)."""
    sent = upstream_request({"messages": [], "stream_options": {"include_usage": True}}, "chat", "m")
    assert sent["stream"] is False and "stream_options" not in sent
    assert not streams_from_upstream({"messages": []}) and streams_from_upstream({"stream": True})
    for logprobs in ({"logprobs": True}, {"logprobs": 2}, {"top_logprobs": 3}, {"prompt_logprobs": 1}):
        assert streams_from_upstream(logprobs), logprobs
        assert upstream_request(logprobs, "completion", "m")["stream"] is True

    out = Out()
    client = {"messages": [{"role": "user", "content": "hi"}], "n": 2}
    relay = Relay(out, client, "chat", "m")
    relay.answer(json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hello there", "reasoning_content": "hm"},
         "finish_reason": "stop", "stop_reason": None},
        {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
            {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
         "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19}}).encode())
    assert out.started_calls >= 1 and len(out.deltas) == 1
    first, second = out.deltas[0][0]
    assert (first.index, first.text, first.reasoning, first.finish_reason) == (0, "hello there", "hm", "stop")
    # Each tool call keeps its place (a whole answer's calls carry no index; a stream's deltas do).
    assert [(t.index, t.id, t.name, t.arguments) for t in second.tool_calls] == [
        (0, "call_a", "f", '{"x": 1}'), (1, "call_b", "g", "{}")]
    assert second.finish_reason == "tool_calls"
    assert out.usage == Usage(prompt_tokens=7, completion_tokens=12)

    estimated = Out()  # an answer without usage: its text's characters / 4, not one token a choice
    relay = Relay(estimated, {"prompt": "x" * 40}, "completion", "m")
    relay.answer(json.dumps({"choices": [{"index": 0, "text": "y" * 41, "finish_reason": "length"}]}).encode())
    assert estimated.usage == Usage(prompt_tokens=10, completion_tokens=11)


def test_an_unreadable_or_unfinished_answer_is_tried_again_and_its_details_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    for data in (b"<html>gateway timeout</html>", b'{"choices": [{"index": "SECRET"}]}'):
        with pytest.raises(Retryable) as again:
            Relay(Out(), {}, "completion", "m").answer(data)
        assert "SECRET" not in again.value.final.message
    assert "SECRET" in caplog.text
    with pytest.raises(Retryable):
        Relay(Out(), {}, "chat", "m").answer(b'{"choices": [{"index": 0, "message": {}, "finish_reason": "abort"}]}')


def test_a_choice_index_past_those_asked_is_the_upstream_s_fault() -> None:
    """An index the request never asked for (the gateway would make a choice for every number up to
    it): refused, in a stream and in a whole answer; a completions batch has n choices a prompt."""
    with pytest.raises(Retryable):
        Relay(Out(), {"n": 2}, "chat", "m").line(chunk({"index": 2, "delta": {"content": "a"}}))
    with pytest.raises(Retryable):
        Relay(Out(), {}, "chat", "m").answer(json.dumps({"choices": [
            {"index": 1000000, "message": {"content": "a"}, "finish_reason": "stop"}]}).encode())
    relay = Relay(Out(), {"n": 2, "prompt": ["a", "b", "c"]}, "completion", "m")
    relay.line(chunk({"index": 5, "text": "x"}))  # 3 prompts x 2
    with pytest.raises(StreamBroke):  # after output: a clean error
        relay.line(chunk({"index": 6, "text": "x"}))
    with pytest.raises(Retryable):
        Relay(Out(), {"prompt": [1, 2, 3]}, "completion", "m").line(chunk({"index": 1, "text": "x"}))  # one prompt
