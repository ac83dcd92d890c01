"""``POST /v1/embeddings`` through a keyed gateway with the `openai` SDK and LangChain, on the real vLLM
pooling engines (``conftest``): every input shape, both encodings (the base64 the SDK asks for by
default decodes to the floats), ``dimensions``, every 400 before queueing, a model that does not
embed, the key's limits and usage, and kill -9 of an engine under load (0 lost)."""

from __future__ import annotations

import base64
import os
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import tiktoken

from engines.contract.keys import Keys
from engines.contract.messages import Codec
from gateway.tenancy.keys import parse_key
from tests.harness import ROOT, Stack
from tests.integration.embeddings.conftest import ADMIN, CONTEXT, MATRYOSHKA, PLAIN, SIZE
from tests.keyed import KeyedGateways
from tests.openai_schema import validate_embeddings

TEXTS = ["the cat sat on the mat", "a dog barked", "stock markets fell today"]


def post(gw: KeyedGateways, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gw.urls[0]}/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60)


@pytest.fixture(scope="module")
def key(gateway: KeyedGateways) -> str:
    return gateway.key()


def test_floats_and_base64_are_the_same_vectors(gateway: KeyedGateways, key: str) -> None:
    floats = post(gateway, key, {"model": PLAIN, "input": TEXTS, "encoding_format": "float"})
    assert floats.status_code == 200, floats.text
    validate_embeddings(floats.json())
    b64 = post(gateway, key, {"model": PLAIN, "input": TEXTS, "encoding_format": "base64"})
    validate_embeddings(b64.json(), base64=True)
    decoded = [list(struct.unpack(f"<{SIZE}f", base64.b64decode(d["embedding"]))) for d in b64.json()["data"]]
    assert decoded == [d["embedding"] for d in floats.json()["data"]]
    assert [d["index"] for d in floats.json()["data"]] == [0, 1, 2] and floats.json()["model"] == PLAIN
    # The SDK asks for base64 unless told, and decodes it: the same floats.
    sdk = gateway.sdk(gateway.urls[0], key)
    assert [e.embedding for e in sdk.embeddings.create(model=PLAIN, input=TEXTS).data] == decoded
    usage = floats.json()["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > len(TEXTS)


def test_every_input_shape(gateway: KeyedGateways, key: str, tokenizer: Any) -> None:
    sdk = gateway.sdk(gateway.urls[0], key)
    ids = [tokenizer.encode(t).ids for t in TEXTS]
    one = sdk.embeddings.create(model=MATRYOSHKA, input=TEXTS[0], encoding_format="float")
    many = sdk.embeddings.create(model=MATRYOSHKA, input=TEXTS, encoding_format="float")
    by_ids = sdk.embeddings.create(model=MATRYOSHKA, input=ids[0], encoding_format="float")
    many_ids = sdk.embeddings.create(model=MATRYOSHKA, input=ids, encoding_format="float")
    assert [len(r.data) for r in (one, many, by_ids, many_ids)] == [1, 3, 1, 3]
    assert one.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids[0])
    assert many.usage.prompt_tokens == many_ids.usage.prompt_tokens == sum(map(len, ids))
    for a, b in zip(many.data, many_ids.data, strict=True):  # a text and its token ids: one vector
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-5


def test_dimensions(gateway: KeyedGateways, key: str) -> None:
    short = post(gateway, key, {"model": MATRYOSHKA, "input": "hello", "dimensions": 32, "encoding_format": "float"})
    assert short.status_code == 200 and len(short.json()["data"][0]["embedding"]) == 32, short.text
    for model, dims in ((PLAIN, 32), (MATRYOSHKA, 33)):
        refused = post(gateway, key, {"model": model, "input": "hello", "dimensions": dims})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "dimensions", refused.text


@pytest.mark.parametrize(("value", "param"), [
    ("", "input"), ([], "input"), ([""], "input[0]"), (["a", ""], "input[1]"), ([[1], []], "input[1]"),
    ([1, "a"], "input"), (["a", [1]], "input"), ({"a": 1}, "input"), (None, "input"),
    (["x"] * 65, "input"),  # more inputs than this gateway's max_embedding_inputs (64)
    (["word " * 5000] * 5, "input"),  # more tokens in all than its max_embedding_tokens (20,000)
    ("word " * 20_000, "input"),  # one input of as many
    (["x"] * 33, "input"),  # an answer of 33 x 128 numbers: more than its max_embedding_floats (32 x 128)
    ("x" * (17 * CONTEXT + 17), "input"),  # certainly past the context (17 characters a token at most)
    ([[7] * (CONTEXT + 1)], "input"),
])
def test_what_cannot_be_embedded_is_a_400_before_it_is_queued(gateway: KeyedGateways, key: str, value: Any,
                                                               param: str) -> None:
    r = post(gateway, key, {"model": MATRYOSHKA, "input": value})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_fewer_dimensions_make_room_for_more_inputs(gateway: KeyedGateways, key: str) -> None:
    r = post(gateway, key, {"model": MATRYOSHKA, "input": ["x"] * 40, "dimensions": 64, "encoding_format": "float"})
    assert r.status_code == 200 and [len(d["embedding"]) for d in r.json()["data"]] == [64] * 40, r.text[:500]
    refused = post(gateway, key, {"model": MATRYOSHKA, "input": ["x"] * 40})
    assert refused.status_code == 400 and "5120 numbers" in refused.json()["error"]["message"], refused.text


