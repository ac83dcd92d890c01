"""Two boxes, then the faults: the ``api`` profile as one compose project, the ``cpu-engines``
profile as another on its own network, reaching the API box's Redis only through its published
port as Redis's ``engine`` user, as an API box and an engine box would.

The host's docker0 address stands for the API box's private address: Redis, the gateways and the
engines' metrics are published there (``REDIS_PUBLISH=<address>:<port>`` as compose/README.md
says), and the engine box's ``CONDUIT_REDIS_URL`` names it. One stack serves every test of this
module, in order: chat and images through the ``openai`` SDK; ``--scale gateway=2``; the
``monitoring`` profile alone scraping both boxes through ``prometheus/targets/``; then the
container-level faults under the fault suite's load (an engine container stopped and started,
the Redis container restarted, ``down`` then ``up`` of the API box). Loki, Alloy, Tempo and
Grafana are left out of ``api`` and ``monitoring``: no image of them is reachable here
(test_observability.py checks their part of the logs with rsyslog).

The faults load a third engine, the synthetic one with numbered tokens (the fault suite's, run
from the gateway image: ``conduit engine --kind synthetic``), added to the engine box by an
override file, so that a lost or doubled token shows.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.deploy import images
from tests.deploy.compose import (
    ComposeProject,
    free_port,
    hash_metrics_credential,
    host_address,
    served_models,
)
from tests.deploy.conftest import ImageBuilder, note
from tests.deploy.sdk_load import SdkLoad
from tests.fault.load import COMPLETED, DUPLICATED, LOST, Report

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(3600)]

CHAT, IMAGE, NUMBERED = "tiny-llama", "tiny-sd", "numbered"
READY_DEADLINE_S = 600
#: The gateways' request timeout: a job the system loses shows up as a 504 within the test. Roomy:
#: jobs queued while the only numbered engine restarts wait for its boot on a busy 2-core machine.
DEADLINE_S = 60.0
TOKENS = 30
CLIENTS = 16
WARMUP_S = 3.0
AFTER_S = 8.0

#: The engine box's third engine: the fault suite's numbered synthetic engine (30 tokens 20 ms
#: apart), from the gateway image, on the API box's Redis as the other engines are.
NUMBERED_ENGINE = f"""\
services:
  numbered-engine:
    image: {images.GATEWAY.tag}
    profiles: [cpu-engines]
    restart: unless-stopped
    init: true
    stop_grace_period: 60s
    environment:
      CONDUIT_REDIS_URL: ${{CONDUIT_REDIS_URL}}
      CONDUIT_REDIS_USERNAME: engine
      CONDUIT_REDIS_PASSWORD: ${{REDIS_ENGINE_PASSWORD}}
    command: [engine, --kind, synthetic, --served-name, {NUMBERED}, --numbered, --tokens, "{TOKENS}",
              --token-delay, "0.02", --max-concurrency, "8", --reclaim-idle-ms, "2000",
              --metrics-port, "9100", --metrics-host, 0.0.0.0]
    ports:
      - ${{NUMBERED_METRICS_PUBLISH}}:9100
    healthcheck:
      test: [CMD, python, -c, "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/ready', timeout=2)"]
      interval: 2s
      timeout: 3s
      retries: 3
