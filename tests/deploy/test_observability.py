"""Alerts that reach someone and logs that reach a collector, on the `cpu` profile's containers.

One stack for the module (``tests/deploy/stacks.py``), started with ``compose/logging-syslog.yml``:
every container logs through Docker's syslog driver into an rsyslog container the test runs (the
collector that runs here; Loki and Alloy cannot), and Alertmanager's webhook is an HTTP server the
test runs on the host. Requests sent through the ``openai`` SDK with known ``x-request-id`` and
``traceparent`` headers are found, by both ids, in the gateway's and the engines' collected lines.
Then the engines are stopped and ConduitNoLiveEngine (compose/prometheus/alerts.yml, unchanged:
``for: 1m``) must arrive at the webhook, firing, for both models: heartbeats lapse (5 s), the rule
holds for 1 minute, Alertmanager waits ``group_wait`` (30 s) — about 1.5-2 minutes, measured and
printed in the run's summary.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.deploy import bases, stacks
from tests.deploy.compose import host_address
from tests.deploy.conftest import ImageBuilder, note
from tests.deploy.stacks import CHAT, IMAGE, CpuStack

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(2400)]

RSYSLOG_CONF = """\
global(maxMessageSize="64k")
module(load="imtcp")
input(type="imtcp" port="514")
# One line per message: the sender's app name (Docker: the container's name), then the message.
template(name="line" type="string" string="%app-name% %msg%\\n")
*.* action(type="omfile" file="/var/log/collected/all.log" template="line")
"""
#: Time for the engine-down alert to reach the webhook: 5 s heartbeat + 1 min `for:` + 30 s group_wait
#: + scrape and evaluation intervals, with room for a loaded machine.
ALERT_DEADLINE_S = 420


@dataclass
class Syslog:
    """The rsyslog container: where Docker's syslog driver sends, and the file it writes."""

    container: str
    port: int
    file: Path

    def lines(self) -> list[tuple[str, str]]:
        """(app name, message) of every line collected so far."""
        if not self.file.exists():
            return []
        out = []
        for line in self.file.read_text(errors="replace").splitlines():
            app, _, msg = line.partition(" ")
            out.append((app, msg.strip()))
        return out

    def tail(self, n: int = 60) -> str:
        return "---- collected syslog (tail) ----\n" + "\n".join(f"{a} {m}"[:400] for a, m in self.lines()[-n:])


@dataclass
class Webhook:
    """Alertmanager's webhook receiver: every notification's JSON body, in arrival order."""

    url: str
    received: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def syslog(stand_ins: dict[str, bool], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Syslog]:
    workdir = tmp_path_factory.mktemp("syslog")
    (workdir / "rsyslog.conf").write_text(RSYSLOG_CONF)
    (workdir / "collected").mkdir()
    done = subprocess.run(["docker", "run", "-d", "--name", f"conduit-obs-syslog-{secrets.token_hex(4)}",
                           "-p", "127.0.0.1::514/tcp", "-v", f"{workdir / 'rsyslog.conf'}:/etc/rsyslog.conf:ro",
                           "-v", f"{workdir / 'collected'}:/var/log/collected", bases.SYSLOG_IMAGE],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    container = done.stdout.strip()
    try:
        port = int(subprocess.run(["docker", "port", container, "514/tcp"], capture_output=True, text=True,
                                  timeout=30, check=True).stdout.split()[0].rsplit(":", 1)[1])
        collector = Syslog(container, port, workdir / "collected" / "all.log")
        # Ready once a line sent to it is written (a published port accepts before rsyslog listens).
        end = time.monotonic() + 60
        while not any(app == "probe" for app, _ in collector.lines()):
            if time.monotonic() > end:
                logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=30)
                pytest.fail(f"rsyslog never wrote a probe line:\n{logs.stdout}{logs.stderr}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(b"<14>1 2026-01-01T00:00:00Z host probe - - - ready\n")
            except OSError:
                pass
            time.sleep(0.5)
        yield collector
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", container], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    # On the default bridge's gateway address: the host, as every container reaches it (and not
    # on every interface of the machine).
    host = host_address()
    hook = Webhook("")

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            hook.received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Receiver)
    hook.url = f"http://{host}:{server.server_address[1]}/alerts"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def stack(build_image: ImageBuilder, deploy_logs: Path, tmp_path_factory: pytest.TempPathFactory, syslog: Syslog,
          webhook: Webhook) -> Iterator[CpuStack]:
    env = {"SYSLOG_ADDRESS": f"tcp://127.0.0.1:{syslog.port}", "ALERTMANAGER_WEBHOOK_URL": webhook.url}
    with stacks.cpu_stack(build_image, tmp_path_factory.mktemp("observability"), deploy_logs, env=env,
                          files=("docker-compose.yml", "logging-syslog.yml"), label="cpu profile + syslog") as s:
        yield s


