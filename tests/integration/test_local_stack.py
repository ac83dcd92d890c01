"""``conduit up`` as a person runs it: progress per component, then one ready block whose
base URL, key and metrics addresses work; Ctrl-C stops everything. The synthetic engine
keeps it fast (the vLLM and diffusers stacks print the same lines, with loading progress)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.harness import ROOT, free_port


def test_conduit_up_reports_progress_then_one_working_ready_block(tmp_path: Path) -> None:
    port, redis_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "up", "--engine", "synthetic", "--port", str(port),
                             "--redis-port", str(redis_port), "--workdir", str(tmp_path / "stack")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"conduit up ended early:\n{''.join(lines)}"
            lines.append(line)
            if line.startswith("Ctrl-C stops it."):
                break
        out = "".join(lines)
        # Each component reports itself ready, in order, before the ready block.
        order = [out.index(marker) for marker in (
            "Conduit: starting the local stack", f"redis        ready on 127.0.0.1:{redis_port}",
            "synthetic    synthetic engine: loading", f"gateway      ready on http://127.0.0.1:{port}",
            "synthetic    synthetic engine: ready", "Conduit is ready.")]
        assert order == sorted(order), out
        base = re.search(r"base URL\s+(\S+)", out).group(1)  # type: ignore[union-attr]
        key = re.search(r"API key\s+(cdt-\S+)", out).group(1)  # type: ignore[union-attr]
        assert base == f"http://127.0.0.1:{port}/v1"
        assert re.search(r"models\s+synthetic", out)
        # The printed key, base URL and metrics addresses work.
        r = httpx.post(f"{base}/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": "synthetic", "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
        assert httpx.post(f"{base}/chat/completions", json={"model": "synthetic", "messages": []}).status_code == 401
        urls = re.findall(r"metrics\s+(http://\S+)", out)
        assert len(urls) == 2, out  # the gateway's and the engine's
        for url in urls:
            assert httpx.get(url, timeout=10).status_code == 200
        assert "curl " in out and key in out
        # The children's output went to log files, not to the terminal.
        logs = {p.name for p in (tmp_path / "stack" / "logs").iterdir()}
        assert {"redis.log", "gateway.log", "synthetic.log"} <= logs
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0, rest
    assert "Conduit: stopping" in rest
