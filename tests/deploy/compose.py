"""One compose project of the deploy tests: docker-compose 1.29 on a copy of compose/, its own
name and generated secrets, and ``down -v`` at the end whatever happened; and what every deploy
test asks of a running stack (the metrics credential's hash, an API key, the models served)."""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.deploy import images
from tests.harness import ROOT

T = TypeVar("T")
_KEY = re.compile(r"cdt-[0-9a-f]{12}-[A-Za-z0-9_-]{43}")


def hash_metrics_credential(credential: str) -> str:
    """CONDUIT_METRICS_KEY_HASH, made by the gateway image itself (compose/README.md's recipe)."""
    done = subprocess.run(["docker", "run", "--rm", "-i", images.GATEWAY.tag, "keys", "hash-metrics"],
                          input=credential + "\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def served_models(base_url: str, api_key: str) -> set[str]:
    r = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=5)
    r.raise_for_status()
    return {m["id"] for m in r.json()["data"]}


def host_address() -> str:
    """The host's address on Docker's default bridge (docker0): every container reaches it, from
    any compose network, as a second machine reaches the API box's private address.

    The bridge network's IPAM config names it as its ``Gateway``, except where a daemon made docker0
    itself at its start and recorded the subnet alone (seen once here: an empty answer made every
    published port ``:port``); then it is docker0's own address, the subnet's first."""
    done = subprocess.run(["docker", "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"],
                          capture_output=True, text=True, timeout=30, check=True)
    for config in json.loads(done.stdout or "[]") or []:
        if config.get("Gateway"):
            return str(config["Gateway"])
        if config.get("Subnet"):
            network = ipaddress.ip_network(config["Subnet"], strict=False)
            if network.version == 4:
                return str(next(network.hosts()))
    raise AssertionError(f"Docker's default bridge has no IPv4 address: {done.stdout!r}")


def free_port(address: str) -> int:
    """A port free on ``address`` now (for a service that must keep its port across ``down``/``up``)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class ComposeProject:
    """``compose/`` copied to ``workdir`` (the checkout's ``.env`` and metrics credential stay
    untouched), run under a unique project name with a generated env file."""

    def __init__(self, workdir: Path, profile: str, env: dict[str, str], logs: Path,
                 files: tuple[str, ...] = ("docker-compose.yml",), overrides: dict[str, str] | None = None) -> None:
        """``files``: compose files of compose/, in order; ``overrides``: file name → text of compose
        files the test writes, read after them (as a user's ``docker-compose.override.yml`` is)."""
        self.dir = workdir / "compose"
        shutil.copytree(ROOT / "compose", self.dir, ignore=shutil.ignore_patterns(".env", "metrics-credential"))
        self.name = f"conduit-deploy-{secrets.token_hex(4)}"
        self.profile = profile
        self.env_file = workdir / "deploy.env"
        # Single quotes: argon2 hashes hold `$`, which compose would expand otherwise.
        self.env_file.write_text("".join(f"{k}='{v}'\n" for k, v in env.items()))
        self.logs = logs
        self.files = list(files)
        for name, text in (overrides or {}).items():
            (self.dir / name).write_text(text)
            self.files.append(name)

    def _command(self) -> list[str]:
        return ["docker-compose", "-p", self.name, "--env-file", str(self.env_file),
                *(a for f in self.files for a in ("-f", str(self.dir / f))), "--profile", self.profile]

    def compose(self, *args: str, timeout: float = 300, check: bool = True, stdin: str | None = None
                ) -> subprocess.CompletedProcess[str]:
        base = self._command()
        cmd = [*base, *args]
        done = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=timeout, input=stdin)
        if check and done.returncode:
            raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                                 f"{done.stderr[-3000:]}\n{self.container_logs()}")
        return done

    def container_logs(self, tail: int = 40) -> str:
        done = subprocess.run([*self._command(), "logs", "--no-color", "--tail", str(tail)],
                              cwd=self.dir, capture_output=True, text=True, timeout=60)
        return "---- container logs ----\n" + done.stdout[-12000:]

    def port(self, service: str, port: int, index: int = 1) -> int:
        out = self.compose("port", "--index", str(index), service, str(port)).stdout.strip()
        return int(out.rsplit(":", 1)[1])

    def create_key(self, admin_password: str, name: str = "deploy-test") -> str:
        """An API key for every model, made by the gateway image's own ``conduit keys`` as Redis's
        admin user; the password on stdin, never on a command line."""
        made = self.compose("exec", "-T", "gateway", "sh", "-c",
                            'read -r CONDUIT_REDIS_PASSWORD && export CONDUIT_REDIS_PASSWORD && '
                            f'exec conduit keys create --redis-username admin --name {name} --models all',
                            stdin=admin_password + "\n")
        key = _KEY.search(made.stdout)
        assert key, f"no key in `conduit keys create`'s output: {made.stdout!r} {made.stderr!r}"
        return key[0]

    def containers(self) -> dict[str, dict[str, Any]]:
        """Service → ``docker inspect`` of its (last) container."""
        ids = self.compose("ps", "-q").stdout.split()
        if not ids:
            return {}
        done = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, timeout=60, check=True)
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in json.loads(done.stdout)}

    def health(self) -> dict[str, str]:
        """Service → its container's health (or state, without a health check)."""
        return {service: c["State"].get("Health", {}).get("Status") or c["State"]["Status"]
                for service, c in self.containers().items()}

    def wait(self, what: str, probe: Callable[[], T | None], deadline_s: float, every_s: float = 1.0) -> T:
        """``probe()``'s first non-None answer; past the deadline, a failure with the containers' logs."""
        end = time.monotonic() + deadline_s
        last: object = None
        while True:
            try:
                answer = probe()
            except Exception as e:  # noqa: BLE001 (any failure of a probe means: not yet)
                answer, last = None, e
            if answer is not None:
                return answer
            if time.monotonic() > end:
                raise AssertionError(f"{what}: not within {deadline_s:.0f} s (last: {last!r}; health: "
                                     f"{self.health()})\n{self.container_logs()}")
            time.sleep(every_s)

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300, check=False)
