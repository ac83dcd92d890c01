"""``conduit up``: the all-in-one local stack as child processes (Redis, engines, gateway)."""

from __future__ import annotations

import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

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


def start_redis(port: int, workdir: Path, extra_args: Sequence[str] = (), log: Path | None = None
                ) -> subprocess.Popen[bytes]:
    """A private, non-persistent redis-server on ``port`` (``extra_args``: more server options;
    ``log``: where its output goes, else this process's)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found: install it (Debian: apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir),
            "--daemonize", "no", "--loglevel", "warning", *extra_args]
    if log is None:
        proc = subprocess.Popen(argv)
    else:
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
    wait_for_port(port, proc=proc, timeout=10)
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The model names ``conduit up`` serves its tiny models under.
CHAT_MODEL, IMAGE_MODEL, EMBED_MODEL = "tiny-llama", "tiny-sd", "tiny-embed"


def ready_block(base: str, models: list[str], api_key: str, metrics: dict[str, str], logs: Path) -> str:
    """What ``conduit up`` prints once every engine serves: where to send requests, the models,
    the development API key (printed this once), where the metrics are, copy-paste lines."""
    chat = next((m for m in models if m != IMAGE_MODEL), None)
    auth = f"-H 'Authorization: Bearer {api_key}'"
    lines = ["", "Conduit is ready.",
             f"  base URL      {base}",
             f"  models        {', '.join(models)}",
             f"  API key       {api_key}   (development key: shown only now)"]
    for name, url in metrics.items():
        lines.append(f"  metrics       {url}   ({name})")
    lines.append(f"  logs          {logs}")
    lines.append("Try:")
    if chat:
        lines.append(f"  curl {base}/chat/completions {auth} -H 'Content-Type: application/json' "
                     f"-d '{{\"model\": \"{chat}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'")
    if IMAGE_MODEL in models:
        lines.append(f"  curl {base}/images/generations {auth} -H 'Content-Type: application/json' "
                     f"-d '{{\"model\": \"{IMAGE_MODEL}\", \"prompt\": \"a lighthouse at dusk\", \"size\": \"64x64\"}}'"
                     "   # data[0].url is the PNG (random weights: noise)")
    if chat:
        lines.append(f"  {sys.executable} -c \"from openai import OpenAI; print(OpenAI(base_url='{base}', api_key='{api_key}')"
                     f".chat.completions.create(model='{chat}', messages=[{{'role': 'user', 'content': 'Hi'}}])"
                     f".choices[0].message.content)\"")
    lines.append("Ctrl-C stops it.\n")
    return "\n".join(lines)


#: Log-line prefixes (time, level, logger, process) that say nothing about what is happening.
_LOG_PREFIX = re.compile(r"^(\(\w+ pid=\d+\)\s*)?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \w+ [\w.]+: |"
                         r"\w+ \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]*\] )?")


def last_line(log: Path, width: int = 70) -> str:
    """The last non-empty line of a child's log without its time and level, shortened: what it
    is doing now."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    for line in reversed(tail.replace("\r", "\n").splitlines()):
        line = _LOG_PREFIX.sub("", line.strip())
        if line:
            return line if len(line) <= width else line[:width - 1] + "…"
    return ""


def create_dev_key(redis_url: str, key_prefix: str = "conduit") -> str:
    """A new API key (every model, no limits) in the stack's Redis; its text, to print once."""
    import asyncio

    from engines.contract.lane import connect
    from engines.contract.keys import Keys
    from gateway.tenancy.keys import KeyStore

    async def create() -> str:
        redis = connect(redis_url)
        try:
            text, _ = await KeyStore(redis, Keys(key_prefix)).create("development", owner="conduit up")
            return text
        finally:
            await redis.aclose()

    return asyncio.run(create())


@dataclass
class _Engine:
    """One engine process of the stack, as the progress lines show it."""

    model: str
    kind: str
    proc: subprocess.Popen[bytes]
    log: Path
    metrics_port: int
    started: float
    ready: float | None = None


