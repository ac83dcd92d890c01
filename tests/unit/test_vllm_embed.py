"""The embedding engine's flags and its reading of ``input`` (nothing is started; the engine itself:
``tests/integration/test_embedding_engine.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from engines.backend import JobRejected
from engines.cli import embed_settings
from engines.vllm_embed import TOKEN_INPUT_REFUSED, _checked_input, input_count, is_token_input
from tests.commandline import parse_conduit


def test_embedding_flags_reach_the_engine_settings() -> None:
    args = parse_conduit(["engine", "--kind", "vllm-embed", "--model", "/models/e5", "--served-name", "e5",
                          "--matryoshka-dimensions", "256,64,128,64", "--embed-token-inputs", "--max-model-len", "512"])
    s = embed_settings(args, "/models/e5")
    assert (s.model, s.served_name, s.max_model_len) == ("/models/e5", "e5", 512)
    assert (s.matryoshka_dimensions, s.token_inputs, s.extra_engine_args) == ([64, 128, 256], True, {})
    tiny = embed_settings(parse_conduit(["engine", "--kind", "vllm-embed", "--cpu"]), "/cache/tiny-llama")
    assert (tiny.served_name, tiny.matryoshka_dimensions, tiny.token_inputs) == ("tiny-embed", [], False)
    assert tiny.extra_engine_args == {"distributed_executor_backend": "uni"}


@pytest.mark.parametrize("dims", ["0,32", "a,b", ","])
def test_matryoshka_dimensions_must_be_positive_numbers(dims: str) -> None:
    with pytest.raises(SystemExit):
        parse_conduit(["engine", "--kind", "vllm-embed", "--matryoshka-dimensions", dims])


@pytest.mark.parametrize(("value", "tokens", "count"), [
    ("hi", False, 1), (["a", "b"], False, 2), ([1, 2, 3], True, 1), ([[1, 2], [3]], True, 2)])
def test_input_shapes(value: Any, tokens: bool, count: int) -> None:
    assert (is_token_input(value), input_count(value)) == (tokens, count)
    if tokens:
        with pytest.raises(JobRejected) as refused:
            _checked_input(value, token_inputs=False)
        assert (refused.value.param, refused.value.message) == ("input", TOKEN_INPUT_REFUSED)
    assert _checked_input(value, token_inputs=True) == value
