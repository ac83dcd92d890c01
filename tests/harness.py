"""Processes the tests run for real: redis-server, gateways and engines (as `conduit` runs them)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai

from gateway.stack import start_redis, wait_for_port

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def request_lines(self) -> list[dict[str, Any]]:
        """A gateway's JSON request log lines (``conduit.request``) written so far."""
        return [json.loads(line) for line in self.output().splitlines()
                if line.startswith("{") and '"conduit.request"' in line]

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._out.close()
                raise AssertionError(f"{self.proc.args} did not stop within {timeout}s of SIGTERM:\n"
                                     f"{self.output()[-3000:]}") from None
        self._out.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._out.close()


#: ``CONDUIT_TEST_REDIS_USERS=1``: every :class:`RedisServer` gets Conduit's gateway and engine users
#: (engines/contract/acl.py, for every test's prefix ``t*``) and every gateway and engine a
#: :class:`Stack` starts on it logs in as its role, so a flow of the suite that Redis refuses a
#: command fails its test (the server's ``ACL LOG``, checked when it stops). The default user stays
#: open for the tests' own reads and ``conduit keys``.
REDIS_USERS = os.environ.get("CONDUIT_TEST_REDIS_USERS", "") == "1"
#: The users and their passwords in that mode (test-only).
USER_PASSWORDS = {"gateway": "test-gateway-password", "engine": "test-engine-password"}


class ThreadedServer:
    """An asyncio TCP server (:meth:`_serve` per connection; TLS with ``ssl``) on a thread and an
    event loop of its own, on a free port of 127.0.0.1, until :meth:`stop`."""

    def __init__(self, ssl: Any = None) -> None:
        self.port = free_port()
        self._ssl = ssl
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(10), f"{type(self).__name__} did not start"

    def _run(self, ready: threading.Event) -> None:
        async def main() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self._ssl)
            ready.set()
            await self._server.serve_forever()

        try:
            self._loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        for task in asyncio.all_tasks(self._loop):
            self._loop.call_soon_threadsafe(task.cancel)
        self._thread.join(10)
        self._loop.close()


def build_tiny_llama(path: Path) -> Path:
    """The offline tiny random-weight Llama at ``path``, built by ``conduit models build-tiny`` in a
    child process (as a user builds it; the caller's process loads no ML library)."""
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "models", "build-tiny", "--only", "llama",
                           "--path", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"building the tiny Llama failed:\n{done.stderr[-3000:]}")
    return path


