"""The embedding engine (``conduit engine --kind vllm-embed``, ``engines/vllm_embed.py``): real vLLM
pooling on the CPU with the tiny Llama, driven through the real Redis as a gateway drives it.

Two engine processes for the whole module, started together: ``tiny-embed`` as a model is by default
(no Matryoshka dimensions, token ids refused) and ``tiny-embed-m`` (``--matryoshka-dimensions
32,64,128 --embed-token-inputs``). The test plays the gateway with plain Redis commands: it queues
``embedding`` jobs on a model's stream and reads its reply stream with the gateway's decoder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from engines.contract.keys import Keys
from engines.contract.messages import Codec, Done, Embedded, EngineInfo, Event, Failed, Job, Started, Unknown
from engines.contract.replies import REPLY_STREAM_TTL_MS
from tests.harness import ROOT, RedisServer, Stack

PLAIN, MATRYOSHKA = "tiny-embed", "tiny-embed-m"
#: The tiny Llama's hidden size: what vLLM's pooler returns without ``dimensions``.
SIZE = 128
CONTEXT = 1024


class Embedder:
    """The gateway's side: queue an ``embedding`` job, read its events back in order."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys
        self.codec = Codec()
        self.reply_to = keys.replies(f"gw-{uuid.uuid4().hex[:6]}")
        r.xadd(self.reply_to, {b"h": b"1"})  # what a gateway does before queueing: the stream exists
        r.pexpire(self.reply_to, REPLY_STREAM_TTL_MS)
        self.last = b"0"
        self.seen: dict[str, list[Event | Unknown]] = {}

    def submit(self, model: str, body: dict[str, Any]) -> str:
        job = Job(id=uuid.uuid4().hex, kind="embedding", model=model, body=json.dumps(body).encode(),
                  reply_to=self.reply_to, deadline_ms=int(time.time() * 1000) + 120_000)
        self.r.xadd(self.keys.jobs(model), {b"j": self.codec.encode(job)})
        return job.id

    def events(self, job_id: str, timeout: float = 60) -> list[Event | Unknown]:
        """The job's events up to its final one (``Done`` or ``Failed``)."""
        end = time.monotonic() + timeout
        while not any(isinstance(e, Done | Failed) for e in self.seen.get(job_id, ())):
            assert time.monotonic() < end, f"job {job_id}: no final event; got {self.seen.get(job_id)}"
            for _stream, entries in self.r.xread({self.reply_to: self.last}, block=1000) or []:
                for entry_id, fields in entries:
                    self.last = entry_id
                    if b"e" in fields:
                        events, skipped = self.codec.decode_events(fields[b"e"])
                        assert skipped == 0, events
                        for e in events:
                            self.seen.setdefault(e.job, []).append(e)
        return self.seen.pop(job_id)

    def embed(self, model: str, body: dict[str, Any]) -> tuple[list[np.ndarray], Done]:
        """The job's vectors (index order) and its ``Done``; fails on any other outcome."""
        events = self.events(self.submit(model, body))
        assert isinstance(events[0], Started) and isinstance(events[-1], Done), events
        vectors = events[1:-1]
        assert all(isinstance(v, Embedded) for v in vectors), events
        assert [v.index for v in vectors] == list(range(len(vectors)))  # type: ignore[union-attr]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        return [np.frombuffer(v.vector, "<f4") for v in vectors], events[-1]  # type: ignore[union-attr]

    def refused(self, model: str, body: dict[str, Any]) -> Failed:
        """The job's ``Failed``: the only event of a job refused before any output."""
        events = self.events(self.submit(model, body))
        assert len(events) == 1 and isinstance(events[0], Failed), events
        return events[0]


