"""The `cpu` profile started for a test module: images built, secrets generated, an API key made
by the image's own ``conduit keys``, every container healthy and both models served; ``down -v``
at the end whatever happened. test_cpu_profile.py runs it as shipped, test_observability.py with
the syslog override and a webhook for the alerts."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.deploy import images
from tests.deploy.compose import ComposeProject, hash_metrics_credential, served_models
from tests.deploy.conftest import ImageBuilder, note

CHAT, IMAGE = "tiny-llama", "tiny-sd"
#: Generous: the vLLM engine builds the tiny model, then starts on a shared 2-core machine.
READY_DEADLINE_S = 600


@dataclass
class CpuStack:
    project: ComposeProject
    base_url: str
    prometheus: str
    api_key: str
    up_to_ready_s: float


@contextmanager
def cpu_stack(build_image: ImageBuilder, workdir: Path, logs: Path, *, env: dict[str, str] | None = None,
              files: tuple[str, ...] = ("docker-compose.yml",), label: str = "cpu profile") -> Iterator[CpuStack]:
    """The cpu profile up and ready (``env`` adds to the generated .env, ``files`` are the compose files)."""
    for image in (images.GATEWAY, images.VLLM_CPU, images.DIFFUSERS_CPU):
        build_image(image)
    passwords = {f"REDIS_{role}_PASSWORD": secrets.token_hex(32) for role in ("GATEWAY", "ENGINE", "ADMIN")}
    credential = secrets.token_hex(32)
    full_env = {**passwords, "CONDUIT_METRICS_KEY_HASH": hash_metrics_credential(credential),
                "CONDUIT_MODELS": f"{CHAT},{IMAGE}", "CONDUIT_REQUEST_TIMEOUT_S": "120",
                # Docker-chosen ports on loopback: tests (and other projects) never clash.
                "CONDUIT_GATEWAY_PUBLISH": "127.0.0.1:", "REDIS_PUBLISH": "127.0.0.1:",
                "PROMETHEUS_PUBLISH": "127.0.0.1:", "ALERTMANAGER_PUBLISH": "127.0.0.1:", **(env or {})}
    project = ComposeProject(workdir, "cpu", full_env, logs, files)
    cred = project.dir / "prometheus" / "metrics-credential"
    cred.write_text(credential + "\n")
    cred.chmod(0o644)  # Prometheus runs as nobody
    try:
        t0 = time.monotonic()
        project.compose("up", "-d", "--no-build", timeout=READY_DEADLINE_S)
        base_url = f"http://127.0.0.1:{project.port('gateway', 8000)}"
        prometheus = f"http://127.0.0.1:{project.port('prometheus', 9090)}"
        api_key = project.create_key(passwords["REDIS_ADMIN_PASSWORD"])
        project.wait("both models served",
                     lambda: True if served_models(base_url, api_key) >= {CHAT, IMAGE} else None, READY_DEADLINE_S)
        project.wait("every container healthy",
                     lambda: True if set(project.health().values()) == {"healthy"} else None, READY_DEADLINE_S)
        up_to_ready = time.monotonic() - t0
        note(f"{label}: up to ready (models served, containers healthy) {up_to_ready:.1f} s")
        yield CpuStack(project, base_url, prometheus, api_key, up_to_ready)
    finally:
        project.down()