def test_token_ids_for_a_model_that_takes_text_only(gateway: KeyedGateways, key: str) -> None:
    r = post(gateway, key, {"model": PLAIN, "input": [[1, 2, 3]]})
    assert r.status_code == 400 and "check_embedding_ctx_length=False" in r.json()["error"]["message"], r.text


def test_models_that_do_not_embed_and_embedders_that_do_not_chat(gateway: KeyedGateways, key: str) -> None:
    r = post(gateway, key, {"model": "chatty", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_supported", r.text
    chat = httpx.post(f"{gateway.urls[0]}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": PLAIN, "messages": [{"role": "user", "content": "x"}]}, timeout=30)
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_supported", chat.text


def test_the_keys_limits_and_usage_count_input_tokens(gateway: KeyedGateways) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    made = httpx.post(f"{gateway.urls[0]}/admin/keys", json={"name": "small", "limits": {"tpm": 100}}, headers=admin, timeout=10)
    assert made.status_code == 201, made.text
    small = made.json()["key"]
    first = post(gateway, small, {"model": PLAIN, "input": TEXTS})
    assert first.status_code == 200, first.text
    over = post(gateway, small, {"model": PLAIN, "input": ["word " * 60] * 2})  # ~150 tokens: past its tpm
    assert over.status_code == 429, over.text
    key_id = parse_key(small)[0]  # type: ignore[index]
    deadline = time.monotonic() + 10
    while True:
        days = httpx.get(f"{gateway.urls[0]}/admin/keys/{key_id}/usage?days=1", headers=admin, timeout=10).json()
        counted = days["days"][0]["models"].get(PLAIN, {}) if days["days"] else {}
        if counted.get("requests") == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (counted["prompt_tokens"], counted.get("completion_tokens", 0)) == (first.json()["usage"]["prompt_tokens"],
                                                                               0)


def test_langchain(gateway: KeyedGateways, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_openai import OpenAIEmbeddings

    texted = OpenAIEmbeddings(model=PLAIN, base_url=f"{gateway.urls[0]}/v1", api_key=key,  # type: ignore[arg-type]
                              check_embedding_ctx_length=False)
    vectors = texted.embed_documents(TEXTS)
    assert len(vectors) == 3 and len(vectors[0]) == SIZE and texted.embed_query(TEXTS[1]) == vectors[1]
    # Its default tokenizes with tiktoken (cl100k, fetched from the network: a byte-level stand-in here)
    # and sends the ids: another vocabulary's, refused with the way out named.
    offline = tiktoken.Encoding("bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                                special_tokens={})
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda _: offline)
    default = OpenAIEmbeddings(model=PLAIN, base_url=f"{gateway.urls[0]}/v1", api_key=key)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="check_embedding_ctx_length=False"):
        default.embed_documents(TEXTS)


def test_kill_9_of_an_engine_under_load_loses_nothing(gateway: KeyedGateways, key: str,
                                                      engines: tuple[Stack, Path]) -> None:
    stack, model = engines
    first = next(p for p in stack.procs if PLAIN in " ".join(map(str, p.proc.args)) and p.alive())
    stack.engine("--kind", "vllm-embed", "--model", str(model), "--cpu", "--enforce-eager", "--max-model-len",
                 str(CONTEXT), "--reclaim-idle-ms", "2000", "--served-name", PLAIN, wait=False)
    deadline = time.monotonic() + 240
    while _engines_of(stack, PLAIN) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    inputs = [f"document {i}: {TEXTS[i % 3]}" for i in range(16)]
    done, stop = [], threading.Event()

    def client(_: int) -> list[int]:
        codes = []
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{gateway.urls[0]}/v1/embeddings", json={"model": PLAIN, "input": inputs},
                           headers={"Authorization": f"Bearer {key}"})
                codes.append(r.status_code if r.status_code != 200 or len(r.json()["data"]) == 16 else -1)
                done.append(1)
        return codes

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, i) for i in range(8)]
        while len(done) < 40:
            time.sleep(0.02)
        first.kill()
        killed_at = len(done)
        while len(done) < killed_at + 80:
            time.sleep(0.05)
        stop.set()
        codes = [c for f in futures for c in f.result()]
    assert codes.count(200) == len(codes) >= 120, sorted(set(codes))


def _engines_of(stack: Stack, model: str) -> int:
    """How many live engines announce ``model``."""
    r = redis.Redis.from_url(stack.redis_url)
    try:
        codec = Codec()
        return sum(model in codec.decode_info(blob).models
                   for blob in r.hgetall(Keys(stack.prefix).engine_info).values())  # type: ignore[union-attr]
    finally:
        r.close()


def test_the_retrieval_example(gateway: KeyedGateways, key: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "embeddings_search.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CONDUIT_URL": f"{gateway.urls[0]}/v1", "OPENAI_API_KEY": key,
                               "EMBED_MODEL": PLAIN})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"4 documents, {SIZE} dimensions" in done.stdout
    # A query that is one of the documents finds it, at a similarity of 1.
    assert "query \"An API key's limits are checked before a job is queued.\": nearest document 2 (1.000)" in done.stdout
