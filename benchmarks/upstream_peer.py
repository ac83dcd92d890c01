"""The shared peer harness's zero-delay mock, directly and behind Conduit's upstream engine (keys on).

    python benchmarks/upstream_peer.py [--harness ../shared/bench] [--quick] [-- harness options]

Starts the harness's ``mock_openai.py``, a private Redis, a Conduit gateway with authentication on
(one API key, no limits) and an upstream engine forwarding model ``mock`` to the mock, then runs
``peer_overhead.sh`` with the targets ``mock`` (the baseline) and ``conduit-upstream`` and prints its
report. ``--litellm BIN`` (a ``litellm`` installed with ``litellm[proxy]``) also starts LiteLLM's
proxy with two workers in front of the same mock, as the harness's ``run_litellm_peer.sh`` does
(its master key on), measured in the same run as the peer. Needs ``wrk``.
Run on purpose, not in CI.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gateway.stack import wait_for_port  # noqa: E402 - after the path that finds it
from tests.harness import Proc, RedisServer, Stack, free_port  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--harness", default=str(ROOT.parent / "shared" / "bench"))
    ap.add_argument("--quick", action="store_true", help="short runs: wrk 10 s at c=64, 100 streams for 10 s")
    ap.add_argument("--litellm", help="the litellm command (litellm[proxy]): measure it as the peer, 2 workers")
    ap.add_argument("rest", nargs="*", help="passed to peer_overhead.sh")
    args = ap.parse_args()
    harness = Path(args.harness)
    work = Path(tempfile.mkdtemp(prefix="conduit-upstream-peer-"))
    mock_port = free_port()
    mock = Proc([sys.executable, str(harness / "mock_openai.py"), "--port", str(mock_port)], work / "mock.log")
    redis = RedisServer(work)
    stack = Stack(redis.url, work)
    try:
        wait_for_port(mock_port, proc=mock.proc, timeout=30)
        peer: list[str] = []
        if args.litellm:
            port = free_port()
            env = {"MOCK_API_BASE": f"http://127.0.0.1:{mock_port}/v1", "LITELLM_LOG": "ERROR",
                   "LITELLM_MODE": "PRODUCTION", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
            litellm = Proc([args.litellm, "--config", str(harness / "litellm.config.yaml"), "--host", "127.0.0.1",
                            "--port", str(port), "--num_workers", "2"], work / "litellm.log", env)
            stack.procs.append(litellm)  # stopped with the stack
            wait_for_port(port, proc=litellm.proc, timeout=180)
            peer = ["-t", f"litellm-2w=http://127.0.0.1:{port}/v1,key=sk-bench-master"]
        stack.gateway(auth=True)
        made = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "create", "--name", "bench", "--redis-url",
                               redis.url, "--key-prefix", stack.prefix], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=60)
        stack.api_key = key = made.stdout.strip()
        stack.engine("--kind", "upstream", "--base-url", f"http://127.0.0.1:{mock_port}/v1", "--served-name", "mock",
                     "--max-concurrency", "512", model="mock")
        quick = ["-c", "64", "-s", "100", "-d", "10", "-w", "3", "--stream-duration", "10", "--stream-warmup", "3",
                 "--pause", "1"] if args.quick else []
        subprocess.run(["bash", str(harness / "peer_overhead.sh"), "-t", f"mock=http://127.0.0.1:{mock_port}/v1",
                        *peer, "-t", f"conduit-upstream={stack.base_url}/v1,key={key}", "--backend-port", str(mock_port),
                        "--python", sys.executable, "-o", str(work / "results"), *quick, *args.rest], check=True)
    finally:
        stack.stop()
        mock.stop()
        redis.stop()


if __name__ == "__main__":
    main()