"""
ENGINE_SERVICES = ("vllm-engine-cpu", "diffusers-engine-cpu", "numbered-engine")
API_SERVICES = ("redis", "gateway", "prometheus", "alertmanager")


@dataclass
class TwoBoxes:
    api: ComposeProject
    engines: ComposeProject
    host: str
    api_key: str
    admin_password: str
    credential: str
    gateways: int = 1
    faults: list[Report] = field(default_factory=list)

    def gateway_urls(self) -> list[str]:
        return [f"http://{self.host}:{self.api.port('gateway', 8000, i)}" for i in range(1, self.gateways + 1)]

    def up_api(self) -> None:
        self.api.compose("up", "-d", "--no-build", "--scale", f"gateway={self.gateways}", *API_SERVICES,
                         timeout=READY_DEADLINE_S)

    def wait_served(self, what: str, models: set[str]) -> None:
        for url in self.gateway_urls():
            self.api.wait(f"{what}: {url} serves {sorted(models)}",
                          lambda u=url: True if served_models(u, self.api_key) >= models else None,
                          READY_DEADLINE_S)

    def wait_healthy(self, project: ComposeProject) -> None:
        project.wait(f"{project.profile}: every container healthy",
                     lambda: True if set(project.health().values()) == {"healthy"} else None, READY_DEADLINE_S)


def _container_networks(project: ComposeProject) -> set[str]:
    ids = project.compose("ps", "-q").stdout.split()
    done = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, timeout=60, check=True)
    return {n for c in json.loads(done.stdout) for n in c["NetworkSettings"]["Networks"]}


@pytest.fixture(scope="module")
def boxes(build_image: ImageBuilder, deploy_logs: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[TwoBoxes]:
    for image in (images.GATEWAY, images.VLLM_CPU, images.DIFFUSERS_CPU):
        build_image(image)
    workdir = tmp_path_factory.mktemp("two-boxes")
    host = host_address()
    passwords = {f"REDIS_{role}_PASSWORD": secrets.token_hex(32) for role in ("GATEWAY", "ENGINE", "ADMIN")}
    credential = secrets.token_hex(32)
    # A fixed Redis port: the engine box keeps its URL across the API box's `down` and `up`.
    redis_port = free_port(host)
    api = ComposeProject(workdir / "api", "api", {
        **passwords, "CONDUIT_METRICS_KEY_HASH": hash_metrics_credential(credential),
        "CONDUIT_MODELS": f"{CHAT},{IMAGE},{NUMBERED}", "CONDUIT_REQUEST_TIMEOUT_S": f"{DEADLINE_S:g}",
        "REDIS_PUBLISH": f"{host}:{redis_port}", "CONDUIT_GATEWAY_PUBLISH": f"{host}:",
        "PROMETHEUS_PUBLISH": "127.0.0.1:", "ALERTMANAGER_PUBLISH": "127.0.0.1:"}, deploy_logs)
    cred = api.dir / "prometheus" / "metrics-credential"
    cred.write_text(credential + "\n")
    cred.chmod(0o644)
    # The engine box knows the API box's Redis address and the engine user's password, nothing else.
    engines = ComposeProject(workdir / "engines", "cpu-engines", {
        "REDIS_ENGINE_PASSWORD": passwords["REDIS_ENGINE_PASSWORD"],
        "CONDUIT_REDIS_URL": f"redis://{host}:{redis_port}/0",
        "VLLM_CPU_METRICS_PUBLISH": f"{host}:", "DIFFUSERS_CPU_METRICS_PUBLISH": f"{host}:",
        "NUMBERED_METRICS_PUBLISH": f"{host}:"}, deploy_logs,
        overrides={"docker-compose.numbered.yml": NUMBERED_ENGINE})
    with contextlib.ExitStack() as stack:
        stack.callback(api.down)
        stack.callback(engines.down)  # first: engines leave Redis before it goes
        t0 = time.monotonic()
        two = TwoBoxes(api, engines, host, "", passwords["REDIS_ADMIN_PASSWORD"], credential)
        two.up_api()
        two.wait_healthy(api)
        note(f"api profile (redis, gateway, prometheus, alertmanager): up to healthy {time.monotonic() - t0:.1f} s")
        two.api_key = api.create_key(passwords["REDIS_ADMIN_PASSWORD"])
        t0 = time.monotonic()
        engines.compose("up", "-d", "--no-build", timeout=READY_DEADLINE_S)
        two.wait_served("engine box joined", {CHAT, IMAGE, NUMBERED})
        two.wait_healthy(engines)
        note(f"cpu-engines profile on the API box's published Redis: up to models served and healthy "
             f"{time.monotonic() - t0:.1f} s")
        yield two
        if two.faults:
            note(f"container-level faults:\n    {Report.header()}\n" +
                 "\n".join("    " + "\n    ".join(r.table().splitlines()) for r in two.faults))


def sdk(url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)


def test_engines_on_their_own_network_serve_through_the_published_redis(boxes: TwoBoxes) -> None:
    assert not _container_networks(boxes.api) & _container_networks(boxes.engines), "the boxes share a network"
    env = boxes.engines.compose("exec", "-T", "vllm-engine-cpu", "env").stdout
    assert f"CONDUIT_REDIS_URL=redis://{boxes.host}:" in env and "CONDUIT_REDIS_USERNAME=engine" in env
    with sdk(boxes.gateway_urls()[0], boxes.api_key) as client:
        chat = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=16)
        assert chat.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=16, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        image = client.images.generate(model=IMAGE, prompt="a lighthouse", size="64x64",  # type: ignore[arg-type]
                                       response_format="b64_json")
        assert base64.b64decode(image.data[0].b64_json or "")[:4] == b"\x89PNG"  # type: ignore[index]


def test_two_gateway_replicas_each_serve_with_their_own_id(boxes: TwoBoxes) -> None:
    t0 = time.monotonic()
    boxes.gateways = 2
    boxes.up_api()
    boxes.wait_healthy(boxes.api)
    boxes.wait_served("second gateway", {CHAT, IMAGE, NUMBERED})
    note(f"--scale gateway=2: up to both serving {time.monotonic() - t0:.1f} s")
    for url in boxes.gateway_urls():
        with sdk(url, boxes.api_key) as client:
            chat = client.chat.completions.create(model=NUMBERED, messages=[{"role": "user", "content": "Hi"}])
            assert chat.choices[0].message.content == "".join(f"{i} " for i in range(TOKENS)), url
    ids = set()
    for cid in boxes.api.compose("ps", "-q", "gateway").stdout.split():
        logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True, timeout=60).stderr
        ids.update(re.findall(r"gateway (\S+) ready on", logs))
    assert len(ids) == 2, f"gateway ids in the replicas' logs: {ids}"


def test_monitoring_profile_alone_scrapes_both_boxes_through_its_targets(
        boxes: TwoBoxes, deploy_logs: Path, tmp_path: Path) -> None:
    mon = ComposeProject(tmp_path, "monitoring", {"PROMETHEUS_PUBLISH": "127.0.0.1:", "ALERTMANAGER_PUBLISH": "127.0.0.1:"},
                         deploy_logs)
    cred = mon.dir / "prometheus" / "metrics-credential"
    cred.write_text(boxes.credential + "\n")
    cred.chmod(0o644)
    gateways = [u.removeprefix("http://") for u in boxes.gateway_urls()]
    engines = [f"{boxes.host}:{boxes.engines.port(s, 9100)}" for s in ENGINE_SERVICES]
    (mon.dir / "prometheus/targets/gateways.yml").write_text(json.dumps([{"targets": gateways}]))
    (mon.dir / "prometheus/targets/engines.yml").write_text(json.dumps([{"targets": engines, "labels": {"box": "cpu"}}]))
    try:
        t0 = time.monotonic()
        mon.compose("up", "-d", "--no-build", "prometheus", "alertmanager", timeout=READY_DEADLINE_S)
        url = f"http://127.0.0.1:{mon.port('prometheus', 9090)}"

        def targets_up() -> dict[str, list[str]] | None:
            active = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            up = {(t["labels"]["job"], t["labels"]["instance"]) for t in active if t["health"] == "up"}
            want = {("conduit-gateway", g) for g in gateways} | {("conduit-engine", e) for e in engines}
            return {"up": sorted(map(str, up))} if want <= up else None

        mon.wait("monitoring: both gateways and the three engines up", targets_up, 180)
        note(f"monitoring profile (prometheus and alertmanager alone, targets files): up to every target up {time.monotonic() - t0:.1f} s")
    finally:
        mon.down()


def _assert_clean(report: Report, recovered_at: float) -> None:
    """0 lost, 0 duplicated, and the system serves again: requests sent after the fault's
    injection returned (``recovered_at``, seconds into the load) complete."""
    report.publish()
    problems = [f"{report.count(k)} {k}" for k in (LOST, DUPLICATED) if report.count(k)]
    after = [o for o in report.of(COMPLETED) if o.start >= recovered_at]
    if len(after) < 10:
        problems.append(f"only {len(after)} completed of the requests sent after the fault")
    assert not problems, f"{report.fault}: {', '.join(problems)}\n{report.table()}"


def under_load(boxes: TwoBoxes, fault: str, inject: object) -> tuple[Report, float]:
    """The load's report, and when ``inject()`` returned (seconds into the load)."""
    load = SdkLoad(boxes.gateway_urls(), boxes.api_key, model=NUMBERED, tokens=TOKENS, clients=CLIENTS,
                   deadline_s=DEADLINE_S)
    load.start()
    recovered_at = float("inf")
    try:
        time.sleep(WARMUP_S)
        inject()  # type: ignore[operator]
        recovered_at = time.monotonic() - load.t0
        time.sleep(AFTER_S)
    finally:
        report = load.stop(fault)
    boxes.faults.append(report)
    return report, recovered_at


