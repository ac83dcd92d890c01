"""``conduit up``: the all-in-one local stack as child processes (Redis, engine, gateway)."""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("conduit.up")


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
                  ) -> None:
    """Wait until something accepts connections on ``port`` (or ``proc`` dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def start_redis(port: int, workdir: Path, extra_args: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """A private, non-persistent redis-server on ``port`` (``extra_args``: more server options)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found: install it (Debian: apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning", *extra_args])
    wait_for_port(port, proc=proc, timeout=10)
    return proc


class LocalStack:
    """Redis + one engine + one gateway, stopped together on Ctrl-C / SIGTERM."""

    def __init__(self, *, port: int, redis_port: int, engine: str, workdir: Path) -> None:
        self.port = port
        self.redis_port = redis_port
        self.engine = engine
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def _conduit(self, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", *args])
        self.procs.append(proc)
        return proc

    def run_forever(self) -> int:
        redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        stopping = False

        def stop(*_: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            self.procs.append(start_redis(self.redis_port, self.workdir / "redis"))
            log.info("redis on %s", redis_url)
            if self.engine == "synthetic":
                self._conduit("engine", "--kind", "synthetic", "--redis-url", redis_url)
                model = "synthetic"
            else:
                self._conduit("engine", "--kind", "vllm", "--model", "tiny", "--cpu", "--enforce-eager",
                              "--max-model-len", "2048", "--redis-url", redis_url)
                model = "tiny-llama"
            gw = self._conduit("gateway", "--port", str(self.port), "--redis-url", redis_url)
            wait_for_port(self.port, proc=gw, timeout=60)
            base = f"http://127.0.0.1:{self.port}/v1"
            log.info("gateway on %s; waiting for the %s engine to announce itself", base, model)
            print(f"\nConduit is starting at {base} (model {model!r}); try:\n"
                  f"  curl {base}/chat/completions -H 'Content-Type: application/json' "
                  f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'\n"
                  "Ctrl-C stops it.\n", flush=True)
            while not stopping:
                for p in self.procs:
                    if p.poll() is not None:
                        log.error("%s exited with %s; stopping the stack", p.args, p.returncode)
                        return 1
                time.sleep(0.5)
            return 0
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Gateway and engine first (they drain through Redis), Redis last."""
        for group in (self.procs[1:], self.procs[:1]):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 40
            for p in group:
                try:
                    p.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
