"""vLLM's own engine statistics reach the engine's /metrics (read through a vLLM stat logger)."""

from __future__ import annotations

import time

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MODEL, VllmStack


def samples(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("gen_ai_request_model", MODEL) == MODEL:
                key = s.name + "".join(f"|{s.labels[k]}" for k in ("gen_ai_token_type",) if k in s.labels)
                out[key] = out.get(key, 0.0) + s.value
    return out


def test_vllm_engine_statistics_are_exported(vllm_stack: VllmStack, client: openai.OpenAI) -> None:
    before = samples(vllm_stack.metrics_port)
    done = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to ten"}],
                                          max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert done.usage is not None and done.usage.completion_tokens == 12
    deadline = time.monotonic() + 10
    after = samples(vllm_stack.metrics_port)
    while time.monotonic() < deadline and after.get("conduit_engine_vllm_request_duration_seconds_count", 0) <= \
            before.get("conduit_engine_vllm_request_duration_seconds_count", 0):
        time.sleep(0.2)
        after = samples(vllm_stack.metrics_port)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("conduit_engine_vllm_tokens_total|output") == 12
    assert grew("conduit_engine_vllm_tokens_total|input") == done.usage.prompt_tokens
    assert grew("conduit_engine_vllm_time_to_first_token_seconds_count") == 1
    assert grew("conduit_engine_vllm_inter_token_latency_seconds_count") == 11
    assert grew("conduit_engine_vllm_request_duration_seconds_count") == 1
    assert grew("conduit_engine_vllm_request_queue_time_seconds_count") == 1
    assert grew("conduit_engine_vllm_batch_size_count") >= 1
    # Idle again: nothing running or waiting, and the KV cache gauge is a fraction.
    assert after["conduit_engine_vllm_requests_running"] == 0
    assert after["conduit_engine_vllm_requests_waiting"] == 0
    assert 0 <= after["conduit_engine_vllm_kv_cache_usage"] <= 1
    assert after["conduit_engine_jobs_in_flight"] == 0 and after["conduit_engine_jobs_max"] >= 1
