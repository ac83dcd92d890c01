"""The `cpu` profile, all-in-one on one box: Redis, a gateway, the CPU vLLM and diffusers engines on
the tiny models, Prometheus, all from the images compose/docker/ builds, started by docker-compose.

An API key made by the image's own ``conduit keys`` (as Redis's admin user) gets a chat answer, a
streamed chat and an image through the ``openai`` SDK; Prometheus has every gateway and engine
target up, Conduit's alert rules loaded and Alertmanager as its alert destination. Every wait is on a condition, with the containers'
logs in the failure.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.deploy import stacks
from tests.deploy.conftest import ImageBuilder
from tests.deploy.stacks import CHAT, IMAGE, CpuStack
from tests.harness import ROOT

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def cpu_stack(build_image: ImageBuilder, deploy_logs: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[CpuStack]:
    with stacks.cpu_stack(build_image, tmp_path_factory.mktemp("cpu-profile"), deploy_logs) as stack:
        yield stack


@pytest.fixture
def client(cpu_stack: CpuStack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{cpu_stack.base_url}/v1", api_key=cpu_stack.api_key, max_retries=0,
                       timeout=120) as c:
        yield c


def test_every_service_runs_and_is_healthy(cpu_stack: CpuStack) -> None:
    health = cpu_stack.project.health()
    assert health == dict.fromkeys(["redis", "gateway", "vllm-engine-cpu", "diffusers-engine-cpu", "prometheus",
                                    "alertmanager"], "healthy"), health
    # Non-root everywhere Conduit runs.
    for service in ("gateway", "vllm-engine-cpu", "diffusers-engine-cpu"):
        uid = cpu_stack.project.compose("exec", "-T", service, "id", "-u").stdout.strip()
        assert uid == "10001", f"{service} runs as {uid}"
    assert httpx.get(f"{cpu_stack.base_url}/ready", timeout=5).status_code == 200
    # Read-only root filesystems everywhere (what a service writes goes to its volume or a tmpfs);
    # and they serve like that: the engines built their tiny models into the model-cache volume.
    writable = {s for s, c in cpu_stack.project.containers().items() if not c["HostConfig"]["ReadonlyRootfs"]}
    assert not writable, f"root filesystem writable in {sorted(writable)}"
    for service in ("gateway", "vllm-engine-cpu", "diffusers-engine-cpu"):  # their home is theirs, and read-only
        done = cpu_stack.project.compose("exec", "-T", service, "touch", "/home/conduit/probe", check=False)
        assert done.returncode != 0 and "Read-only file system" in done.stderr + done.stdout, (service, done)


def test_chat_stream_and_image_through_the_openai_sdk(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=16)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage and chat.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=16, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason in ("stop", "length")
    image = client.images.generate(model=IMAGE, prompt="a lighthouse at dusk", size="64x64",  # type: ignore[arg-type]
                                   response_format="b64_json")
    assert image.data and base64.b64decode(image.data[0].b64_json or "")[:8] == b"\x89PNG\r\n\x1a\n"
    # Logprobs: vLLM's CPU sampler torch.compiles their ranking even with --enforce-eager, which
    # needs a C++ compiler and Python's headers in the image (without them the engine died here).
    ranked = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            logprobs=True, top_logprobs=2)
    assert ranked.choices[0].logprobs and ranked.choices[0].logprobs.content
    assert all(len(t.top_logprobs) == 2 for t in ranked.choices[0].logprobs.content)
    assert client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4).choices[0].finish_reason in ("stop", "length")


def test_prometheus_scrapes_every_target_and_loads_the_alert_rules(cpu_stack: CpuStack) -> None:
    def targets_up() -> dict[str, list[str]] | None:
        active = httpx.get(f"{cpu_stack.prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        by_job: dict[str, list[str]] = {}
        for t in active:
            by_job.setdefault(t["labels"]["job"], []).append(t["health"])
        ok = by_job.get("conduit-gateway") == ["up"] and by_job.get("conduit-engine") == ["up", "up"]
        return by_job if ok else None

    cpu_stack.project.wait("Prometheus: the gateway and both engines up", targets_up, 120)
    groups = httpx.get(f"{cpu_stack.prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    shipped = {r.get("alert") or r.get("record")
               for g in yaml.safe_load((ROOT / "compose/prometheus/alerts.yml").read_text())["groups"]
               for r in g["rules"]}
    assert loaded == shipped, f"not loaded: {shipped - loaded}"
