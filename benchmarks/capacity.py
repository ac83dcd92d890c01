#!/usr/bin/env python3
"""capacity.py - CPU time per request of each process on the gateway path, for sizing.

Starts one redis-server, one synthetic engine (zero delay, 64 tokens) and two gateways on them
(``open``: ``auth = false``; ``keyed``: with API keys), as ``auth_overhead.py`` does, then
sends a fixed number of requests per scenario and reads, from ``/proc/<pid>/stat`` (utime +
stime, every thread), the CPU each process used for them:

* ``open``: non-streaming chat (``max_tokens`` 16), no key;
* ``keyed``: the same with a key without limits (authentication from the cache, fair-queue
  tenancy, usage accounting);
* ``limited``: with a key whose rpm, tpm and concurrency limits are far above the load (the
  limiter's admission and release scripts on every request);
* ``stream``: streamed chat (``max_tokens`` 64), no key: CPU per stream and per relayed token,
  tokens as fast as the engine's loop makes them (many per reply-stream entry);
* ``paced``: streamed chat from a second synthetic engine that paces its tokens like a model
  on a GPU (``--token-delay``, default 20 ms: 50 tokens/s per stream, ``--paced-tokens`` 200
  per stream, ``--paced-conc`` 200 at once): per token as a real deployment relays them, about
  one reply-stream entry per engine step.

CPU time per request does not depend on how busy a shared machine is the way requests/s
does (a noisy neighbour takes cores, not instructions), so it converts to what one fully
used core sustains: 1 / (CPU s per request). Scenarios alternate for ``--rounds`` rounds;
the table gives medians and ranges. Idle CPU (heartbeats, registry and key polls) is
measured before the runs and included in the per-request figures (it is a few % of a core).

    python benchmarks/capacity.py [--rounds 3] [--requests 20000] [--streams 2000] [-c 64] [-o out.json]

Run on purpose, not in CI. Needs ``redis-server`` and the project's venv; no network.
``compose/kubernetes/README.md`` ("Capacity") turns the results into a sizing rule.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import auth_overhead as ao  # benchmarks/ is not a package: its modules are imported from its folder
import gateway_path as gp
from redis import Redis

SCENARIOS = ("open", "keyed", "limited", "stream", "paced")


def cpu_of(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: gp.cpu_seconds(p) for name, p in pids.items()}


def command_stats(redis: Any) -> dict[str, tuple[int, int]]:
    """Redis's own count of calls and microseconds per command (INFO commandstats)."""
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in redis.info("commandstats").items()}


async def fixed_load(target: gp.Target, count: int, conc: int, stream: bool, max_tokens: int,
                     timeout: float) -> dict[str, int]:
    """``count`` requests over ``conc`` keep-alive connections (closed loop); every answer checked."""
    req = target.request(max_tokens, stream)
    state = {"issued": 0, "ok": 0, "errors": 0, "tokens": 0}

    async def one(c: gp.Conn) -> None:
        status, length, chunked, close = await c.head(req)
        body = b"".join([p async for p in c.body(length, chunked)])
        if close:
            c.close()
        if status != 200 or (b"data: [DONE]" not in body if stream else b'"choices"' not in body):
            state["errors"] += 1
            return
        state["ok"] += 1
        if stream:
            tokens = len(gp.CONTENT_RE.findall(body))
            state["tokens"] += tokens
            state["errors"] += tokens < max_tokens

    async def worker() -> None:
        c = gp.Conn(target.host, target.port)
        try:
            while state["issued"] < count:
                state["issued"] += 1
                try:
                    await gp.bounded(one(c), timeout)
                except gp.NET_ERRORS:
                    c.close()
                    state["errors"] += 1
        finally:
            c.close()

    await asyncio.gather(*(worker() for _ in range(conc)))
    return state


