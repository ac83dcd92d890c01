#!/usr/bin/env python3
"""telemetry_overhead.py - what metrics, traces and logs cost the gateway path.

Starts one redis-server, an OTLP/HTTP trace receiver (``tests/otlp.py``, in this process), one
synthetic engine (zero delay, tracing to the receiver) and two gateways on them:

* ``off``: ``CONDUIT_METRICS=false``, no OTLP endpoint, ``CONDUIT_LOG_REQUESTS=false``, text logs;
* ``on``: metrics recorded (and scraped every 5 s by this script, as Prometheus would), traces
  exported to the receiver with ``CONDUIT_TRACE_SAMPLE_RATIO`` (default 0.1), a JSON log line per
  request and JSON logs.

Runs ``benchmarks/gateway_path.py`` against the two, alternating ``--rounds`` times (the machine
is shared and noisy: compare means of alternated runs), and prints mean requests/s and p50 per
concurrency, the gateway's CPU time per request, and the difference of ``on`` from ``off``.

``--instructions N`` measures instead what a shared machine cannot disturb: the CPU instructions
each gateway executes per request (valgrind's callgrind, counting only while N requests are
served at 8 concurrent, after 300 to warm up), and the instructions of one ``/metrics`` scrape,
charged per request at one scrape every 5 s at the saturated rate of ``--rate`` requests/s.

    python benchmarks/telemetry_overhead.py [--rounds 4] [--quick] [-c "1 64"] [--ratio 0.1] [-o out.json]
    python benchmarks/telemetry_overhead.py --instructions 10000 [--rate 3000]

Run on purpose, not in CI. Target (issue 8): ``on`` within 5% of ``off``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from auth_overhead import ROOT, Bench, free_port, measure, wait_port

sys.path.insert(0, str(ROOT))
from tests.otlp import OtlpReceiver  # noqa: E402 - after the path that finds it


SETTINGS = {
    "off": {"CONDUIT_METRICS": "false", "CONDUIT_LOG_REQUESTS": "false", "CONDUIT_OTLP_ENDPOINT": ""},
    "on": {"CONDUIT_METRICS": "true", "CONDUIT_LOG_REQUESTS": "true", "CONDUIT_LOG_FORMAT": "json"},
}


def up(bench: Bench, receiver: OtlpReceiver, ratio: float, wrap: list[str] | None = None
       ) -> dict[str, tuple[str, int]]:
    """Redis, the engine and the two gateways; label -> (base URL, port)."""
    bench.start_redis()
    bench.start("engine", bench.conduit("engine", "--kind", "synthetic", "--served-name", "mock", "--redis-url",
                                        bench.redis_url, "--log-level", "warning", "--otlp-endpoint",
                                        receiver.endpoint))
    settings = {"off": SETTINGS["off"], "on": {**SETTINGS["on"], "CONDUIT_OTLP_ENDPOINT": receiver.endpoint,
                                                "CONDUIT_TRACE_SAMPLE_RATIO": str(ratio)}}
    out = {}
    for label, env in settings.items():
        port = free_port()
        argv = bench.conduit("gateway", "--port", str(port), "--redis-url", bench.redis_url, "--log-level", "warning")
        if wrap:
            argv = [*wrap, f"--callgrind-out-file={bench.workdir / label}.callgrind", *argv]
        gw = bench.start(label, argv,
                         env={"CONDUIT_AUTH": "false", "CONDUIT_REGISTRY_REFRESH_S": "0.5", **env})
        wait_port(port, gw, timeout=600 if wrap else 60)
        out[label] = (f"http://127.0.0.1:{port}/v1", port)
    return out


async def _send(port: int, n: int, concurrency: int = 8) -> None:
    body = {"model": "mock", "messages": [{"role": "user", "content": "Hi"}]}
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
        async def one() -> None:
            async with sem:
                r = await client.post("/v1/chat/completions", json=body)
                r.raise_for_status()

        await asyncio.gather(*(one() for _ in range(n)))


def _counting(pid: int, on: bool, workdir: Path, label: str) -> int:
    """Turn callgrind's instrumentation on or off; off also dumps and returns the instructions
    counted since it was turned on."""
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(pid)], check=True, capture_output=True)
    if on:
        return 0
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    total = 0
    for f in workdir.glob(f"{label}.callgrind*"):
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
        f.unlink()
    return total


def instructions(args: argparse.Namespace, bench: Bench, receiver: OtlpReceiver) -> dict[str, dict[str, float]]:
    """Instructions per request of each gateway under callgrind (see the module docstring)."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise RuntimeError("valgrind not found (Debian: apt-get install valgrind)")
    gateways = up(bench, receiver, args.ratio, wrap=["valgrind", "--tool=callgrind", "--instr-atstart=no"])
    pids = {label: bench.procs[-2 + i].pid for i, label in enumerate(gateways)}
    out = {}
    for label, (_url, port) in gateways.items():
        pid = pids[label]
        deadline = time.monotonic() + 600
        while httpx.get(f"http://127.0.0.1:{port}/ready", timeout=60).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label} never became ready")
            time.sleep(1)
        asyncio.run(_send(port, 300))
        _counting(pid, True, bench.workdir, label)
        asyncio.run(_send(port, args.instructions))
        per_request = _counting(pid, False, bench.workdir, label) / args.instructions
        _counting(pid, True, bench.workdir, label)
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=300)
        scrape = _counting(pid, False, bench.workdir, label)
        # One scrape every 5 s at the saturated rate: its share of each request.
        out[label] = {"per_request": per_request, "scrape": scrape,
                      "total": per_request + scrape / (5 * args.rate)}
        print(f"{label}: {per_request:,.0f} instructions a request, {scrape:,.0f} a scrape", flush=True)
    return out


