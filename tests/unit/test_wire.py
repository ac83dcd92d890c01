"""engines.contract.messages: msgpack round trips, schema evolution, Redis key names."""

from __future__ import annotations

import msgspec
import pytest

from engines.contract.keys import Keys
from engines.contract.messages import (
    ChoiceDelta,
    Codec,
    Delta,
    Done,
    JOB_KINDS,
    PROTOCOL_VERSION,
    BlobRef,
    Embedded,
    EngineInfo,
    Failed,
    Job,
    JobOptions,
    SampledLogprob,
    Started,
    TokenLogprob,
    ToolCallDelta,
    Unknown,
    Usage,
)


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


def _hash_slot_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes: the first non-empty ``{...}``, else the key."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


# ---- round trips -------------------------------------------------------------------------


def test_job_round_trip(codec: Codec) -> None:
    job = Job(id="chatcmpl-1", kind="chat", model="tiny", body=b'{"model":"tiny","messages":[]}',
              reply_to="conduit:replies:{gw1}", deadline_ms=1_700_000_060_000, created_ms=1_700_000_000_000,
              traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    decoded = codec.decode_job(codec.encode(job))
    assert decoded == job
    assert isinstance(decoded.body, bytes)


def test_job_omits_defaults_on_the_wire(codec: Codec) -> None:
    job = Job(id="j", kind="completion", model="m", body=b"{}", reply_to="r", deadline_ms=5)
    raw = msgspec.msgpack.decode(codec.encode(job))
    assert "traceparent" not in raw and "created_ms" not in raw
    assert codec.decode_job(codec.encode(job)) == job


def test_event_batch_round_trip(codec: Codec) -> None:
    top = [TokenLogprob("Hel", -0.1, [72, 101, 108]), TokenLogprob("He", -2.5, None)]
    batch = [
        Started(job="j1", engine="engine-a", attempt=2, created=1_700_000_000),
        Delta(job="j1", attempt=2, choices=[
            ChoiceDelta(index=0, text="Hel", logprobs=[SampledLogprob("Hel", -0.1, [72, 101, 108], top, 0)]),
            ChoiceDelta(index=1, reasoning="hmm", tool_calls=[
                ToolCallDelta(index=0, id="call_1", name="get_weather", arguments='{"ci'),
                ToolCallDelta(index=1, arguments="ty"),
            ]),
        ]),
        Delta(job="j1", choices=[ChoiceDelta(index=0, finish_reason="stop", stop_reason="\n\n"),
                                 ChoiceDelta(index=1, finish_reason="tool_calls", stop_reason=128001)]),
        Done(job="j1", usage=Usage(prompt_tokens=12, completion_tokens=34, cached_tokens=8)),
        Failed(job="j2", message="prompt too long", code="context_length_exceeded", status=400,
               type="invalid_request_error", param="messages"),
    ]
    decoded, skipped = codec.decode_events(codec.encode(batch))
    assert decoded == batch and skipped == 0
    assert [type(e) for e in decoded] == [Started, Delta, Delta, Done, Failed]
    # Values whose type a union could lose: int stop token vs str stop string, bytes lists.
    assert decoded[2].choices[1].stop_reason == 128001
    assert decoded[2].choices[0].stop_reason == "\n\n"
    assert decoded[1].choices[0].logprobs[0].top[1].bytes is None


def test_done_without_usage_decodes_to_zero_usage(codec: Codec) -> None:
    (done,), _ = codec.decode_events(codec.encode([Done(job="j")]))
    assert isinstance(done, Done)
    assert done.usage == Usage(prompt_tokens=0, completion_tokens=0, cached_tokens=None)


def test_events_are_tagged(codec: Codec) -> None:
    raw = msgspec.msgpack.decode(codec.encode([Started(job="a"), Delta(job="a"), Done(job="a"),
                                               Failed(job="a", message="x")]))
    assert [e["t"] for e in raw] == ["s", "d", "f", "e"]


def test_unknown_event_types_are_skipped_not_their_neighbours(codec: Codec) -> None:
    """A newer engine's event type (or a damaged event) costs only itself."""
    data = msgspec.msgpack.encode([
        {"t": "s", "job": "a", "seq": 1},
        {"t": "zz", "job": "a", "seq": 2, "whatever": [1, 2]},  # a type from the future
        {"t": "d", "job": "a", "choices": [{"text": "hi"}], "seq": 3},
        {"t": "d", "job": "b", "choices": "not a list"},  # damaged
        {"t": "f", "job": "a", "seq": 4},
    ])
    events, skipped = codec.decode_events(data)
    assert skipped == 2
    # Unreadable events keep their place (job, number), so skipping them is no gap.
    assert events == [Started(job="a", seq=1), Unknown(job="a", seq=2),
                      Delta(job="a", choices=[ChoiceDelta(text="hi")], seq=3), Unknown(job="b"), Done(job="a", seq=4)]


def test_an_entry_that_is_not_a_list_of_events_raises(codec: Codec) -> None:
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
        codec.decode_events(msgspec.msgpack.encode({"t": "s"}))


def test_job_of_an_unknown_kind_still_decodes(codec: Codec) -> None:
    """An engine must be able to answer a kind it does not run, so the kind is not a closed set."""
    job = Job(id="j", kind="image", model="m", body=b"{}", reply_to="r", deadline_ms=5)
    assert codec.decode_job(codec.encode(job)).kind == "image"


def test_a_job_header_names_whom_to_answer(codec: Codec) -> None:
    data = msgspec.msgpack.encode({"id": "j", "reply_to": "r", "kind": "chat", "model": 7})  # model: wrong type
    with pytest.raises(msgspec.ValidationError):
        codec.decode_job(data)
    header = codec.decode_job_header(data)
    assert (header.id, header.reply_to) == ("j", "r")


def test_engine_info_round_trip(codec: Codec) -> None:
    info = EngineInfo(id="e1", kind="vllm", models=["a", "b"], max_concurrency=64, host="h", pid=3,
                      started_ms=9, max_model_len=4096, protocol=PROTOCOL_VERSION, kinds=["chat"])
    assert codec.decode_info(codec.encode(info)) == info


def test_engine_info_of_an_older_engine_reads_as_protocol_1(codec: Codec) -> None:
    old = msgspec.msgpack.encode({"id": "e1", "kind": "vllm", "models": ["a"]})
    info = codec.decode_info(old)
    assert info.protocol == 1 and info.kinds == ["chat", "completion"]


def test_engine_info_says_cold_models_only_when_it_has_some(codec: Codec) -> None:
    warm = EngineInfo(id="e1", kind="upstream", models=["a"], protocol=PROTOCOL_VERSION)
    assert "cold" not in msgspec.msgpack.decode(codec.encode(warm))  # an older gateway sees the same bytes
    cold = EngineInfo(id="e1", kind="upstream", models=["a"], protocol=PROTOCOL_VERSION, cold=["a"])
    assert codec.decode_info(codec.encode(cold)).cold == ["a"]
    assert codec.decode_info(msgspec.msgpack.encode({"id": "e1", "kind": "vllm", "models": ["a"]})).cold == []


# ---- schema evolution --------------------------------------------------------------------


class _JobV2(msgspec.Struct, omit_defaults=True):
    """A future Job with a new (defaulted) field."""

    id: str
    kind: str
    model: str
    body: bytes
    reply_to: str
    deadline_ms: int
    created_ms: int = 0
    traceparent: str = ""
    future_field: int = 0


class _JobV0(msgspec.Struct):
    """A past Job, before ``created_ms`` and ``traceparent`` existed."""

    id: str
    kind: str
    model: str
    body: bytes
    reply_to: str
    deadline_ms: int


class _DeltaV2(msgspec.Struct, tag="d", tag_field="t", omit_defaults=True):
    job: str
    choices: list[ChoiceDelta] = []
    attempt: int = 1
    sequence: int = 0


class _StartedV0(msgspec.Struct, tag="s", tag_field="t"):
    job: str


class _SampledLogprobV2(msgspec.Struct, array_like=True):
    """Array-like structs evolve by appending: a new trailing element."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top: list[TokenLogprob] = []
    text_offset: int = 0
    rank: int = 0


def test_newer_job_decodes_with_current_struct(codec: Codec) -> None:
    data = msgspec.msgpack.encode(_JobV2(id="j", kind="chat", model="m", body=b"{}", reply_to="r",
                                         deadline_ms=10, traceparent="tp", future_field=3))
    assert "future_field" in msgspec.msgpack.decode(data)  # the new field is really on the wire
    job = codec.decode_job(data)
    assert job == Job(id="j", kind="chat", model="m", body=b"{}", reply_to="r", deadline_ms=10, traceparent="tp")


def test_older_job_decodes_with_defaults(codec: Codec) -> None:
    data = msgspec.msgpack.encode(_JobV0(id="j", kind="completion", model="m", body=b"x", reply_to="r",
                                         deadline_ms=10))
    job = codec.decode_job(data)
    assert (job.created_ms, job.traceparent) == (0, "")
    assert job.kind == "completion"


def test_newer_and_older_events_decode(codec: Codec) -> None:
    data = msgspec.msgpack.encode([
        _StartedV0(job="j"),
        _DeltaV2(job="j", choices=[ChoiceDelta(text="hi")], sequence=7),
    ])
    (started, delta), _ = codec.decode_events(data)
    assert started == Started(job="j", engine="", attempt=1, created=0)
    assert delta == Delta(job="j", choices=[ChoiceDelta(text="hi")])


def test_array_like_logprob_gains_a_trailing_field() -> None:
    newer = msgspec.msgpack.encode(_SampledLogprobV2("a", -1.0, None, [TokenLogprob("b", -2.0)], 4, rank=1))
    assert len(msgspec.msgpack.decode(newer)) == 6
    assert msgspec.msgpack.decode(newer, type=SampledLogprob) == SampledLogprob("a", -1.0, None,
                                                                                [TokenLogprob("b", -2.0)], 4)
    older = msgspec.msgpack.encode(["a", -1.0])  # before bytes/top/text_offset existed
    assert msgspec.msgpack.decode(older, type=SampledLogprob) == SampledLogprob("a", -1.0)


# ---- key names ---------------------------------------------------------------------------


def test_keys_carry_prefix_and_hash_tags() -> None:
    keys = Keys("acme")
    assert keys.jobs("llama-3") == "acme:jobs:{llama-3}"
    assert keys.dead_letters("llama-3") == "acme:dead:{llama-3}"
    assert keys.replies("gw-7") == "acme:replies:{gw-7}"
    assert keys.job("llama-3", "job-1") == "acme:job:{llama-3}:job-1"
    assert keys.engines == "acme:{registry}:engines"
    assert keys.engine_info == "acme:{registry}:engine-info"
    assert keys.models_seen == "acme:{registry}:models-seen"
    assert keys.cancel_channel == "acme:cancel"
    assert Keys().jobs("m") == "conduit:jobs:{m}"


def test_keys_used_together_share_a_cluster_slot() -> None:
    keys = Keys("p")
    model = {_hash_slot_tag(k) for k in (keys.jobs("m"), keys.dead_letters("m"), keys.job("m", "j"),
                                         keys.engine_jobs("m", "e1"))}
    assert model == {"m"}
    registry = {_hash_slot_tag(k) for k in (keys.engines, keys.engine_info, keys.models_seen)}
    assert registry == {"registry"}
    assert _hash_slot_tag(keys.replies("g1")) == "g1"
    # Different models are spread over the cluster, not pinned to one slot.
    assert _hash_slot_tag(keys.jobs("a")) != _hash_slot_tag(keys.jobs("b"))


def test_prefixes_keep_deployments_apart() -> None:
    a, b = Keys("a"), Keys("b")
    names_a = {a.engines, a.engine_info, a.models_seen, a.cancel_channel, a.jobs("m"), a.replies("g")}
    names_b = {b.engines, b.engine_info, b.models_seen, b.cancel_channel, b.jobs("m"), b.replies("g")}
    assert not names_a & names_b
    assert all(n.startswith("a:") for n in names_a)


# ---- the contract laid for the next endpoints (nothing uses it yet; today's wire is unchanged) ----

class _JobV4(_JobV0, omit_defaults=True):
    """A job as engines of protocol 4 decode it (before affinity, adapters, inputs, result records)."""

    created_ms: int = 0
    traceparent: str = ""
    stream: bool = True
    output_ttl_ms: int = 0
    tenant: str = ""
    priority: int = 1


def test_todays_jobs_are_the_same_bytes_as_before(codec: Codec) -> None:
    fields = dict(id="j", kind="chat", model="m", body=b"{}", reply_to="r", deadline_ms=5, tenant="k", priority=2)
    # Byte for byte: the backlog's byte bound counts a job's encoded size.
    assert codec.encode(Job(**fields)) == msgspec.msgpack.encode(_JobV4(**fields))  # type: ignore[arg-type]


def test_a_job_with_the_new_fields_round_trips_and_older_engines_read_it(codec: Codec) -> None:
    options = JobOptions(engine="e1", adapter="sql-lora", inputs=[BlobRef("in_" + "0" * 32 + ".png", "image/png", 1234)],
                         result=Keys().result("resp_1"))
    job = Job(id="j", kind="image_edit", model="m", body=b"{}", reply_to="r", deadline_ms=5, options=options)
    assert codec.decode_job(codec.encode(job)) == job
    old = msgspec.msgpack.decode(codec.encode(job), type=_JobV4)
    assert (old.id, old.kind, old.deadline_ms) == ("j", "image_edit", 5)
    assert {"input_tokens", "embedding", "image_edit"} <= JOB_KINDS


def test_embedded_events_round_trip(codec: Codec) -> None:
    import struct

    vector = struct.pack("<3f", 0.5, -1.0, 2.0)
    events, skipped = codec.decode_events(codec.encode([Embedded(job="j", index=2, vector=vector, seq=2),
                                                        Done(job="j", seq=3)]))
    assert skipped == 0 and events[0] == Embedded(job="j", index=2, vector=vector, seq=2)
    assert struct.unpack("<3f", events[0].vector) == (0.5, -1.0, 2.0)  # type: ignore[union-attr]


def test_engines_of_today_announce_none_of_the_new_capabilities(codec: Codec) -> None:
    info = codec.decode_info(codec.encode(EngineInfo(id="e", kind="vllm", models=["m"], protocol=PROTOCOL_VERSION)))
    assert (info.addressable, info.adapters, info.results) == (False, [], False)
    raw = msgspec.msgpack.decode(codec.encode(info))
    assert not {"addressable", "adapters", "results"} & set(raw)


def test_result_records_and_engine_streams_are_named_apart() -> None:
    keys = Keys("p")
    assert keys.engine_jobs("m", "e1") != keys.jobs("m")
    assert _hash_slot_tag(keys.result("job-1")) == "job-1"
    assert keys.result("job-1").startswith("p:")


class _FailedBefore(msgspec.Struct, tag="e", tag_field="t", omit_defaults=True):
    """``Failed`` as gateways before ``retry_after_s`` read it."""

    job: str
    message: str
    code: str = "engine_error"
    status: int = 500
    type: str = "server_error"
    param: str | None = None
    attempt: int = 1
    seq: int = 0


def test_a_failure_s_retry_after_is_left_out_unless_said_and_older_gateways_ignore_it(codec: Codec) -> None:
    plain = Failed(job="j", message="no")
    assert b"retry_after_s" not in codec.encode([plain])  # today's failures: the same bytes as before
    said = Failed(job="j", message="busy", status=429, code="model_overloaded", retry_after_s=7)
    (back,), _ = codec.decode_events(codec.encode([said]))
    assert back == said
    older = msgspec.msgpack.decode(codec.encode(said), type=_FailedBefore)
    assert (older.status, older.code, older.message) == (429, "model_overloaded", "busy")