def test_engine_container_stopped_and_started_under_load(boxes: TwoBoxes) -> None:
    def stop_and_start() -> None:
        boxes.engines.compose("stop", "numbered-engine", timeout=120)  # SIGTERM: it drains
        boxes.engines.compose("start", "numbered-engine", timeout=120)
        boxes.wait_served("numbered engine back", {NUMBERED})

    _assert_clean(*under_load(boxes, "engine container stop + start", stop_and_start))


def _usage(boxes: TwoBoxes, key_id: str) -> dict[str, int]:
    """Requests per model in the key's usage, as `conduit keys usage` prints it."""
    out = boxes.api.compose("exec", "-T", "--index", "1", "gateway", "conduit", "keys", "usage", key_id, "--json").stdout
    return {model: m["requests"] for day in json.loads(out)["days"] for model, m in day["models"].items()}


def _settled_usage(boxes: TwoBoxes, key_id: str) -> dict[str, int]:
    """The key's usage once the gateways have flushed all of it (two reads 2 s apart agree; they
    flush every second)."""
    last: dict[str, int] | None = None

    def settled() -> dict[str, int] | None:
        nonlocal last
        now, previous = _usage(boxes, key_id), last
        last = now
        return now if now == previous else None

    return boxes.api.wait("the key's usage settled", settled, 60, every_s=2)


