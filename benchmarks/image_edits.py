#!/usr/bin/env python3
"""image_edits.py - image edits and generations mixed, through Conduit: one at a time vs all at once.

One run, one stack (redis-server, ``conduit gateway`` and one ``conduit engine --kind diffusers``
started here on free local ports, as ``images.py`` starts them), ``--requests`` (16) one-image
requests at one ``--size`` (128), ``response_format: b64_json``, fixed seeds:

* half generations (``POST /v1/images/generations``), half edits (``POST /v1/images/edits``,
  multipart: an ``image`` file, and for half of the edits a ``mask`` PNG whose fully transparent
  centre square is repainted), in the order generation, masked edit, generation, unmasked edit...;
* each kind takes the ``--steps`` (8,16) in turn; an edit runs ``int(steps * strength)`` of them,
  ``--strength`` MASKED,UNMASKED (1.0,0.75);
* the input pictures are made here with numpy and PIL (seeded: the same every run), before timing.

Measured in alternating rounds after a warm-up (``--rounds``, 3):

* **sequential**: the requests one after another, each sent when the previous one answered:
  the makespan (what a one-request-at-a-time server does, on the same engine);
* **concurrent**: the requests all at once: the makespan, p50/p95 latency. The engine batches
  generations and edits of one size in one denoising step loop, so this is its batching.

Reported per round and as medians: the ratio concurrent/sequential makespan (the target is at
most 0.60), the engine's mean images per denoising step (its
``conduit_engine_denoise_batch_size`` histogram, read from its ``/metrics``), the CPU cores the
engine kept busy (from ``/proc``; OpenMP threads that spin-wait count as busy) and the cores the
machine spent on processes other than this one and its stack: on a shared machine, a round
where they are high measured someone else's load too (two OpenMP teams on two cores slow each
other down many times over): such a round (``--busy``, 0.25 cores) is run again, up to
``--rounds`` more, and left out of the medians. ``--with-single`` adds one generation alone against
``--requests`` of the same generation at once: seconds per image alone and in the batch, and the
cores the engine used for each; on a small CPU, one small image does not keep the cores busy,
so a batch costs less per image.

    python benchmarks/image_edits.py                      # tiny pipeline, 128 px, CPU (~30-60 s)
    python benchmarks/image_edits.py --size 64 --with-single -o edits.json

``--model``, ``--device``, ``--dtype``, ``--compile``, ``--engine-arg`` and ``--workdir`` are
``images.py``'s. Torch's threads are the engine's default (``OMP_NUM_THREADS`` in the environment,
or ``--engine-arg=--threads --engine-arg=1``, sets them); this process runs no torch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The sibling benchmark (benchmarks/images.py): its stack, ports and pipelines.
from images import SERVED, Conduit, free_port, pct, pipeline_dir

KINDS = ("generation", "edit+mask", "generation", "edit")
GUIDANCE = 7.5


# ---- the requests --------------------------------------------------------------------------------

def picture(seed: int, width: int, height: int) -> bytes:
    """A deterministic RGB PNG: a colour gradient with a few filled rectangles."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c = rng.uniform(0.2, 1.0, size=3)
    img = np.stack([x / width * 255 * c[0], y / height * 255 * c[1], (x + y) / (width + height) * 255 * c[2]], -1)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        img[y0:y1, x0:x1] = rng.integers(0, 256, size=3)
    out = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB").save(out, format="PNG")
    return out.getvalue()


def mask(width: int, height: int) -> bytes:
    """An RGBA PNG: its centre square (half the side) fully transparent (repainted), the rest opaque."""
    import numpy as np
    from PIL import Image

    alpha = np.full((height, width), 255, np.uint8)
    alpha[height // 4:height * 3 // 4, width // 4:width * 3 // 4] = 0
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 3] = alpha
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    return out.getvalue()


