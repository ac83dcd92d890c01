"""The real vLLM engine leaving: /v1/models, routing and readiness follow at once."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL, VllmStack


@pytest.mark.stops_engine
def test_stopping_the_vllm_engine_removes_its_model(vllm_stack: VllmStack, client: openai.OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list()]  # it started and announced itself
    engine = next(p for p in vllm_stack.procs if "engines" in p.proc.args)  # python -P -m engines serve
    assert engine.stop(timeout=60) == 0  # SIGTERM: drains and deregisters
    vllm_stack.wait_for_model(MODEL, present=False, timeout=5)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.status_code == 503
    assert httpx.get(f"{vllm_stack.base_url}/ready").status_code == 503
