"""The embedding engine (``conduit engine --kind vllm-embed``, ``engines/vllm_embed.py``) driven through
the real Redis as a gateway drives it (``conftest.Embedder``): what the engine itself checks and
answers, whatever a gateway let through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from engines.contract.keys import Keys
from tests.harness import RedisServer, Stack
from tests.integration.embeddings.conftest import CONTEXT, MATRYOSHKA, PLAIN, SIZE, Embedder, announced


def test_engines_announce_embedding_only_and_their_token_input_opt_in(engines: tuple[Stack, Path],
                                                                       redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    try:
        infos = announced(r, Keys(engines[0].prefix))
    finally:
        r.close()
    assert {m: (i.kind, i.kinds, i.token_inputs, i.max_model_len) for m, i in infos.items()
            if i.kind == "vllm-embed"} == {
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