class Req:
    """One request of the plan: its kind, steps, strength (edits), seed and pictures."""

    def __init__(self, i: int, kind: str, steps: int, strength: float | None, size: tuple[int, int],
                 pictures: tuple[bytes, bytes | None] | None) -> None:
        self.i, self.kind, self.steps, self.strength = i, kind, steps, strength
        self.size, self.pictures = size, pictures

    @property
    def denoising_steps(self) -> int:
        return self.steps if self.strength is None else int(self.steps * self.strength)

    def fields(self) -> dict[str, Any]:
        w, h = self.size
        body: dict[str, Any] = {"model": SERVED, "prompt": f"a photograph of subject {self.i}", "size": f"{w}x{h}",
                                "num_inference_steps": self.steps, "guidance_scale": GUIDANCE, "seed": 1000 + self.i,
                                "response_format": "b64_json"}
        if self.strength is not None:
            body["strength"] = self.strength
        return body


def make_plan(args: argparse.Namespace) -> list[Req]:
    size = (args.width, args.height)
    turns: dict[str, int] = {}
    plan = []
    shared_mask = mask(*size)
    for i in range(args.requests):
        kind = KINDS[i % len(KINDS)]
        turn = turns.get(kind, 0)
        turns[kind] = turn + 1
        steps = args.step_list[turn % len(args.step_list)]
        if kind == "generation":
            plan.append(Req(i, kind, steps, None, size, None))
        else:
            masked = kind == "edit+mask"
            plan.append(Req(i, kind, steps, args.strength_masked if masked else args.strength_whole, size,
                            (picture(i, *size), shared_mask if masked else None)))
    return plan


