"""One compose project of the deploy tests: docker-compose 1.29 on a copy of compose/, its own
name and generated secrets, and ``down -v`` at the end whatever happened."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.harness import ROOT

T = TypeVar("T")


class ComposeProject:
    """``compose/`` copied to ``workdir`` (the checkout's ``.env`` and metrics credential stay
    untouched), run under a unique project name with a generated env file."""

    def __init__(self, workdir: Path, profile: str, env: dict[str, str], logs: Path,
                 files: tuple[str, ...] = ("docker-compose.yml",)) -> None:
        self.dir = workdir / "compose"
        shutil.copytree(ROOT / "compose", self.dir, ignore=shutil.ignore_patterns(".env", "metrics-credential"))
        self.name = f"conduit-deploy-{secrets.token_hex(4)}"
        self.profile = profile
        self.env_file = workdir / "deploy.env"
        # Single quotes: argon2 hashes hold `$`, which compose would expand otherwise.
        self.env_file.write_text("".join(f"{k}='{v}'\n" for k, v in env.items()))
        self.logs = logs
        self.files = files

    def _base(self) -> list[str]:
        return ["docker-compose", "-p", self.name, "--env-file", str(self.env_file),
                *(a for f in self.files for a in ("-f", str(self.dir / f))), "--profile", self.profile]

    def compose(self, *args: str, timeout: float = 300, check: bool = True, stdin: str | None = None
                ) -> subprocess.CompletedProcess[str]:
        cmd = [*self._base(), *args]
        done = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=timeout, input=stdin)
        if check and done.returncode:
            raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                                 f"{done.stderr[-3000:]}\n{self.container_logs()}")
        return done

    def container_logs(self, tail: int = 40) -> str:
        done = subprocess.run([*self._base(), "logs", "--no-color", "--tail", str(tail)],
                              cwd=self.dir, capture_output=True, text=True, timeout=60)
        return "---- container logs ----\n" + done.stdout[-12000:]

    def port(self, service: str, port: int) -> int:
        out = self.compose("port", service, str(port)).stdout.strip()
        return int(out.rsplit(":", 1)[1])

    def health(self) -> dict[str, str]:
        """Service → its container's health (or state, without a health check)."""
        ids = self.compose("ps", "-q").stdout.split()
        if not ids:
            return {}
        done = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, timeout=60, check=True)
        out = {}
        for c in json.loads(done.stdout):
            service = c["Config"]["Labels"]["com.docker.compose.service"]
            state = c["State"]
            out[service] = state.get("Health", {}).get("Status") or state["Status"]
        return out

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