def measure(target: gp.Target, pids: dict[str, list[int]], redis: Any, count: int, conc: int, stream: bool,
            max_tokens: int, timeout: float) -> dict[str, Any]:
    # Warm up (connections, the key's verification, caches) outside the measurement.
    asyncio.run(fixed_load(target, min(count // 10, 500), conc, stream, max_tokens, timeout))
    stats0 = command_stats(redis)
    before, lg0, s0, w0 = cpu_of(pids), gp.self_cpu(), gp.sys_jiffies(), time.perf_counter()
    state = asyncio.run(fixed_load(target, count, conc, stream, max_tokens, timeout))
    wall = time.perf_counter() - w0
    after, lg1, s1 = cpu_of(pids), gp.self_cpu(), gp.sys_jiffies()
    stats1 = command_stats(redis)
    cpu = {name: after[name] - before[name] for name in pids}
    cpu["loadgen"] = lg1 - lg0
    # The whole machine's busy time in the window, less ours: how much other work shared the cores.
    machine = (s1[0] - s0[0]) / max(1, s1[1] - s0[1]) * wall * (os.cpu_count() or 1)
    ok = max(state["ok"], 1)
    out: dict[str, Any] = {"requests": count, "ok": state["ok"], "errors": state["errors"], "wall_s": round(wall, 3),
                           "rps": round(state["ok"] / wall, 1), "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
                           "others_cores": round(max(0.0, machine - sum(cpu.values())) / wall, 2),
                           "us_per_request": {k: round(v / ok * 1e6, 1) for k, v in cpu.items()}}
    # Per request: calls and Redis-measured µs of each command (a script's inner commands are
    # counted under their own names too, and inside EVALSHA's time).
    out["redis_commands"] = {
        cmd: {"calls": round((calls - stats0.get(cmd, (0, 0))[0]) / ok, 3),
              "us": round((usec - stats0.get(cmd, (0, 0))[1]) / ok, 2)}
        for cmd, (calls, usec) in sorted(stats1.items()) if calls > stats0.get(cmd, (0, 0))[0]}
    if stream:
        out["tokens"] = state["tokens"]
        out["us_per_token"] = {k: round(v / max(state["tokens"], 1) * 1e6, 2) for k, v in cpu.items()}
    return out


class Capacity(ao.Bench):
    def __init__(self, workdir: Path, *, paced_tokens: int, token_delay: float) -> None:
        super().__init__(workdir)
        self.paced_tokens, self.token_delay = paced_tokens, token_delay

    def up_all(self) -> tuple[dict[str, str], dict[str, int]]:
        """Redis, the two engines and both gateways; the targets and process ids."""
        redis = self.start_redis()
        engine = self.start("engine", self.conduit("engine", "--kind", "synthetic", "--served-name", "mock",
                                                   "--tokens", "64", "--redis-url", self.redis_url,
                                                   "--log-level", "warning"))
        paced = self.start("engine-paced", self.conduit(
            "engine", "--kind", "synthetic", "--served-name", "paced", "--tokens", str(self.paced_tokens),
            "--token-delay", str(self.token_delay), "--first-token-delay", str(self.token_delay),
            "--redis-url", self.redis_url, "--log-level", "warning"))
        keys = {"keyed": self.key(), "limited": self.key(*ao.LIMITS)}
        urls, pids = {}, {"redis": redis.pid, "engine": engine.pid, "engine-paced": paced.pid}
        for name, auth in (("open", "false"), ("keyed", "true")):
            port = ao.free_port()
            gw = self.start(f"gateway-{name}", self.conduit("gateway", "--port", str(port), "--redis-url",
                                                            self.redis_url, "--log-level", "warning"),
                            env={"CONDUIT_AUTH": auth})
            ao.wait_port(port, gw)
            urls[name] = f"http://127.0.0.1:{port}/v1"
            pids[f"gateway-{name}"] = gw.pid
        targets = {"open": f"open={urls['open']},model=mock", "stream": f"stream={urls['open']},model=mock",
                   "paced": f"paced={urls['open']},model=paced",
                   "keyed": f"keyed={urls['keyed']},model=mock,key={keys['keyed']}",
                   "limited": f"limited={urls['keyed']},model=mock,key={keys['limited']}"}
        return targets, pids


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scenario, rs in runs.items():
        per = "us_per_token" if scenario in ("stream", "paced") else "us_per_request"
        out[scenario] = {}
        for proc in ("gateway", "redis", "engine", "loadgen"):
            vals = [r[per][proc] for r in rs]
            out[scenario][proc] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        out[scenario]["rps"] = statistics.median(r["rps"] for r in rs)
        out[scenario]["others_cores"] = statistics.median(r["others_cores"] for r in rs)
        cmds = {c for r in rs for c in r["redis_commands"]}
        out[scenario]["redis_commands"] = {
            c: {k: statistics.median(r["redis_commands"].get(c, {"calls": 0, "us": 0})[k] for r in rs)
                for k in ("calls", "us")} for c in sorted(cmds)}
        if per == "us_per_token":
            out[scenario]["us_per_stream_gateway"] = statistics.median(r["us_per_request"]["gateway"] for r in rs)
    return out


def render(summary: dict[str, Any]) -> str:
    lines = [("| scenario | unit | gateway µs | redis µs | engine µs | load generator µs | gateway /s per core "
              "| redis /s per core | wall /s here | other work (cores) |"), "|---|---|---|---|---|---|---|---|---|---|"]

    def spread(v: dict[str, float]) -> str:
        return f"{v['median']:.1f} ({v['min']:.1f}–{v['max']:.1f})"

    for scenario, s in summary.items():
        unit = "token" if scenario in ("stream", "paced") else "request"
        lines.append(f"| {scenario} | {unit} | {spread(s['gateway'])} | {spread(s['redis'])} | {spread(s['engine'])} "
                     f"| {spread(s['loadgen'])} | {1e6 / s['gateway']['median']:,.0f} | {1e6 / s['redis']['median']:,.0f} "
                     f"| {s['rps']:,.0f} | {s['others_cores']:.2f} |")
    return "\n".join(lines)


def render_commands(summary: dict[str, Any]) -> str:
    lines = ["| scenario | Redis commands per request: calls × (µs per request, Redis's own timing) |", "|---|---|"]
    for scenario, s in summary.items():
        top = sorted(s["redis_commands"].items(), key=lambda kv: -kv[1]["us"])
        lines.append(f"| {scenario} | " + ", ".join(f"{c} {v['calls']:g}× ({v['us']:.1f})" for c, v in top
                                                   if v["us"] >= 0.05) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds of every scenario (default 3)")
    p.add_argument("--requests", type=int, default=20000, help="non-streaming requests per run (default 20000)")
    p.add_argument("--streams", type=int, default=2000, help="streams of 64 tokens per run (default 2000)")
    p.add_argument("-c", "--conc", type=int, default=64, help="concurrent requests (default 64)")
    p.add_argument("--stream-conc", type=int, default=100, help="concurrent streams (default 100)")
    p.add_argument("--paced-streams", type=int, default=1000, help="paced streams per run (default 1000)")
    p.add_argument("--paced-conc", type=int, default=200, help="concurrent paced streams (default 200)")
    p.add_argument("--paced-tokens", type=int, default=200, help="tokens per paced stream (default 200)")
    p.add_argument("--token-delay", type=float, default=0.02, help="paced engine: seconds per token (default 0.02)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("-o", "--out", help="write every run and the summary as JSON here")
    args = p.parse_args(argv)
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    bench = Capacity(Path(tempfile.mkdtemp(prefix="conduit-capacity-")), paced_tokens=args.paced_tokens,
                     token_delay=args.token_delay)
    scenarios = args.scenarios.split(",")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in scenarios}
    redis: Redis | None = None
    try:
        specs, pids = bench.up_all()
        redis = Redis.from_url(bench.redis_url)
        time.sleep(1.5)  # the gateways' registries see the engine
        trees = {name: gp.tree_of({pid}) for name, pid in pids.items()}
        idle0 = cpu_of(trees)
        time.sleep(5)
        idle = {k: round((v - idle0[k]) / 5 * 100, 2) for k, v in cpu_of(trees).items()}
        print(f"idle CPU, % of a core: {idle}", flush=True)
        for r in range(args.rounds):
            for scenario in scenarios:
                gateway = "gateway-keyed" if scenario in ("keyed", "limited") else "gateway-open"
                engine = "engine-paced" if scenario == "paced" else "engine"
                watched = {"gateway": trees[gateway], "redis": trees["redis"], "engine": trees[engine]}
                count, conc, stream, tokens = {
                    "stream": (args.streams, args.stream_conc, True, 64),
                    "paced": (args.paced_streams, args.paced_conc, True, args.paced_tokens),
                }.get(scenario, (args.requests, args.conc, False, 16))
                res = measure(gp.Target(specs[scenario], "mock", ""), watched, redis, count, conc, stream, tokens,
                              args.timeout)
                runs[scenario].append(res)
                print(f"round {r + 1} {scenario}: {res}", flush=True)
                if res["errors"]:
                    raise RuntimeError(f"{scenario}: {res['errors']} bad answers")
    finally:
        if redis is not None:
            redis.close()
        bench.stop()
    summary = summarize(runs)
    print()
    print(render(summary))
    print()
    print(render_commands(summary))
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cores": os.cpu_count(), "machine": platform.platform(),
                "python": platform.python_version(), "idle_cpu_pct": idle, "args": vars(args)}
        Path(args.out).write_text(json.dumps({"meta": meta, "runs": runs, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