def _keys_listed(boxes: TwoBoxes) -> str:
    return boxes.api.compose("exec", "-T", "--index", "1", "gateway", "conduit", "keys", "list").stdout


def test_redis_container_restart_keeps_the_queue_and_the_keys(boxes: TwoBoxes) -> None:
    key_id = boxes.api_key.split("-")[1]
    assert key_id in _keys_listed(boxes)
    before = _settled_usage(boxes, key_id).get(NUMBERED, 0)

    def restart_redis() -> None:
        boxes.api.compose("restart", "redis", timeout=120)

    # 16 clients on an engine running 8 jobs at once: about 8 jobs are queued when Redis restarts.
    report, recovered_at = under_load(boxes, "redis container restart", restart_redis)
    _assert_clean(report, recovered_at)
    boxes.wait_healthy(boxes.api)
    assert key_id in _keys_listed(boxes), boxes.api.container_logs(200)
    # Every request answered was charged, across the restart.
    after = _settled_usage(boxes, key_id).get(NUMBERED, 0)
    assert after - before >= report.count(COMPLETED), (before, after, report.count(COMPLETED))


def test_down_then_up_keeps_keys_and_usage(boxes: TwoBoxes) -> None:
    key_id = boxes.api_key.split("-")[1]
    before = _settled_usage(boxes, key_id)
    assert before.get(NUMBERED), before
    boxes.api.compose("down", "--timeout", "40", timeout=300)  # no -v: the volumes stay
    t0 = time.monotonic()
    boxes.up_api()
    boxes.wait_healthy(boxes.api)
    # Before asking with the key: a lost key would only show as 401s until the deadline.
    assert _usage(boxes, key_id) == before
    assert key_id in _keys_listed(boxes), boxes.api.container_logs(60)
    boxes.wait_served("after down and up (the engine box reconnected)", {CHAT, IMAGE, NUMBERED})
    note(f"api profile after down + up (2 gateways, engines reconnected): up to serving {time.monotonic() - t0:.1f} s")
    # New gateway processes: the key is read from Redis, not from a cache.
    with sdk(boxes.gateway_urls()[0], boxes.api_key) as client:
        client.chat.completions.create(model=NUMBERED, messages=[{"role": "user", "content": "Hi"}])
    boxes.api.wait("the request after up counted", lambda: True if _usage(boxes, key_id).get(NUMBERED, 0)
                   == before[NUMBERED] + 1 else None, 30)