def sent_ids(stack: CpuStack) -> dict[str, tuple[str, str, str]]:
    """Send a chat, a streamed chat and an image with known ids; request id → (trace id, engine service, kind)."""
    sent = {}
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=120) as client:
        for kind in ("chat", "stream", "image"):
            rid, trace = f"obs-{kind}-{secrets.token_hex(6)}", os.urandom(16).hex()
            headers = {"x-request-id": rid, "traceparent": f"00-{trace}-{os.urandom(8).hex()}-01"}
            if kind == "image":
                client.images.generate(model=IMAGE, prompt="a harbour", size="64x64",  # type: ignore[arg-type]
                                       response_format="b64_json", extra_headers=headers)
                engine = "diffusers-engine-cpu"
            else:
                answer = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}],
                                                        max_tokens=8, stream=kind == "stream", extra_headers=headers)
                if kind == "stream":
                    list(answer)  # type: ignore[arg-type]
                engine = "vllm-engine-cpu"
            sent[rid] = (trace, engine, kind)
    return sent


def json_fields(msg: str) -> dict[str, Any] | None:
    start = msg.find("{")
    try:
        value = json.loads(msg[start:]) if start >= 0 else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def test_prometheus_sends_alerts_to_alertmanager(stack: CpuStack) -> None:
    def active() -> list[str] | None:
        data = httpx.get(f"{stack.prometheus}/api/v1/alertmanagers", timeout=5).json()["data"]
        urls = [a["url"] for a in data["activeAlertmanagers"]]
        return urls or None

    urls = stack.project.wait("Prometheus: Alertmanager discovered", active, 60)
    assert len(urls) == 1 and urls[0].endswith(":9093/api/v2/alerts"), urls
    port = stack.project.port("alertmanager", 9093)
    status = httpx.get(f"http://127.0.0.1:{port}/api/v2/status", timeout=5).json()
    # The webhook URL from .env is what Alertmanager loaded (start.sh put it in place).
    assert stack.project.name and "set-ALERTMANAGER_WEBHOOK_URL" not in status["config"]["original"]


def test_every_containers_lines_reach_the_syslog_collector_with_request_and_trace_ids(
        stack: CpuStack, syslog: Syslog) -> None:
    sent = sent_ids(stack)
    # docker-compose 1.29 names containers <project>_<service>_1 (Docker's syslog tag: the name).
    container = {s: f"{stack.project.name}_{s}_1" for s in
                 ("redis", "gateway", "vllm-engine-cpu", "diffusers-engine-cpu", "prometheus", "alertmanager")}

    def found() -> dict[str, set[str]] | None:
        where: dict[str, set[str]] = {rid: set() for rid in sent}
        for app, msg in syslog.lines():
            fields = json_fields(msg)
            if fields is None or fields.get("request_id") not in sent:
                continue
            trace, _, _ = sent[fields["request_id"]]
            if fields.get("trace_id") == trace:
                where[fields["request_id"]].add(app)
        complete = all({container["gateway"], container[engine]} <= where[rid]
                       for rid, (_, engine, _) in sent.items())
        return where if complete else None

    try:
        stack.project.wait("each request's id and trace id in the gateway's and its engine's collected lines",
                           found, 60)
    except AssertionError as e:
        raise AssertionError(f"{e}\nsent: {sent}\n{syslog.tail()}") from None
    # Every container of the stack logs there, not only Conduit's.
    apps = {app for app, _ in syslog.lines()}
    missing = {s for s, name in container.items() if name not in apps}
    assert not missing, f"no collected line from {missing}; apps seen: {sorted(apps)}\n{syslog.tail()}"
    # The engine's line is the job's: its outcome, under the request's ids.
    for app, msg in syslog.lines():
        fields = json_fields(msg)
        if fields and fields.get("request_id") in sent and app == container[sent[fields["request_id"]][1]]:
            assert fields["outcome"] == "ok" and fields["logger"] == "conduit.engine", fields


def test_stopping_the_engines_fires_the_engine_down_alert_at_the_webhook(stack: CpuStack, webhook: Webhook) -> None:
    """Last in the module: it stops the engines."""
    before = len(webhook.received)
    t0 = time.monotonic()
    stack.project.compose("stop", "vllm-engine-cpu", "diffusers-engine-cpu", timeout=180)

    def firing() -> set[str] | None:
        models = {a["labels"].get("gen_ai_request_model") for n in webhook.received[before:]
                  if n.get("status") == "firing" for a in n["alerts"]
                  if a["labels"].get("alertname") == "ConduitNoLiveEngine" and a["status"] == "firing"}
        return models if {CHAT, IMAGE} <= models else None

    def state() -> str:
        alerts = httpx.get(f"{stack.prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        return f"Prometheus's alerts: {alerts}; notifications: {webhook.received[before:]}"

    try:
        stack.project.wait("ConduitNoLiveEngine firing at the webhook for both models", firing, ALERT_DEADLINE_S,
                           every_s=2)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{state()}") from None
    note(f"engine-down alert: engines stopped → ConduitNoLiveEngine at the webhook in {time.monotonic() - t0:.0f} s "
         "(shipped rules and Alertmanager config: for 1m, group_wait 30s)")
    notification = next(n for n in webhook.received[before:] if n.get("status") == "firing")
    assert notification["receiver"] == "conduit-webhook" and notification["version"] == "4", notification
    alert = notification["alerts"][0]
    assert alert["labels"]["severity"] == "critical" and "No engine serves" in alert["annotations"]["summary"]
