#!/usr/bin/env python3
"""auth_overhead.py - what API keys and per-key limits cost the gateway path.

Starts one redis-server and one synthetic engine (zero delay) and two gateways on them:
``open`` (``auth = false``) and one with ``auth = true``, measured twice: ``keyed`` with a key
without limits (authentication, fair-queue tenancy and usage accounting) and ``limited`` with
a key whose requests-, tokens-per-minute and concurrency limits are set far above the load (so
every request also passes the limiter's script in Redis and releases its grant after). Runs
``benchmarks/gateway_path.py`` against the three, alternating ``--rounds`` times (this machine
is shared and noisy: compare means of alternated runs), and prints the mean requests/s and p50
per concurrency and the differences from ``open``.

    python benchmarks/auth_overhead.py [--rounds 3] [--quick] [-c "1 64"] [-o results.json]

Run on purpose, not in CI. Needs ``redis-server`` and the project's venv; no network.
Targets from issue 7: at most +0.2 ms at p50 (one client) and at most 10% fewer requests/s
at 64 concurrent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY_RE = re.compile(r"cdt-[0-9a-f]{12}-[A-Za-z0-9_-]{43}")
#: Limits far above what one machine can send: every request runs the limiter, none is refused.
LIMITS = ["--rpm", "1000000000", "--tpm", "1000000000000", "--concurrency", "1000000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing on port {port}")


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        log.close()
        self.procs.append(proc)
        return proc

    def conduit(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gateway.cli", *args]

    def key(self, *limits: str) -> str:
        created = subprocess.run(self.conduit("keys", "create", "--redis-url", self.redis_url, "--name", "bench",
                                              *limits), cwd=ROOT, capture_output=True, text=True, check=True)
        match = KEY_RE.search(created.stdout)
        if match is None:
            raise RuntimeError("`conduit keys create` printed no key")
        return match.group(0)

    def start_redis(self) -> subprocess.Popen[bytes]:
        """A private, non-persistent redis-server on ``redis_port``."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (Debian: apt-get install redis-server)")
        redis = self.start("redis", [exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", str(self.workdir)])
        wait_port(self.redis_port, redis)
        return redis

    def up(self) -> tuple[str, str, str, str]:
        self.start_redis()
        self.start("engine", self.conduit("engine", "--kind", "synthetic", "--served-name", "mock",
                                          "--redis-url", self.redis_url, "--log-level", "warning"))
        plain, limited = self.key(), self.key(*LIMITS)
        urls = []
        for name, auth in (("open", "false"), ("keyed", "true")):
            port = free_port()
            gw = self.start(name, self.conduit("gateway", "--port", str(port), "--redis-url", self.redis_url,
                                               "--log-level", "warning"),
                            env={"CONDUIT_AUTH": auth, "CONDUIT_REGISTRY_REFRESH_S": "0.5"})
            wait_port(port, gw)
            urls.append(f"http://127.0.0.1:{port}/v1")
        return urls[0], urls[1], plain, limited

    def stop(self) -> None:
        for group in (self.procs[1:], self.procs[:1]):  # Redis last
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def measure(label: str, url: str, key: str, args: argparse.Namespace, out: Path) -> dict[str, dict[str, float]]:
    """One gateway_path.py run against one target: {conc: {rps, p50_ms, cpu_us}} (``cpu_us``: the
    gateway process's CPU time per request, which a busy machine disturbs far less than req/s)."""
    target = f"{label}={url},model=mock" + (f",key={key}" if key else "")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gateway_path.py"), "-t", target, "-c", args.conc, "-s", "",
           "-o", str(out)] + (["--quick"] if args.quick else [])
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    runs = json.loads(out.read_text())["targets"][0]["runs"]
    return {str(r["conc"]): {"rps": float(r["rps"]), "p50_ms": float(r["p50_ms"]),
                             "cpu_us": r["cpu_pct"]["target"] / 100 / max(float(r["rps"]), 1e-9) * 1e6} for r in runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternated runs per gateway (default 3)")
    p.add_argument("-c", "--conc", default="1 64", help='concurrencies (default "1 64")')
    p.add_argument("--quick", action="store_true", help="5 s windows (gateway_path.py --quick)")
    p.add_argument("-o", "--out", help="write every run as JSON here")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="conduit-auth-bench-"))
    bench = Bench(workdir)
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"open": [], "keyed": [], "limited": []}
    try:
        open_url, keyed_url, plain, limited = bench.up()
        time.sleep(1.5)  # the gateways' registries see the engine
        for r in range(args.rounds):
            for label, url, k in (("open", open_url, ""), ("keyed", keyed_url, plain), ("limited", keyed_url, limited)):
                runs[label].append(measure(label, url, k, args, workdir / f"{label}-{r}.json"))
                print(f"round {r + 1} {label}: {runs[label][-1]}", flush=True)
    finally:
        bench.stop()
    print("\n| concurrency | gateway | req/s | vs open | p50 ms | added p50 ms |")
    print("|---|---|---|---|---|---|")
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for conc in args.conc.split():
        means = {label: {"rps": statistics.mean(run[conc]["rps"] for run in r),
                         "p50_ms": statistics.mean(run[conc]["p50_ms"] for run in r)} for label, r in runs.items()}
        summary[conc] = means
        base = means["open"]
        for label, m in means.items():
            print(f"| {conc} | {label} | {m['rps']:,.0f} | {m['rps'] / base['rps'] - 1:+.1%} | {m['p50_ms']:.3f} "
                  f"| {m['p50_ms'] - base['p50_ms']:+.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
