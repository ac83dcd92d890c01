"""``conduit up``: the all-in-one local stack as child processes (Redis, engines, gateway)."""

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


#: The model names ``conduit up`` serves its tiny models under.
CHAT_MODEL, IMAGE_MODEL = "tiny-llama", "tiny-sd"


def startup_message(base: str, chat_model: str, image_model: str | None, api_key: str) -> str:
    """What ``conduit up`` prints once its gateway listens: the models, the development API key
    (printed this once), and a curl line for each model and an SDK line, using that key."""
    models = f"models {chat_model!r} and {image_model!r}" if image_model else f"model {chat_model!r}"
    auth = f"-H 'Authorization: Bearer {api_key}'"
    lines = [f"\nConduit is starting at {base} ({models}).",
             f"Development API key (shown only now): {api_key}",
             "Try:",
             f"  curl {base}/chat/completions {auth} -H 'Content-Type: application/json' "
             f"-d '{{\"model\": \"{chat_model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'"]
    if image_model:
        lines.append(f"  curl {base}/images/generations {auth} -H 'Content-Type: application/json' "
                     f"-d '{{\"model\": \"{image_model}\", \"prompt\": \"a lighthouse at dusk\", \"size\": \"64x64\"}}'"
                     "   # the answer's data[0].url is the PNG (random weights: noise)")
    lines.append(f"  python -c \"from openai import OpenAI; print(OpenAI(base_url='{base}', api_key='{api_key}')"
                 f".chat.completions.create(model='{chat_model}', messages=[{{'role': 'user', 'content': 'Hi'}}])"
                 f".choices[0].message.content)\"")
    lines.append("Ctrl-C stops it.\n")
    return "\n".join(lines)


def create_dev_key(redis_url: str, key_prefix: str = "conduit") -> str:
    """A new API key (every model, no limits) in the stack's Redis; its text, to print once."""
    import asyncio

    from engines.lane import connect
    from engines.wire import Keys
    from gateway.tenancy.keys import KeyStore

    async def create() -> str:
        redis = connect(redis_url)
        try:
            text, _ = await KeyStore(redis, Keys(key_prefix)).create("development", owner="conduit up")
            return text
        finally:
            await redis.aclose()

    return asyncio.run(create())


class LocalStack:
    """Redis + a chat engine (+ an image engine) + one gateway, stopped together on Ctrl-C / SIGTERM."""

    def __init__(self, *, port: int, redis_port: int, engine: str, workdir: Path, images: bool = True) -> None:
        self.port = port
        self.redis_port = redis_port
        self.engine = engine
        self.workdir = workdir
        # The synthetic stack is for trying the gateway without ML libraries: chat only.
        self.images = images and engine != "synthetic"
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
            api_key = create_dev_key(redis_url)
            if self.engine == "synthetic":
                self._conduit("engine", "--kind", "synthetic", "--redis-url", redis_url)
                model = "synthetic"
            else:
                self._conduit("engine", "--kind", "vllm", "--model", "tiny", "--cpu", "--enforce-eager",
                              "--max-model-len", "2048", "--redis-url", redis_url)
                model = CHAT_MODEL
            image_model = None
            if self.images:
                # One torch thread: the tiny pipeline gains nothing from more, and vLLM shares the CPU.
                self._conduit("engine", "--kind", "diffusers", "--model", "tiny", "--served-name", IMAGE_MODEL,
                              "--threads", "1", "--redis-url", redis_url)
                image_model = IMAGE_MODEL
            gw = self._conduit("gateway", "--port", str(self.port), "--redis-url", redis_url)
            wait_for_port(self.port, proc=gw, timeout=60)
            base = f"http://127.0.0.1:{self.port}/v1"
            log.info("gateway on %s; waiting for the engines (%s) to announce themselves", base,
                     ", ".join(m for m in (model, image_model) if m))
            print(startup_message(base, model, image_model, api_key), flush=True)
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
