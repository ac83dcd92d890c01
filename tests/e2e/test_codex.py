"""The Codex CLI (`codex exec`; npm `@openai/codex`, pinned in `.ci/install`, which installs it into
`.cache/codex`) against the gateway's `/v1/responses`, configured by `examples/codex-config.toml`
as a user would be: a keyed gateway, synthetic engines (one that answers text, one scripted to call
the first tool Codex offers), real turns. Codex speaks only the Responses API, streamed, with the
whole conversation every turn (`store: false`), its shell tool's results as `function_call_output`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import ROOT, RedisServer, Stack, ThreadedServer

CODEX = ROOT / ".cache" / "codex" / "node_modules" / ".bin" / "codex"
CONFIG = ROOT / "examples" / "codex-config.toml"
#: The version `.ci/install --test` installs (one pin, read from there).
PINNED = re.search(r"^codex_version=(\S+)$", (ROOT / ".ci" / "install").read_text(), re.MULTILINE)
TOKENS = 6
#: The scripted call: Codex's first tool is `exec_command` (`cmd`, a shell command line). Its output
#: is computed by the shell, so an answer that holds it proves the command ran, not an echo of it.
COMMAND = "echo codex-ran-$((6*7))"
RAN = "codex-ran-42"


class Outbound(ThreadedServer):
    """Where Codex's proxy settings point: it lets nothing through and keeps the first line of each
    connection (`CONNECT github.com:443 ...`), so a test sees anything Codex calls but the gateway."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        super().__init__()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.lines.append((await r.readline()).decode(errors="replace").strip())
        w.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await w.drain()
        w.close()


@pytest.fixture(scope="module")
def codex() -> Path:
    """The pinned Codex binary. Absent, the test fails, saying how to install it: the test command
    (`bash .ci/install --test && ...`) installs it, so it is never silently skipped."""
    assert PINNED, ".ci/install pins no codex_version"
    if not CODEX.exists():
        pytest.fail(f"the Codex CLI is not installed: `bash .ci/install --test` puts @openai/codex@{PINNED[1]} in "
                    ".cache/codex")
    version = subprocess.run([CODEX, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert version.split() == ["codex-cli", PINNED[1]], f"{version!r}: run `bash .ci/install --test` again"
    return CODEX


@pytest.fixture(scope="module")
def keyed(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(redis_server.url, tmp_path_factory.mktemp("codex-stack"))
    try:
        s.gateway(auth=True)
        made = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "create", "--name", "codex",
                               "--redis-url", s.redis_url, "--key-prefix", s.prefix],
                              cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
        s.api_key = made.stdout.strip()
        s.synthetic("codex-text", "--tokens", str(TOKENS))
        s.synthetic("codex-tools", "--tool-calls", "--tool-arguments", json.dumps({"cmd": COMMAND}))
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def outbound() -> Iterator[Outbound]:
    proxy = Outbound()
    yield proxy
    proxy.stop()


def codex_exec(codex: Path, stack: Stack, outbound: Outbound, where: Path, model: str,
               prompt: str) -> subprocess.CompletedProcess[str]:
    """One `codex exec` turn with the example config (its own CODEX_HOME, HOME and working folder),
    pointed at ``stack``'s gateway. No retries: a turn the gateway fails once shows as failed."""
    home = where / "codex-home"
    work = where / "work"
    home.mkdir()
    work.mkdir()
    shutil.copy(CONFIG, home / "config.toml")
    proxy = f"http://127.0.0.1:{outbound.port}"
    env = {"PATH": os.environ["PATH"], "HOME": str(where), "CODEX_HOME": str(home), "CONDUIT_API_KEY": stack.api_key,
           "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "ALL_PROXY": proxy, "NO_PROXY": "127.0.0.1,localhost"}
    provider = "model_providers.conduit"
    # danger-full-access: the test is about the gateway, and Codex's sandbox (bubblewrap) needs
    # namespaces a CI host may not give. The example's `read-only` passes here too, but fails every
    # command in a chroot of fresh Debian (measured).
    argv = [str(codex), "exec", "--skip-git-repo-check", "--ephemeral", "--strict-config", "--color", "never",
            "-c", f'{provider}.base_url="{stack.base_url}/v1"', "-c", f"{provider}.request_max_retries=0",
            "-c", f"{provider}.stream_max_retries=0", "-c", 'sandbox_mode="danger-full-access"',
            "-m", model, prompt]
    # stdin closed: Codex reads a prompt addition from a stdin that is not a terminal.
    return subprocess.run(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120, check=False)


def test_a_text_turn_prints_the_engines_answer(codex: Path, keyed: Stack, outbound: Outbound,
                                               tmp_path: Path) -> None:
    done = codex_exec(codex, keyed, outbound, tmp_path, "codex-text", "say hi")
    assert done.returncode == 0, done.stderr[-3000:]
    # stdout is the final message alone; the synthetic engine's answer is TOKENS tokens of "tok ".
    assert done.stdout.strip() == ("tok " * TOKENS).strip(), done.stderr[-3000:]
    assert outbound.lines == []


def test_a_tool_round_trip_runs_the_command_and_answers_with_its_output(codex: Path, keyed: Stack,
                                                                        outbound: Outbound, tmp_path: Path) -> None:
    done = codex_exec(codex, keyed, outbound, tmp_path, "codex-tools", "run the echo")
    assert done.returncode == 0, done.stderr[-3000:]
    # The engine's second answer is "tool said: <the function_call_output Codex sent>": the
    # shell's output, computed by the shell, came back through /v1/responses.
    assert done.stdout.startswith("tool said: "), done.stdout + done.stderr[-3000:]
    assert RAN in done.stdout and "Process exited with code 0" in done.stdout, done.stdout
    assert COMMAND in done.stderr  # Codex's own account of the command it ran
    assert outbound.lines == []


def test_a_refused_request_shows_the_gateways_error(codex: Path, keyed: Stack, outbound: Outbound,
                                                   tmp_path: Path) -> None:
    done = codex_exec(codex, keyed, outbound, tmp_path, "no-such-model", "say hi")
    same = httpx.post(f"{keyed.base_url}/v1/responses", json={"model": "no-such-model", "input": "say hi"},
                      headers={"Authorization": f"Bearer {keyed.api_key}"}, timeout=30)
    assert same.status_code == 404 and same.json()["error"]["code"] == "model_not_found"
    assert done.returncode == 1 and done.stdout == ""
    # Codex prints the error envelope's message as the turn's error.
    assert f"ERROR: {same.json()['error']['message']}\n" in done.stderr, done.stderr[-3000:]