def wait_for_openai_server(server: Proc, port: int, timeout: float = 300) -> None:
    """Until the OpenAI-compatible server ``server`` answers ``/v1/models`` on ``port`` (it failing, or
    the timeout, fails with the end of its log)."""
    deadline = time.monotonic() + timeout
    while True:
        assert server.alive(), server.output()[-5000:]
        assert time.monotonic() < deadline, f"the server did not start in {timeout:g} s:\n" + server.output()[-5000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def redis_user_args() -> list[str]:
    """redis-server options defining the gateway and engine users for every test prefix (``t*``)."""
    from engines.contract.acl import user_rules

    return [arg for role, password in USER_PASSWORDS.items()
            for arg in ("--user", role, "on", f">{password}", *user_rules("t*", role))]


class RedisServer:
    """A private redis-server; ``args`` are extra server options (kept across :meth:`restart`)."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.args = (*args, *redis_user_args()) if REDIS_USERS else args
        self.proc = start_redis(self.port, workdir, self.args)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        refused = self.refusals() if REDIS_USERS and self.proc.poll() is None else []
        self.proc.terminate()
        self.proc.wait(timeout=10)
        assert not refused, f"Redis refused Conduit's users: {refused}"

    def refusals(self) -> list[str]:
        """What Redis refused the gateway and engine users (``ACL LOG``), with its context."""
        import redis

        with redis.Redis(port=self.port, decode_responses=True, socket_timeout=5) as r:
            return [f"{e['username']}: {e['reason']} {e['object']} ({e['context']})" for e in r.acl_log(count=100)
                    if e["username"] in USER_PASSWORDS]

    def restart(self) -> None:
        """Stop and start again on the same port: every key is gone (no persistence)."""
        self.stop()
        self.proc = start_redis(self.port, self.workdir, self.args)


class Stack:
    """Gateways and engines of one test, sharing a key prefix of their own on a shared Redis."""

    def __init__(self, redis_url: str, workdir: Path) -> None:
        self.redis_url = redis_url
        #: Role -> (user, password) that processes on ``redis_url`` log in as (``REDIS_USERS``; not on a
        #: cluster, whose nodes have no such users).
        self.users = {} if not REDIS_USERS or "+cluster" in redis_url else \
            {role: (role, password) for role, password in USER_PASSWORDS.items()}
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        self.procs: list[Proc] = []
        self._clients: list[openai.OpenAI] = []
        self.base_url = ""
        self.port = 0
        #: (base URL, Redis URL, process) of every gateway started, for :meth:`wait_for_model`.
        self.gateways: list[tuple[str, str, Proc]] = []
        #: The API key ``sdk()`` and ``wait_for_model`` send (gateways started with ``auth=True``).
        self.api_key = ""

    def _cli(self, name: str, *args: str, env: dict[str, str] | None = None, program: str = "gateway.cli") -> Proc:
        """``args`` run by ``program``: ``gateway.cli`` (the ``conduit`` command) or ``engines`` (the
        engine's own, which ``conduit engine`` runs in its place: started directly, it saves an
        interpreter start, as a container's entrypoint could)."""
        log = self.workdir / f"{name}-{len(self.procs)}.log"
        proc = Proc([sys.executable, "-P", "-m", program, *args], log, env)
        self.procs.append(proc)
        return proc

    def gateway(self, redis_url: str | None = None, **settings: object) -> Proc:
        """Start a gateway; ``settings`` are GatewaySettings fields (as CONDUIT_* variables)."""
        self.port = free_port()
        log_level = str(settings.pop("log_level", "warning"))
        # Without auth unless the test asks for it (``auth=True``): most tests are about other things.
        env = {"CONDUIT_REGISTRY_REFRESH_S": "0.1", "CONDUIT_AUTH": "false", **self._login("gateway", redis_url)}
        env.update({f"CONDUIT_{k.upper()}": str(v) for k, v in settings.items()})
        proc = self._cli("gateway", "gateway", "--port", str(self.port), "--redis-url", redis_url or self.redis_url,
                         "--key-prefix", self.prefix, "--log-level", log_level, env=env)
        try:
            wait_for_port(self.port, proc=proc.proc, timeout=30)
        except Exception as exc:
            raise RuntimeError(f"gateway did not start:\n{proc.output()}") from exc
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.gateways.append((self.base_url, redis_url or self.redis_url, proc))
        return proc

    def engine(self, *args: str, model: str | None = None, wait: bool = True, timeout: float = 30,
               env: dict[str, str] | None = None, redis_url: str | None = None) -> Proc:
        """Start an engine (``args`` as for ``conduit engine``); wait until the gateway lists ``model``."""
        proc = self._cli("engine", "serve", "--redis-url", redis_url or self.redis_url, "--key-prefix", self.prefix,
                         "--log-level", "info", *args, env={**self._login("engine", redis_url), **(env or {})},
                         program="engines")
        if wait and model:
            self.wait_for_model(model, proc, timeout=timeout, redis_url=redis_url or self.redis_url)
        return proc

    def _login(self, role: str, redis_url: str | None) -> dict[str, str]:
        """The environment that logs a ``role`` process in as its user (``REDIS_USERS``)."""
        if role not in self.users or "+cluster" in (redis_url or ""):
            return {}
        user, password = self.users[role]
        return {"CONDUIT_REDIS_USERNAME": user, "CONDUIT_REDIS_PASSWORD": password}

    def synthetic(self, model: str = "synthetic", *args: str, wait: bool = True, redis_url: str | None = None) -> Proc:
        return self.engine("--kind", "synthetic", "--served-name", model, *args, model=model.split(",")[0], wait=wait,
                           redis_url=redis_url)

    def diffusers(self, model: str = "tiny-sd", *args: str, path: Path | str | None = None, wait: bool = True,
                  timeout: float = 60, env: dict[str, str] | None = None, redis_url: str | None = None) -> Proc:
        """Start a diffusers engine serving the pipeline at ``path`` as ``model`` (``args`` as for
        ``conduit engine``). Pass the session's ``tiny_sd_dir``: without ``path`` the engine builds
        the tiny pipeline itself (``--model tiny``) into ``CONDUIT_CACHE_DIR``."""
        where = str(path) if path is not None else "tiny"
        # One torch thread: on a small shared CPU, OpenMP threads spinning against the other
        # processes make every kernel 10-100x slower.
        return self.engine("--kind", "diffusers", "--model", where, "--served-name", model, "--threads", "1", *args,
                           model=model,
                           wait=wait, timeout=timeout, env=env, redis_url=redis_url)

    def wait_for_model(self, model: str, proc: Proc | None = None, *, timeout: float = 30, present: bool = True,
                       redis_url: str | None = None) -> None:
        """Wait until the latest gateway, and every other running one on ``redis_url`` (the stack's)
        that ``api_key`` may read, lists ``model`` (or, with ``present=False``, none does): each
        refreshes its view of the engines on its own clock, so one gateway seeing a new engine says
        nothing about the others."""
        redis_url = redis_url or self.redis_url
        others = [url for url, on, gw in self.gateways if on == redis_url and gw.alive() and url != self.base_url]
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

        def settled(url: str, *, latest: bool) -> bool:
            r = httpx.get(f"{url}/v1/models", headers=headers)
            if r.status_code == 401 and not latest:
                return True  # a keyed gateway of another part of the test: not ours to read
            return (model in {m["id"] for m in r.json()["data"]}) == present

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and present and not proc.alive():
                raise RuntimeError(f"engine exited:\n{proc.output()}")
            if settled(self.base_url, latest=True) and all(settled(url, latest=False) for url in others):
                return
            time.sleep(0.1)
        raise TimeoutError(f"model {model!r} {'never appeared' if present else 'never went away'}"
                           + (f"\n{proc.output()}" if proc else ""))

    def sdk(self) -> openai.OpenAI:
        """The `openai` SDK pointed at the latest gateway (closed with the stack)."""
        client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "unused", max_retries=0)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        """Stop every process, then report the first that would not stop."""
        for client in self._clients:
            client.close()
        errors: list[AssertionError] = []
        for p in reversed(self.procs):
            try:
                p.stop()
            except AssertionError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def hang_up_after(url: str, body: dict[str, object], events: int) -> None:
    """Open an SSE stream, read ``events`` data events, then close the connection."""
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == events:
                return
