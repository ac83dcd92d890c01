"""What the embeddings tests share (``pytest`` package scope: started once for this folder): two
embedding engines on the tiny Llama, real vLLM pooling on the CPU (``conduit engine --kind vllm-embed``),
``tiny-embed`` as a model is by default (no Matryoshka dimensions, token ids refused) and
``tiny-embed-m`` (``--matryoshka-dimensions 32,64,128 --embed-token-inputs``), started together, and a
keyed gateway in front of them."""

from __future__ import annotations

import json
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
from tests.harness import RedisServer, Stack, build_tiny_llama
from tests.keyed import KeyedGateways

PLAIN, MATRYOSHKA = "tiny-embed", "tiny-embed-m"
#: The tiny Llama's hidden size: what vLLM's pooler returns without ``dimensions``.
SIZE = 128
CONTEXT = 1024
ADMIN = "embeddings-admin-credential-0123456789"


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


@pytest.fixture(scope="package")
def engines(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    """Both engines, started together, and the tiny Llama's directory (its tokenizer)."""
    stack = Stack(redis_server.url, tmp_path_factory.mktemp("embed"))
    model = build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
    stack.model_dir = model  # type: ignore[attr-defined]
    # (Jobs of an engine that dies are taken over 2 s later: the kill test's.)
    common = ("--kind", "vllm-embed", "--model", str(model), "--cpu", "--enforce-eager",
              "--max-model-len", str(CONTEXT), "--reclaim-idle-ms", "2000")
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


@pytest.fixture(scope="package")
def tokenizer(engines: tuple[Stack, Path]) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(engines[1] / "tokenizer.json"))




@pytest.fixture(scope="package")
def gateway(engines: tuple[Stack, Path]) -> Iterator[KeyedGateways]:
    """A keyed gateway in front of both engines (bounds lowered where tests reach them), a chat engine
    beside them (the synthetic one), and a key for the stack's model checks."""
    stack = engines[0]
    g = KeyedGateways(stack, ADMIN, count=0)
    g.procs.append(g.start(max_embedding_inputs=64, max_embedding_tokens=20_000, max_embedding_floats=32 * SIZE))
    g.urls.append(stack.base_url)
    stack.api_key = g.key()
    stack.synthetic("chatty")
    stack.wait_for_model(PLAIN)
    stack.wait_for_model(MATRYOSHKA)
    yield g
    for client in g.clients:
        client.close()
