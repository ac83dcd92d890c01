#!/usr/bin/env python3
"""responses.py - ``/v1/responses`` against chat completions on the same gateway, in one run.

Starts one redis-server, one synthetic engine (zero delay) and one keyed gateway, and runs
``benchmarks/gateway_path.py`` against the gateway's chat completions and its Responses API in
turn, ``--rounds`` times (this machine is shared and noisy: compare means of alternated runs):
non-streaming requests/s and p50 at ``-c`` (default 64; ``max_tokens`` / ``max_output_tokens`` 16)
and content tokens/s at ``-s`` concurrent streams (default 100; 64 tokens each). A Responses
stream has 8 events a chat stream lacks (created, in_progress, item and part added and done,
the text's done, completed), so its token rate counts content events only, as chat's does.

    python benchmarks/responses.py [--rounds 3] [--quick] [-c 64] [-s 100] [-o results.json]

Run on purpose, not in CI. Needs ``redis-server`` and the project's venv; no network.
Target from issue 18: both within 15% of chat completions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auth_overhead import ROOT, Bench, free_port, wait_port  # noqa: E402 - after the path that finds it


def up(bench: Bench) -> tuple[str, str]:
    bench.start_redis()
    # Up to 256 tokens a choice: every request gets the tokens it asks for (16, or 64 streamed).
    bench.start("engine", bench.conduit("engine", "--kind", "synthetic", "--served-name", "mock", "--tokens", "256",
                                        "--redis-url", bench.redis_url, "--log-level", "warning"))
    key = bench.key()
    port = free_port()
    gw = bench.start("gateway", bench.conduit("gateway", "--port", str(port), "--redis-url", bench.redis_url,
                                              "--log-level", "warning"),
                     env={"CONDUIT_AUTH": "true", "CONDUIT_REGISTRY_REFRESH_S": "0.5"})
    wait_port(port, gw)
    return f"http://127.0.0.1:{port}/v1", key


def measure(api: str, url: str, key: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    target = f"{api}={url},model=mock,key={key},api={api}"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gateway_path.py"), "-t", target, "-c", args.conc,
           "-s", args.streams, "-o", str(out)] + (["--quick"] if args.quick else [])
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    got: dict[str, float] = {}
    for r in json.loads(out.read_text())["targets"][0]["runs"]:
        # The gateway's CPU time per request (or streamed token): far steadier than req/s on a busy machine.
        cpu = r["cpu_pct"]["target"] / 100
        if r["kind"] == "nonstream":
            got[f"c{r['conc']} req/s"] = float(r["rps"])
            got[f"c{r['conc']} p50 ms"] = float(r["p50_ms"])
            got[f"c{r['conc']} gateway CPU us/request"] = cpu / max(float(r["rps"]), 1e-9) * 1e6
            got[f"c{r['conc']} errors"] = float(sum(r["errors"].values()))
        else:
            got[f"{r['conc']} streams tokens/s"] = float(r["content_tokens_per_s"])
            got[f"{r['conc']} streams gateway CPU us/token"] = cpu / max(float(r["content_tokens_per_s"]), 1e-9) * 1e6
            got[f"{r['conc']} streams errors"] = float(sum(r["errors"].values()))
    return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternated runs per API (default 3)")
    p.add_argument("-c", "--conc", default="64", help='non-streaming concurrencies (default "64")')
    p.add_argument("-s", "--streams", default="100", help='concurrent streams (default "100")')
    p.add_argument("--quick", action="store_true", help="5 s windows (gateway_path.py --quick)")
    p.add_argument("-o", "--out", help="write every run as JSON here")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="conduit-responses-bench-"))
    bench = Bench(workdir)
    runs: dict[str, list[dict[str, float]]] = {"chat": [], "responses": []}
    try:
        url, key = up(bench)
        time.sleep(1.5)  # the gateway's registry sees the engine
        for r in range(args.rounds):
            for api in ("chat", "responses"):
                runs[api].append(measure(api, url, key, args, workdir / f"{api}-{r}.json"))
                print(f"round {r + 1} {api}: {runs[api][-1]}", flush=True)
    finally:
        bench.stop()
    print("\n| measure | chat | responses | responses vs chat |")
    print("|---|---|---|---|")
    summary = {}
    for name in runs["chat"][0]:
        chat, resp = (statistics.mean(run[name] for run in runs[api]) for api in ("chat", "responses"))
        summary[name] = {"chat": chat, "responses": resp}
        ratio = f"{resp / chat - 1:+.1%}" if chat else "-"
        print(f"| {name} | {chat:,.2f} | {resp:,.2f} | {ratio} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
