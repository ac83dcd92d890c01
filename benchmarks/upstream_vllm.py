"""vLLM's own OpenAI server directly vs through Conduit's upstream engine, same server, same run.

    python benchmarks/upstream_vllm.py [--model DIR] [--concurrency 32 64] [--rounds 3] [--tokens 64] [--pin]

Starts vLLM's server (``python -m vllm.entrypoints.openai.api_server``; the offline tiny Llama unless
``--model``), a private Redis, a Conduit gateway and an upstream engine in front of the server, then
for each round and each concurrency N runs N streaming clients (``max_tokens`` each, ``ignore_eos``)
straight at vLLM and through Conduit, alternated (which goes first alternates too), and prints the
completion tokens/s of each and their ratio. On a machine with few cores, vLLM's CPU backend, the
gateway, the engine and the clients share them: the ratio then measures Conduit's CPU cost, not
its added latency. ``--pin`` gives vLLM the first core alone (its OpenMP threads bound there too)
and everything else (Conduit, Redis, the clients) the others, as a deployment keeps the inference
server's compute apart from the gateway's: the ratio then measures what Conduit costs the server's
throughput, not the cores they fight for. Run on purpose, not in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engines.cli import CPU_ENGINE_ENV  # noqa: E402 - after the path that finds it
from tests.harness import Proc, RedisServer, Stack, build_tiny_llama, free_port, wait_for_openai_server  # noqa: E402

SERVED, UPSTREAM = "bench-up", "tiny-llama"


CLK = os.sysconf("SC_CLK_TCK")


def cpu_s(root: int) -> float:
    """User + system CPU seconds of a process and its descendants (/proc)."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                text = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            rest = text[text.rindex(")") + 2:].split()
            parents[int(d)], times[int(d)] = int(rest[1]), int(rest[11]) + int(rest[12])
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(times.get(pid, 0) for pid in tree) / CLK


async def one(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    used = 0
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    used = usage["completion_tokens"]
    return used


async def load(base: str, model: str, n: int, tokens: int) -> float:
    """Completion tokens/s of ``n`` concurrent streams."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        await one(client, f"{base}/v1/chat/completions", model, 4)  # warm the connection path
        started = time.perf_counter()
        done = await asyncio.gather(*(one(client, f"{base}/v1/chat/completions", model, tokens) for _ in range(n)))
        elapsed = time.perf_counter() - started
    assert all(d == tokens for d in done), done
    return sum(done) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a model directory (default: build the tiny Llama)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--pin", action="store_true", help="vLLM alone on the first core, the rest on the others")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="conduit-upstream-bench-"))
    model = args.model or str(build_tiny_llama(work / "tiny-llama"))
    port = free_port()
    env, pin = dict(CPU_ENGINE_ENV), []
    if args.pin:
        cores = sorted(os.sched_getaffinity(0))
        assert len(cores) >= 2, "--pin needs two cores"
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[0])
        pin = ["taskset", "-c", str(cores[0])]
        os.sched_setaffinity(0, cores[1:])  # this process and all it starts from here on (not vLLM)
    server = Proc([*pin, sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                   "--served-model-name", UPSTREAM, "--port", str(port), "--max-model-len", "1024",
                   "--enforce-eager"], work / "vllm.log", env=env)
    redis = RedisServer(work)
    stack = Stack(redis.url, work)
    try:
        wait_for_openai_server(server, port)
        stack.gateway()
        stack.engine("--kind", "upstream", "--base-url", f"http://127.0.0.1:{port}/v1", "--served-name", SERVED,
                     "--upstream-model", UPSTREAM, "--max-concurrency", str(max(args.concurrency)), model=SERVED)
        direct, through = f"http://127.0.0.1:{port}", stack.base_url
        results: dict[tuple[str, int], list[float]] = {}
        procs = {"vllm": server.proc.pid, "gateway": stack.procs[0].proc.pid, "engine": stack.procs[1].proc.pid,
                 "redis": redis.proc.pid}
        #: (mode, process) -> CPU seconds per 1,000 completion tokens, each run.
        cpu: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for n in args.concurrency:
                order = [("vllm", direct, UPSTREAM), ("conduit", through, SERVED)]
                for name, base, m in order if r % 2 == 0 else order[::-1]:
                    before = {k: cpu_s(pid) for k, pid in procs.items()}
                    rate = asyncio.run(load(base, m, n, args.tokens))
                    results.setdefault((name, n), []).append(rate)
                    for k, pid in procs.items():
                        cpu.setdefault((name, k), []).append((cpu_s(pid) - before[k]) / ((n + 1) * args.tokens) * 1000)
                    print(f"round {r + 1} N={n} {name:8s} {rate:9.1f} tokens/s", flush=True)
        print("\nN    vLLM direct (median tok/s)   through Conduit   ratio   (rounds)")
        for n in args.concurrency:
            v, c = statistics.median(results[("vllm", n)]), statistics.median(results[("conduit", n)])
            print(f"{n:<4} {v:>12.1f}                  {c:>12.1f}   {c / v:6.1%}   "
                  f"{[round(x) for x in results[('vllm', n)]]} / {[round(x) for x in results[('conduit', n)]]}")
        print("\nCPU seconds per 1,000 completion tokens (median of the runs; includes the warm-up request)")
        for name in ("vllm", "conduit"):
            print(f"{name:8s} " + "  ".join(f"{k} {statistics.median(cpu[(name, k)]):.3f}" for k in procs))
    finally:
        stack.stop()
        server.stop()
        redis.stop()


if __name__ == "__main__":
    main()