class LocalStack:
    """Redis + a chat engine (+ an image engine) + one gateway, stopped together on Ctrl-C / SIGTERM.

    The children write to log files under ``workdir/logs``; the terminal gets one line per
    component as it becomes ready (an engine still loading shows what its log says every few
    seconds), then one ready block: base URL, models, the development key, metrics, curl lines.
    """

    def __init__(self, *, port: int, redis_port: int, engine: str, workdir: Path, images: bool = True,
                 embeddings: bool = True, out: TextIO | None = None) -> None:
        self.port = port
        self.redis_port = redis_port
        self.engine = engine
        self.workdir = workdir
        # The synthetic stack is for trying the gateway without ML libraries: chat only.
        self.images = images and engine != "synthetic"
        self.embeddings = embeddings and engine != "synthetic"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.out = out or sys.stdout
        self.logs = workdir / "logs"
        self._t0 = time.monotonic()

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _state(self, name: str, what: str) -> None:
        self._say(f"  {name:<12} {what}")

    def _conduit(self, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as f:  # the child keeps its own descriptor
            proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], stdout=f, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc, log

    def run_forever(self) -> int:
        redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        stopping = False

        def stop(*_: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.logs.mkdir(parents=True, exist_ok=True)
        self._say(f"Conduit: starting the local stack (logs in {self.logs})")
        try:
            t = time.monotonic()
            self.procs.append(start_redis(self.redis_port, self.workdir / "redis", log=self.logs / "redis.log"))
            self._state("redis", f"ready on 127.0.0.1:{self.redis_port} ({time.monotonic() - t:.1f} s)")
            api_key = create_dev_key(redis_url)
            engines = self._start_engines(redis_url)
            t = time.monotonic()
            gw, gw_log = self._conduit("gateway", "gateway", "--port", str(self.port), "--redis-url", redis_url)
            try:
                wait_for_port(self.port, proc=gw, timeout=60)
            except (RuntimeError, TimeoutError):
                self._state("gateway", f"failed; see {gw_log}")
                return 1
            base = f"http://127.0.0.1:{self.port}/v1"
            self._state("gateway", f"ready on http://127.0.0.1:{self.port} ({time.monotonic() - t:.1f} s)")
            if not self._wait_for_engines(engines, base, api_key, lambda: stopping):
                return 1 if not stopping else 0
            metrics = {"gateway": f"http://127.0.0.1:{self.port}/metrics"}
            metrics.update({f"{e.model} engine": f"http://127.0.0.1:{e.metrics_port}/metrics" for e in engines})
            self._say(ready_block(base, [e.model for e in engines], api_key, metrics, self.logs))
            while not stopping:
                for p in self.procs:
                    if p.poll() is not None:
                        log.error("%s exited with %s; stopping the stack (logs in %s)", p.args, p.returncode,
                                  self.logs)
                        return 1
                time.sleep(0.5)
            return 0
        finally:
            self._say("Conduit: stopping")
            self.shutdown()

    def _start_engines(self, redis_url: str) -> list[_Engine]:
        specs: list[tuple[str, str, list[str]]] = []
        if self.engine == "synthetic":
            specs.append(("synthetic", "synthetic engine", ["--kind", "synthetic"]))
        else:
            specs.append((CHAT_MODEL, "vLLM engine", ["--kind", "vllm", "--model", "tiny", "--cpu", "--enforce-eager",
                                                      "--max-model-len", "2048"]))
        if self.images:
            # One torch thread: the tiny pipeline gains nothing from more, and vLLM shares the CPU.
            specs.append((IMAGE_MODEL, "diffusers engine", ["--kind", "diffusers", "--model", "tiny", "--served-name",
                                                            IMAGE_MODEL, "--threads", "1"]))
        if self.embeddings:
            specs.append((EMBED_MODEL, "vLLM embedding engine", ["--kind", "vllm-embed", "--model", "tiny", "--cpu",
                                                                 "--enforce-eager", "--max-model-len", "2048"]))
        engines = []
        for model, kind, args in specs:
            port = _free_port()
            proc, log = self._conduit(model, "engine", *args, "--redis-url", redis_url, "--metrics-port", str(port))
            engines.append(_Engine(model, kind, proc, log, port, time.monotonic()))
            self._state(model, f"{kind}: loading the model")
        return engines

    def _wait_for_engines(self, engines: list[_Engine], base: str, api_key: str, stopping: Callable[[], bool]
                          ) -> bool:
        """Until every engine's model is served (True), one dies, or the stack is stopped (False)."""
        import httpx

        next_note = time.monotonic() + 5
        while not stopping():
            for e in engines:
                if e.ready is None and e.proc.poll() is not None:
                    self._state(e.model, f"{e.kind} exited with {e.proc.returncode}: {last_line(e.log)} "
                                         f"(see {e.log})")
                    return False
            try:
                served = {m["id"] for m in httpx.get(f"{base}/models", timeout=2,
                                                      headers={"Authorization": f"Bearer {api_key}"}).json()["data"]}
            except (httpx.HTTPError, ValueError, KeyError):
                served = set()
            for e in engines:
                if e.ready is None and e.model in served:
                    e.ready = time.monotonic()
                    self._state(e.model, f"{e.kind}: ready ({e.ready - e.started:.1f} s)")
            if all(e.ready is not None for e in engines):
                return True
            if time.monotonic() >= next_note:
                next_note = time.monotonic() + 5
                for e in engines:
                    if e.ready is None:
                        self._state(e.model, f"{e.kind}: loading ({time.monotonic() - e.started:.0f} s) "
                                             f"{last_line(e.log)}")
            time.sleep(0.2)
        return False

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
