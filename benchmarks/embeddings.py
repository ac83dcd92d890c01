"""Embeddings: vLLM's own OpenAI server vs Conduit (gateway, Redis, a ``vllm-embed`` engine), in turn.

    python benchmarks/embeddings.py [--model DIR] [--concurrency 64] [--inputs 16] [--requests 640] [--rounds 3]

Both serve the same model (the offline tiny Llama unless ``--model``) with the same engine arguments
(``--runner pooling --convert embed --max-model-len 1024 --enforce-eager``, vLLM's CPU environment).
Each round starts one of them alone (on a small machine they would fight for its cores otherwise),
warms it, sends ``--requests`` embeddings requests of ``--inputs`` short texts from ``--concurrency``
concurrent clients (``encoding_format: base64``, what the `openai` SDK asks for), and stops it; which
goes first alternates. Prints inputs/s of each and Conduit's ratio (medians). Run on purpose, not in CI.
"""

from __future__ import annotations

import argparse
import asyncio
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

SERVED = "bench-embed"
ENGINE_ARGS = ("--max-model-len", "1024", "--enforce-eager")


async def run_load(base: str, concurrency: int, requests: int, inputs: int) -> float:
    """Inputs embedded per second by ``concurrency`` clients sending ``requests`` requests in all."""
    texts = [f"document {i}: the quick brown fox jumps over the lazy dog" for i in range(inputs)]
    body = {"model": SERVED, "input": texts, "encoding_format": "base64"}
    # (Idle connections dropped before the servers' 5 s keep-alive ends: a POST on one they closed fails.)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=3)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        async def send(count: int, clients: int) -> None:
            left = count

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    r = await client.post(f"{base}/v1/embeddings", json=body)
                    assert r.status_code == 200 and len(r.json()["data"]) == inputs, r.text[:500]

            await asyncio.gather(*(worker() for _ in range(clients)))

        await send(2 * concurrency, concurrency)  # warm-up: connections, vLLM's first batches
        started = time.perf_counter()
        await send(requests, concurrency)
        return requests * inputs / (time.perf_counter() - started)


def vllm_round(model: str, work: Path, args: argparse.Namespace) -> float:
    port = free_port()
    server = Proc([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                   "--served-model-name", SERVED, "--port", str(port), "--runner", "pooling", "--convert", "embed",
                   *ENGINE_ARGS], work / f"vllm-{port}.log", env=dict(CPU_ENGINE_ENV))
    try:
        wait_for_openai_server(server, port)
        return asyncio.run(run_load(f"http://127.0.0.1:{port}", args.concurrency, args.requests, args.inputs))
    finally:
        server.stop()


def conduit_round(model: str, work: Path, redis: RedisServer, args: argparse.Namespace) -> float:
    stack = Stack(redis.url, work)
    try:
        stack.gateway()
        stack.engine("--kind", "vllm-embed", "--model", model, "--served-name", SERVED, "--cpu", *ENGINE_ARGS,
                     model=SERVED, timeout=240)
        return asyncio.run(run_load(stack.base_url, args.concurrency, args.requests, args.inputs))
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a model directory (default: build the tiny Llama)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--requests", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="conduit-embed-bench-"))
    model = args.model or str(build_tiny_llama(work / "tiny-llama"))
    redis = RedisServer(work)
    results: dict[str, list[float]] = {"vllm": [], "conduit": []}
    try:
        for r in range(args.rounds):
            order = ["vllm", "conduit"] if r % 2 == 0 else ["conduit", "vllm"]
            for name in order:
                rate = vllm_round(model, work, args) if name == "vllm" else conduit_round(model, work, redis, args)
                results[name].append(rate)
                print(f"round {r + 1} {name:8s} {rate:9.1f} inputs/s", flush=True)
    finally:
        redis.stop()
    v, c = statistics.median(results["vllm"]), statistics.median(results["conduit"])
    print(f"\n{args.concurrency} clients, {args.inputs} inputs a request: vLLM {v:.1f} inputs/s, Conduit {c:.1f} "
          f"inputs/s, ratio {c / v:.1%}  (rounds: {[round(x) for x in results['vllm']]} / "
          f"{[round(x) for x in results['conduit']]})")


if __name__ == "__main__":
    main()