def build_tiny_llama(path: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "models", "build-tiny", "--only", "llama",
                           "--path", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def engines(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    """Both engines, started together, and the tiny Llama's directory (its tokenizer)."""
    stack = Stack(redis_server.url, tmp_path_factory.mktemp("embed"))
    model = build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
    common = ("--kind", "vllm-embed", "--model", str(model), "--cpu", "--enforce-eager",
              "--max-model-len", str(CONTEXT))
    procs = [stack.engine(*common, "--served-name", PLAIN, wait=False),
             stack.engine(*common, "--served-name", MATRYOSHKA, "--matryoshka-dimensions", "32,64,128",
                          "--embed-token-inputs", wait=False)]
    r = redis.Redis.from_url(redis_server.url)
    try:
        end = time.monotonic() + 240
        while len(announced(r, Keys(stack.prefix))) < 2:
            for p in procs:
                assert p.alive(), p.output()[-3000:]
            assert time.monotonic() < end, [p.output()[-2000:] for p in procs]
            time.sleep(0.2)
        yield stack, model
    finally:
        r.close()
        stack.stop()


def announced(r: redis.Redis, keys: Keys) -> dict[str, EngineInfo]:
    """Each model's announced ``EngineInfo`` (the registry's, as gateways read it)."""
    codec = Codec()
    infos = [codec.decode_info(blob) for blob in r.hgetall(keys.engine_info).values()]  # type: ignore[union-attr]
    return {info.models[0]: info for info in infos}


@pytest.fixture
def embedder(engines: tuple[Stack, Path], redis_server: RedisServer) -> Iterator[Embedder]:
    r = redis.Redis.from_url(redis_server.url)
    yield Embedder(r, Keys(engines[0].prefix))
    r.close()


@pytest.fixture(scope="module")
def tokenizer(engines: tuple[Stack, Path]) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(engines[1] / "tokenizer.json"))


def test_engines_announce_embedding_only_and_their_token_input_opt_in(engines: tuple[Stack, Path],
                                                                       redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    try:
        infos = announced(r, Keys(engines[0].prefix))
    finally:
        r.close()
    assert {m: (i.kind, i.kinds, i.token_inputs, i.max_model_len) for m, i in infos.items()} == {
        PLAIN: ("vllm-embed", ["embedding"], [], CONTEXT),
        MATRYOSHKA: ("vllm-embed", ["embedding"], [MATRYOSHKA], CONTEXT)}


def test_every_input_shape_gives_one_unit_vector_per_input(embedder: Embedder, tokenizer: Any) -> None:
    texts = ["hello world", "a b", "x"]
    ids = [tokenizer.encode(t).ids for t in texts]
    for body, count in (({"input": texts[0]}, 1), ({"input": texts}, 3), ({"input": ids[0]}, 1),
                        ({"input": ids}, 3)):
        vectors, _done = embedder.embed(MATRYOSHKA, body)
        assert len(vectors) == count
        for v in vectors:
            assert v.shape == (SIZE,)
            assert abs(float(np.linalg.norm(v)) - 1) < 1e-5


def test_usage_counts_the_prompt_tokens(embedder: Embedder, tokenizer: Any) -> None:
    texts = ["hello world", "the quick brown fox jumps", "x"]
    expected = sum(len(tokenizer.encode(t).ids) for t in texts)
    _vectors, done = embedder.embed(PLAIN, {"input": texts})
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (expected, 0)
    _vectors, done = embedder.embed(MATRYOSHKA, {"input": [[5] * 7, [9] * 3]})
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (10, 0)


def test_the_same_input_gives_the_same_vector_alone_in_a_batch_and_as_its_token_ids(embedder: Embedder,
                                                                                   tokenizer: Any) -> None:
    (alone,), _ = embedder.embed(MATRYOSHKA, {"input": "hello world"})
    batch, _ = embedder.embed(MATRYOSHKA, {"input": ["a b", "hello world", "the quick brown fox"]})
    (by_ids,), _ = embedder.embed(MATRYOSHKA, {"input": tokenizer.encode("hello world").ids})
    np.testing.assert_allclose(batch[1], alone, atol=1e-5)
    np.testing.assert_allclose(by_ids, alone, atol=1e-5)
    # Different inputs, different vectors (the comparison above could not pass by accident).
    assert not np.allclose(batch[0], alone, atol=1e-3)


def test_dimensions_truncate_a_matryoshka_model(embedder: Embedder) -> None:
    (full,), _ = embedder.embed(MATRYOSHKA, {"input": "hello world"})
    (short,), _ = embedder.embed(MATRYOSHKA, {"input": "hello world", "dimensions": 32})
    assert short.shape == (32,)
    # Matryoshka: the full vector's first dimensions, normalised again.
    np.testing.assert_allclose(short, full[:32] / np.linalg.norm(full[:32]), atol=1e-5)
    refused = embedder.refused(MATRYOSHKA, {"input": "hello world", "dimensions": 33})
    assert (refused.status, refused.param, refused.type) == (400, "dimensions", "invalid_request_error")
    assert "[32, 64, 128]" in refused.message


def test_dimensions_are_a_400_for_a_model_without_them(embedder: Embedder) -> None:
    refused = embedder.refused(PLAIN, {"input": "hello world", "dimensions": 32})
    assert (refused.status, refused.param) == (400, "dimensions")
    assert "does not support Matryoshka" in refused.message


def test_an_input_past_the_context_is_a_400_naming_input(embedder: Embedder) -> None:
    for model, body in ((PLAIN, {"input": ["fine", "word " * (CONTEXT + 10)]}),
                        (MATRYOSHKA, {"input": [[5] * (CONTEXT + 1)]})):
        refused = embedder.refused(model, body)
        assert (refused.status, refused.param) == (400, "input"), refused
        assert str(CONTEXT) in refused.message
    # Exactly the context fits.
    (vector,), done = embedder.embed(MATRYOSHKA, {"input": [[5] * CONTEXT]})
    assert (vector.shape, done.usage.prompt_tokens) == ((SIZE,), CONTEXT)


@pytest.mark.parametrize("tokens", [[1, 2, 3], [[1, 2], [3]]])
def test_token_ids_are_refused_without_the_opt_in(embedder: Embedder, tokens: list[Any]) -> None:
    refused = embedder.refused(PLAIN, {"input": tokens})
    assert (refused.status, refused.param, refused.code) == (400, "input", "invalid_request")
    assert "check_embedding_ctx_length=False" in refused.message


@pytest.mark.parametrize("value", ["", [], [""], ["a", ""], [[1], []], [1, "a"], {"a": 1}, None])
def test_empty_or_malformed_input_is_a_400_naming_input(embedder: Embedder, value: Any) -> None:
    refused = embedder.refused(MATRYOSHKA, {"input": value})
    assert (refused.status, refused.param) == (400, "input"), refused


def test_an_out_of_vocabulary_token_id_is_a_400(embedder: Embedder) -> None:
    refused = embedder.refused(MATRYOSHKA, {"input": [10**8]})
    assert (refused.status, refused.param) == (400, "input")
    assert "vocabulary" in refused.message