async def send(client: Any, url: str, req: Req) -> tuple[float, bool]:
    """One request over HTTP (generations: JSON; edits: multipart); (seconds, ok)."""
    t = time.perf_counter()
    try:
        if req.pictures is None:
            r = await client.post(f"{url}/v1/images/generations", json=req.fields())
        else:
            image, mask_png = req.pictures
            files = [("image", ("input.png", image, "image/png"))]
            if mask_png is not None:
                files.append(("mask", ("mask.png", mask_png, "image/png")))
            r = await client.post(f"{url}/v1/images/edits", data={k: str(v) for k, v in req.fields().items()},
                                  files=files)
        ok = r.status_code == 200 and len(r.json()["data"][0]["b64_json"]) > 0
        if not ok:
            print(f"  request {req.i} ({req.kind}): HTTP {r.status_code} {r.text[:300]}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - counted, the run goes on
        print(f"  request {req.i} ({req.kind}): {exc!r}", file=sys.stderr)
        ok = False
    return time.perf_counter() - t, ok


# ---- what the engine did -------------------------------------------------------------------------

class Probe:
    """What the engine did in a phase: its denoising steps and the images in them (its /metrics),
    the CPU cores it kept busy, and the cores the machine spent on processes other than this one
    and the stack it started (another job on a shared machine makes a round's numbers suspect)."""

    _sum = re.compile(r"^conduit_engine_denoise_batch_size_sum\{[^}]*\}\s+(\S+)", re.MULTILINE)
    _count = re.compile(r"^conduit_engine_denoise_batch_size_count\{[^}]*\}\s+(\S+)", re.MULTILINE)

    def __init__(self, engine_pid: int, metrics_url: str | None) -> None:
        self.engine_pid, self.metrics_url = engine_pid, metrics_url
        self.tick = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _stat(pid: int | str) -> tuple[int, int]:
        """(parent pid, user + system jiffies) of a process."""
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[11]) + int(fields[12])

    def _jiffies(self) -> tuple[int, int, int]:
        """(the engine's, this process tree's, the whole machine's busy) CPU jiffies."""
        parents, cpu = {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    parents[int(entry)], cpu[int(entry)] = self._stat(entry)
        ours, frontier = {os.getpid()}, [os.getpid()]
        children: dict[int, list[int]] = {}
        for pid, parent in parents.items():
            children.setdefault(parent, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in ours:
                    ours.add(child)
                    frontier.append(child)
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
        machine = sum(vals) - vals[3] - vals[4]  # less idle and iowait
        return cpu.get(self.engine_pid, 0), sum(cpu.get(p, 0) for p in ours), machine

    def _batches(self) -> tuple[float, float] | None:
        if self.metrics_url is None:
            return None
        import httpx

        try:
            text = httpx.get(self.metrics_url, timeout=5).text
        except httpx.HTTPError:
            return None
        sums, counts = self._sum.findall(text), self._count.findall(text)
        return sum(float(v) for v in sums), sum(float(v) for v in counts)

    def mark(self) -> dict[str, Any]:
        return {"t": time.perf_counter(), "jiffies": self._jiffies(), "batches": self._batches()}

    def since(self, before: dict[str, Any]) -> dict[str, Any]:
        after = self.mark()
        wall = after["t"] - before["t"]
        engine, ours, machine = (a - b for a, b in zip(after["jiffies"], before["jiffies"], strict=True))
        out: dict[str, Any] = {"engine_cores": engine / self.tick / wall,
                               "other_cores": max(machine - ours, 0) / self.tick / wall}
        if before["batches"] is not None and after["batches"] is not None:
            images = after["batches"][0] - before["batches"][0]
            steps = after["batches"][1] - before["batches"][1]
            out.update(denoise_steps=int(steps), images_per_step=images / steps if steps else 0.0)
        return out


# ---- the runs ------------------------------------------------------------------------------------

async def sequential(client: Any, url: str, plan: list[Req]) -> dict[str, Any]:
    t = time.perf_counter()
    out = [await send(client, url, req) for req in plan]
    return {"makespan_s": time.perf_counter() - t, "latencies": [s for s, _ in out],
            "errors": sum(not ok for _, ok in out)}


async def concurrent(client: Any, url: str, plan: list[Req]) -> dict[str, Any]:
    t = time.perf_counter()
    out = await asyncio.gather(*(send(client, url, req) for req in plan))
    return {"makespan_s": time.perf_counter() - t, "latencies": [s for s, _ in out],
            "errors": sum(not ok for _, ok in out)}


async def measure(url: str, plan: list[Req], probe: Probe, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    async def timed(fn: Any, reqs: list[Req]) -> dict[str, Any]:
        before = probe.mark()
        run = await fn(client, url, reqs)
        run.update(probe.since(before))
        return run

    # Idle connections are dropped after 1 s, well before uvicorn's keep-alive timeout (5 s): at
    # httpx's default (5 s too), a request sent on a connection the server is closing fails.
    limits = httpx.Limits(max_connections=len(plan) + 4, keepalive_expiry=1.0)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        await sequential(client, url, plan[:len(KINDS)])  # warm-up: every kind, once
        await concurrent(client, url, plan)  # and the batch
        rounds: list[dict[str, Any]] = []
        # A busy round (other processes took more than --busy cores in either phase) is run again,
        # up to --rounds more rounds in all.
        while sum(not r["busy"] for r in rounds) < args.rounds and len(rounds) < 2 * args.rounds:
            seq = await timed(sequential, plan)
            conc = await timed(concurrent, plan)
            busy = max(seq["other_cores"], conc["other_cores"]) > args.busy
            rounds.append({"sequential": seq, "concurrent": conc, "ratio": conc["makespan_s"] / seq["makespan_s"],
                           "busy": busy})
            print(f"  round {len(rounds)}: sequential {seq['makespan_s']:.2f} s, concurrent {conc['makespan_s']:.2f} s "
                  f"({rounds[-1]['ratio']:.2f}); other processes' cores {seq['other_cores']:.2f} / "
                  f"{conc['other_cores']:.2f}{' (busy: run again)' if busy else ''}", flush=True)
        single = None
        if args.with_single:
            steps = max(args.step_list)
            gens = [Req(5000 + k, "generation", steps, None, (args.width, args.height), None)
                    for k in range(args.requests)]
            alone = [await timed(sequential, gens[:1]) for _ in range(args.rounds)]
            batch = [await timed(concurrent, gens) for _ in range(args.rounds)]
            one = statistics.median(a["makespan_s"] for a in alone)
            many = statistics.median(b["makespan_s"] for b in batch)
            single = {"steps": steps, "alone_s": one, "batch_makespan_s": many, "batch_per_image_s": many / len(gens),
                      "alone_engine_cores": statistics.median(a["engine_cores"] for a in alone),
                      "batch_engine_cores": statistics.median(b["engine_cores"] for b in batch),
                      "other_cores": max(x["other_cores"] for x in [*alone, *batch]),
                      "errors": sum(x["errors"] for x in [*alone, *batch])}
    return {"rounds": rounds, "single": single}


# ---- report --------------------------------------------------------------------------------------

def med(rounds: list[dict[str, Any]], key: str, sub: str | None = None) -> float | None:
    vals = [(r[sub] if sub else r).get(key) for r in rounds]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    rounds = results["rounds"]
    n = results["requests"]
    has_batches = all("images_per_step" in r["concurrent"] for r in rounds)
    head = ("| round | sequential (s) | concurrent (s) | concurrent / sequential | concurrent p50 (s) "
            "| concurrent p95 (s) | images/s seq → conc |")
    rule = "|---|---|---|---|---|---|---|"
    if has_batches:
        head += " images per step, seq → conc |"
        rule += "---|"
    head += " engine cores, seq → conc | other processes' cores, seq / conc | errors |"
    rule += "---|---|---|"
    out = [head, rule]

    def row(name: str, s: float, c: float, ratio: float, p50: float, p95: float, ips: tuple[float, float] | None,
            cores: tuple[float, float], other: tuple[float, float], errors: int) -> str:
        line = f"| {name} | {s:.2f} | {c:.2f} | {ratio:.2f} | {p50:.2f} | {p95:.2f} | {n / s:.1f} → {n / c:.1f} |"
        if has_batches:
            line += f" {ips[0]:.1f} → {ips[1]:.1f} |" if ips else " - |"
        return line + f" {cores[0]:.2f} → {cores[1]:.2f} | {other[0]:.2f} / {other[1]:.2f} | {errors} |"

    for k, r in enumerate(rounds):
        s, c = r["sequential"], r["concurrent"]
        out.append(row(f"{k + 1} (busy)" if r["busy"] else str(k + 1), s["makespan_s"], c["makespan_s"], r["ratio"],
                       pct(c["latencies"], 50), pct(c["latencies"], 95),
                       (s["images_per_step"], c["images_per_step"]) if has_batches else None,
                       (s["engine_cores"], c["engine_cores"]), (s["other_cores"], c["other_cores"]),
                       s["errors"] + c["errors"]))
    m = results["median"]
    out.append(row(f"**median** ({results['median_of']})", m["sequential_s"], m["concurrent_s"], m["ratio"],
                   m["concurrent_p50_s"], m["concurrent_p95_s"],
                   (m["images_per_step_sequential"], m["images_per_step_concurrent"]) if has_batches else None,
                   (m["engine_cores_sequential"], m["engine_cores_concurrent"]),
                   (m["other_cores_sequential"], m["other_cores_concurrent"]), m["errors"]))
    verdict = "met" if m["ratio"] <= 0.60 else "NOT met"
    out.append(f"\nconcurrent / sequential, median of rounds: **{m['ratio']:.2f}** (target ≤ 0.60: {verdict}); "
               f"p50/p95 pooled over rounds: {m['pooled_p50_s']:.2f} / {m['pooled_p95_s']:.2f} s")
    single = results.get("single")
    if single:
        out += ["", f"| one generation of {single['steps']} steps | seconds per image | engine cores |",
                "|---|---|---|",
                f"| alone | {single['alone_s']:.3f} | {single['alone_engine_cores']:.2f} |",
                (f"| {n} at once (makespan / {n}) | {single['batch_per_image_s']:.3f} "
                 f"| {single['batch_engine_cores']:.2f} |"),
                (f"\nper image at batch {n} / alone: {single['batch_per_image_s'] / single['alone_s']:.2f}; "
                 f"other processes' cores, at most: {single['other_cores']:.2f}; errors {single['errors']}")]
    return "\n".join(out)


# ---- main ----------------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="tiny", help="tiny | sd15 | a pipeline directory (default tiny)")
    p.add_argument("--size", default="128", help="N (square) or WxH (default 128)")
    p.add_argument("--steps", default="8,16", help="step counts, each kind takes them in turn (default 8,16)")
    p.add_argument("--strength", default="1.0,0.75", help="edits' strength: MASKED,UNMASKED (default 1.0,0.75)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="sequential/concurrent rounds after the warm-up")
    p.add_argument("--busy", type=float, default=0.25,
                   help="a round where other processes took more CPU cores than this is run again and left out of "
                        "the medians (default 0.25; a shared machine)")
    p.add_argument("--with-single", action="store_true",
                   help="also: one generation alone vs --requests of it at once (per-image seconds)")
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--dtype", help="float32, float16, bfloat16 (default: float32 on cpu, float16 on cuda)")
    p.add_argument("--compile", action="store_true", help="the engine's --compile")
    p.add_argument("--engine-arg", action="append", default=[], help="extra `conduit engine` argument (repeat)")
    p.add_argument("--no-metrics", action="store_true", help="do not read the engine's batch sizes")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "conduit-bench-images"),
                   help="where pipelines are built and logs go (shared with images.py)")
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds for the engine to come up")
    p.add_argument("-o", "--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)
    w, _, h = args.size.partition("x")
    args.width, args.height = int(w), int(h or w)
    args.step_list = [int(s) for s in args.steps.split(",")]
    masked, _, whole = args.strength.partition(",")
    args.strength_masked, args.strength_whole = float(masked), float(whole or masked)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.requests < 1 or args.rounds < 1:
        raise SystemExit("--requests and --rounds must be at least 1")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    path = pipeline_dir(args)
    plan = make_plan(args)
    size = f"{args.width}x{args.height}"
    print(f"# image edits benchmark: {args.model} at {size}, {args.requests} requests "
          f"({sum(r.kind == 'generation' for r in plan)} generations, {sum(r.kind == 'edit+mask' for r in plan)} "
          f"masked edits, {sum(r.kind == 'edit' for r in plan)} unmasked), steps {args.steps}, strength "
          f"{args.strength_masked:g} masked / {args.strength_whole:g} unmasked, device {args.device or 'auto'}, "
          f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs", flush=True)
    metrics_port = None if args.no_metrics else free_port()
    stack_args = argparse.Namespace(**vars(args))
    if metrics_port:
        stack_args.engine_arg = [*args.engine_arg, "--metrics-port", str(metrics_port)]
    logs = Path(tempfile.mkdtemp(prefix="logs-edits-", dir=args.workdir))
    stack = Conduit(path, stack_args, logs)
    try:
        stack.wait_ready(args.ready_timeout)
        probe = Probe(stack.engine.pid, f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None)
        measured = asyncio.run(measure(stack.url, plan, probe, args))
    finally:
        stack.stop()
    quiet = [r for r in measured["rounds"] if not r["busy"]]
    if not quiet:
        print(f"every round was busy (other processes took more than {args.busy} cores): the medians are "
              "of busy rounds", file=sys.stderr)
    rounds = quiet or measured["rounds"]
    lat = [x for r in rounds for x in r["concurrent"]["latencies"]]
    median = {"sequential_s": med(rounds, "makespan_s", "sequential"),
              "concurrent_s": med(rounds, "makespan_s", "concurrent"),
              "ratio": med(rounds, "ratio"),
              "concurrent_p50_s": statistics.median(pct(r["concurrent"]["latencies"], 50) for r in rounds),
              "concurrent_p95_s": statistics.median(pct(r["concurrent"]["latencies"], 95) for r in rounds),
              "pooled_p50_s": pct(lat, 50), "pooled_p95_s": pct(lat, 95),
              "images_per_step_sequential": med(rounds, "images_per_step", "sequential"),
              "images_per_step_concurrent": med(rounds, "images_per_step", "concurrent"),
              "engine_cores_sequential": med(rounds, "engine_cores", "sequential"),
              "engine_cores_concurrent": med(rounds, "engine_cores", "concurrent"),
              "other_cores_sequential": med(rounds, "other_cores", "sequential"),
              "other_cores_concurrent": med(rounds, "other_cores", "concurrent"),
              "errors": sum(r["sequential"]["errors"] + r["concurrent"]["errors"] for r in rounds)}
    results: dict[str, Any] = {
        "model": str(path), "size": size, "requests": len(plan), "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "plan": [{"kind": r.kind, "steps": r.steps, "strength": r.strength, "denoising_steps": r.denoising_steps}
                 for r in plan],
        "busy_limit_cores": args.busy, "rounds": measured["rounds"], "median": median, "median_of": len(rounds),
        "single": measured["single"], "logs": str(logs)}
    print()
    print(report(results, args))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    errors = sum(r["sequential"]["errors"] + r["concurrent"]["errors"] for r in measured["rounds"])
    errors += (measured["single"] or {}).get("errors", 0)
    return 1 if errors else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