def scrape_every(port: int, stop: threading.Event, seconds: float = 5.0) -> None:
    """Scrape the gateway's /metrics as Prometheus would (the exposition costs the gateway too)."""
    with httpx.Client(timeout=10) as client:
        while not stop.wait(seconds):
            try:
                client.get(f"http://127.0.0.1:{port}/metrics")
            except httpx.HTTPError:
                pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4, help="alternated runs per gateway (default 4)")
    p.add_argument("-c", "--conc", default="1 64", help='concurrencies (default "1 64")')
    p.add_argument("--quick", action="store_true", help="5 s windows (gateway_path.py --quick)")
    p.add_argument("--ratio", type=float, default=0.1, help="trace sample ratio of the `on` gateway (default 0.1)")
    p.add_argument("-o", "--out", help="write every run as JSON here")
    p.add_argument("--instructions", type=int, metavar="N",
                   help="count CPU instructions (callgrind) over N requests per gateway instead of timing")
    p.add_argument("--rate", type=float, default=3000.0,
                   help="requests/s a saturated gateway serves, to charge a 5 s scrape per request (default 3000)")
    args = p.parse_args(argv)
    if args.instructions:
        bench, receiver = Bench(Path(tempfile.mkdtemp(prefix="conduit-telemetry-bench-"))), OtlpReceiver(decode=False)
        try:
            got = instructions(args, bench, receiver)
        finally:
            bench.stop()
            receiver.close()
        off, on = got["off"]["total"], got["on"]["total"]
        print(f"\n| gateway | instructions / request (scrapes included) | vs off |\n|---|---|---|\n"
              f"| off | {off:,.0f} | |\n| on | {on:,.0f} | {on / off - 1:+.1%} |")
        if args.out:
            Path(args.out).write_text(json.dumps(got, indent=1))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="conduit-telemetry-bench-"))
    bench = Bench(workdir)
    receiver = OtlpReceiver(decode=False)
    stop = threading.Event()
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"off": [], "on": []}
    try:
        gateways = up(bench, receiver, args.ratio)
        threading.Thread(target=scrape_every, args=(gateways["on"][1], stop), daemon=True).start()
        time.sleep(1.5)  # the gateways' registries see the engine
        for r in range(args.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for label in order:
                runs[label].append(measure(label, gateways[label][0], "", args, workdir / f"{label}-{r}.json"))
                print(f"round {r + 1} {label}: {runs[label][-1]}", flush=True)
        log_lines = sum(1 for line in (workdir / "on.log").open() if '"conduit.request"' in line)
    finally:
        stop.set()
        bench.stop()
        receiver.close()
    spans = receiver.counted
    print(f"\n`on` exported {spans} spans (3 a sampled request: gateway, queue, engine) and wrote {log_lines} "
          "request log lines")
    print("\n| concurrency | gateway | req/s | vs off | p50 ms | added p50 ms | gateway CPU µs/request | vs off |")
    print("|---|---|---|---|---|---|---|---|")
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for conc in args.conc.split():
        means = {label: {k: statistics.mean(run[conc][k] for run in r) for k in ("rps", "p50_ms", "cpu_us")}
                 for label, r in runs.items()}
        summary[conc] = means
        base = means["off"]
        for label, m in means.items():
            print(f"| {conc} | {label} | {m['rps']:,.0f} | {m['rps'] / base['rps'] - 1:+.1%} | {m['p50_ms']:.3f} "
                  f"| {m['p50_ms'] - base['p50_ms']:+.3f} | {m['cpu_us']:.0f} "
                  f"| {m['cpu_us'] / base['cpu_us'] - 1:+.1%} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary, "spans": spans,
                                              "log_lines": log_lines}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
