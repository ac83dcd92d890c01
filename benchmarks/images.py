#!/usr/bin/env python3
"""images.py - image generation throughput and latency: the raw diffusers pipeline vs Conduit.

Four measurements of the same work, ``--requests`` (16) one-image requests arriving at
once, their step counts mixed (``--steps 4,16``: half 4, half 16, interleaved):

* **(a) raw, one at a time**: the diffusers pipeline called once per request, in arrival
  order (what a one-request-at-a-time server does); a request's latency includes its wait;
* **(b) raw, max batch**: one pipeline call per step-count group with every image of the
  group in it (at most ``--max-batch``; default: the engine's pixel budget, 16 x 512 x 512
  pixels per step), shortest group first: the throughput ceiling a batching server aims at;
* **(e) the engine alone**: the same requests straight into Conduit's diffusers backend in
  this process (its step loop, PNG encoding included): its batching without the HTTP, gateway
  and Redis costs, which on a small CPU machine compete with the engine for the same cores;
* **(c) Conduit**: the same requests, concurrently, over HTTP (``b64_json``) through a real
  redis-server, gateway and diffusers engine started here (``conduit gateway`` /
  ``conduit engine --kind diffusers``) on free local ports;
* **(d) short behind long** (Conduit): ``--long-count`` (8) requests of ``--long-steps`` (40)
  steps, then one of ``--short-steps`` (4) ``--short-delay`` (0.2 s) later; the short one's
  latency against its latency alone, and against what it would be behind a one-at-a-time
  server or a whole-request batch (computed from raw timings measured here).

The raw rows include PNG encoding of every image, as the engine does. Every scenario runs
``--repeats`` times after a warm-up; images/s is the median run's, latencies are pooled.
Prints markdown tables (and ``-o FILE`` writes the numbers as JSON). Needs no network.

    python benchmarks/images.py                                   # tiny pipeline, 64 px, CPU
    python benchmarks/images.py --model sd15 --size 512 --steps 30 --long-steps 40 \\
        --device cuda --dtype float16 [--compile]                 # SD 1.5 architecture, random weights

``--model`` is ``tiny`` (the tiny random pipeline, built into ``--workdir``), ``sd15`` (an
SD 1.5-architecture pipeline with random weights: UNet 860M, VAE, 12-layer CLIP text
encoder, built once into ``--workdir``; give it a GPU) or a pipeline directory.
``--parts a,b,c,d`` picks the measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SERVED = "bench-sd"


# ---- pipelines ---------------------------------------------------------------------------------

def build_sd15(path: Path, device: str) -> Path:
    """An SD 1.5-architecture pipeline with random weights (same compute as the real one), saved in
    fp16 to ``path``; its tokenizer is the tiny pipeline's offline one (ids fit CLIP's vocabulary)."""
    if (path / "model_index.json").is_file():
        return path
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from engines.tiny import build_tiny_sd

    tiny = build_tiny_sd(path.parent / "tiny-sd")
    tokenizer = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, vocab_size=49408, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to(torch.float16)
    tmp = Path(tempfile.mkdtemp(prefix=".sd15-", dir=path.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path)
    return path


def pipeline_dir(args: argparse.Namespace) -> Path:
    work = Path(args.workdir)
    if args.model == "tiny":
        from engines.tiny import build_tiny_sd

        return build_tiny_sd(work / "tiny-sd")
    if args.model == "sd15":
        return build_sd15(work / "sd15-random", args.device or "cpu")
    return Path(args.model)


class Raw:
    """The diffusers pipeline in this process, called as a batching server would call it."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        import torch
        from diffusers import AutoPipelineForText2Image

        self.torch = torch
        self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if self.device == "cpu" else torch.float16)
        self.pipe = AutoPipelineForText2Image.from_pretrained(path, dtype=dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        if args.compile:
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.vae.to(memory_format=torch.channels_last)
            self.pipe.unet = torch.compile(self.pipe.unet)
            self.pipe.vae.decode = torch.compile(self.pipe.vae.decode)
        self.width, self.height = args.width, args.height

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def call(self, steps: int, count: int, first: int = 0) -> float:
        """Make ``count`` images in one call (each its own generator), PNG-encode them; seconds taken."""
        self.sync()
        t = time.perf_counter()
        gens = [self.torch.Generator(self.device).manual_seed(first + i) for i in range(count)]
        images = self.pipe(prompt=[f"a photograph of subject {first + i}" for i in range(count)],
                           num_inference_steps=steps, width=self.width, height=self.height, generator=gens,
                           output_type="pil").images
        for image in images:
            image.save(io.BytesIO(), format="PNG")
        self.sync()
        return time.perf_counter() - t

    def close(self) -> None:
        del self.pipe
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()


class Run:
    """One measured run: when each request finished, from the moment all arrived."""

    def __init__(self, latencies: list[float], makespan: float, errors: int = 0) -> None:
        self.latencies, self.makespan, self.errors = latencies, makespan, errors


def one_at_a_time(raw: Raw, plan: list[int]) -> Run:
    t, done = 0.0, []
    for i, steps in enumerate(plan):
        t += raw.call(steps, 1, first=i)
        done.append(t)
    return Run(done, t)


def max_batch(raw: Raw, plan: list[int], cap: int) -> Run:
    t, done = 0.0, []
    for steps in sorted(set(plan)):
        group = [i for i, s in enumerate(plan) if s == steps]
        for k in range(0, len(group), cap):
            chunk = group[k:k + cap]
            t += raw.call(steps, len(chunk), first=chunk[0])
            done += [t] * len(chunk)
    return Run(done, t)


# ---- the engine alone ----------------------------------------------------------------------------

class _Sink:
    """A JobOutput that drops what it is given (the engine still encodes every image)."""

    def started(self) -> None: ...

    def delta(self, *_: object) -> None: ...

    async def image(self, data: bytes, **_: object) -> None: ...

    def done(self, *_: object) -> None: ...


def engine_in_process(path: Path, args: argparse.Namespace, plan: list[int], size: str) -> list[Run]:
    """(e): the same requests straight into Conduit's diffusers backend (its step loop), in this
    process: the engine's batching without HTTP, the gateway or Redis."""
    import msgspec

    from engines.diffusers_engine import DiffusersBackend, DiffusersSettings
    from engines.contract.messages import Job

    async def one_run(backend: Any) -> Run:
        t = time.perf_counter()

        async def one(i: int, steps: int) -> float:
            body = msgspec.json.encode({"prompt": f"a photograph of subject {i}", "size": size,
                                        "num_inference_steps": steps})
            await backend.run(Job(id=f"bench-{i}", kind="image", model=SERVED, body=body, reply_to="",
                                  deadline_ms=0), _Sink())
            return time.perf_counter() - t

        latencies = await asyncio.gather(*(one(i, steps) for i, steps in enumerate(plan)))
        return Run(list(latencies), time.perf_counter() - t)

    async def runs() -> list[Run]:
        backend = DiffusersBackend(DiffusersSettings(model=str(path), served_name=SERVED, device=args.device,
                                                     dtype=args.dtype, compile=args.compile))
        await backend.start()
        try:
            await one_run(backend)  # warm-up
            return [await one_run(backend) for _ in range(args.repeats)]
        finally:
            await backend.close()

    return asyncio.run(runs())


def engine_in_child(argv: list[str] | None) -> dict[str, Any]:
    """(e) measured by this script in a child process (``--parts e``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--parts", "-o", "--out"):
        while flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, *args, "--parts", "e", "-o", out.name], check=True,
                       stdout=subprocess.DEVNULL)
        row: dict[str, Any] = json.loads(Path(out.name).read_text())["rows"]["e"]
    return row


# ---- Conduit -------------------------------------------------------------------------------------

class Conduit:
    """redis-server + ``conduit engine --kind diffusers`` + ``conduit gateway`` on free local ports."""

    def __init__(self, path: Path, args: argparse.Namespace, logs: Path) -> None:
        from gateway.stack import wait_for_port

        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        redis_port, self.port = free_port(), free_port()
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (Debian: apt-get install redis-server)")
        with open(logs / "redis.log", "wb") as log:
            self.procs.append(subprocess.Popen(
                [exe, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(logs), "--loglevel", "warning"], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
        wait_for_port(redis_port, proc=self.procs[0], timeout=10)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        engine = ["engine", "--kind", "diffusers", "--model", str(path), "--served-name", SERVED,
                  "--redis-url", redis_url, "--log-level", "warning"]
        if args.device:
            engine += ["--device", args.device]
        if args.dtype:
            engine += ["--dtype", args.dtype]
        if args.compile:
            engine.append("--compile")
        self.engine = self._start("engine", [*engine, *args.engine_arg])
        # Without API keys: the benchmark measures image serving.
        self.gateway = self._start("gateway", ["gateway", "--port", str(self.port), "--redis-url", redis_url,
                                               "--log-level", "warning"], env={"CONDUIT_AUTH": "false"})
        self.url = f"http://127.0.0.1:{self.port}"

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True, env={**os.environ, **(env or {})})
        log.close()
        self.procs.append(proc)
        return proc

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc, name in ((self.engine, "engine"), (self.gateway, "gateway")):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{(self.logs / f'{name}.log').read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                models = httpx.get(f"{self.url}/v1/models", timeout=2).json()["data"]
                if any(m["id"] == SERVED for m in models):
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{SERVED} not served after {timeout}s; see {self.logs}")

    def stop(self) -> None:
        for group in (self.procs[1:], self.procs[:1]):  # Redis last
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def request(client: Any, url: str, steps: int, size: str, i: int) -> tuple[float, bool]:
    """One image over HTTP; (seconds, ok)."""
    body = {"model": SERVED, "prompt": f"a photograph of subject {i}", "size": size, "num_inference_steps": steps,
            "response_format": "b64_json"}
    t = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/images/generations", json=body)
        ok = r.status_code == 200 and len(r.json()["data"][0]["b64_json"]) > 0
    except Exception:  # noqa: BLE001 - counted, the run goes on
        ok = False
    return time.perf_counter() - t, ok


async def through_conduit(url: str, plan: list[int], size: str) -> Run:
    import httpx

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=len(plan) + 4)) as client:
        t = time.perf_counter()
        out = await asyncio.gather(*(request(client, url, steps, size, i) for i, steps in enumerate(plan)))
        makespan = time.perf_counter() - t
    return Run([s for s, _ in out], makespan, sum(not ok for _, ok in out))


async def short_behind_long(url: str, args: argparse.Namespace, size: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=args.long_count + 4)) as client:
        alone = [(await request(client, url, args.short_steps, size, 1000 + k))[0] for k in range(args.repeats)]
        long_alone = (await request(client, url, args.long_steps, size, 2000))[0]
        shorts, longs, errors = [], [], 0
        for rep in range(args.repeats):
            longs_task = [asyncio.create_task(request(client, url, args.long_steps, size, 3000 + 100 * rep + k))
                          for k in range(args.long_count)]
            await asyncio.sleep(args.short_delay)
            secs, ok = await request(client, url, args.short_steps, size, 4000 + rep)
            shorts.append(secs)
            done = await asyncio.gather(*longs_task)
            longs += [s for s, _ in done]
            errors += (not ok) + sum(not o for _, o in done)
    return {"short_alone_s": statistics.median(alone), "long_alone_s": long_alone,
            "short_behind_long_s": statistics.median(shorts), "long_p50_s": statistics.median(longs),
            "long_max_s": max(longs), "errors": errors}


# ---- report --------------------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    vals = sorted(values)
    return vals[min(len(vals) - 1, max(0, math.ceil(p / 100 * len(vals)) - 1))]


def summary(runs: list[Run], images: int) -> dict[str, Any]:
    spans = sorted(r.makespan for r in runs)
    lat = [x for r in runs for x in r.latencies]
    median_span = spans[len(spans) // 2]
    return {"images": images, "runs": len(runs), "makespan_s": median_span, "images_per_s": images / median_span,
            "p50_s": pct(lat, 50), "p95_s": pct(lat, 95), "errors": sum(r.errors for r in runs)}


def repeat(fn: Any, times: int) -> list[Run]:
    return [fn() for _ in range(times)]


def table(rows: dict[str, dict[str, Any]]) -> str:
    out = ["| scenario | images | images/s | p50 latency (s) | p95 latency (s) | vs (b) | errors |",
           "|---|---|---|---|---|---|---|"]
    ceiling = rows.get("b", {}).get("images_per_s")
    names = {"a": "(a) raw pipeline, one request at a time", "b": "(b) raw pipeline, max batch per step count",
             "e": "(e) Conduit's diffusers engine in-process (step loop; no HTTP, gateway or Redis)",
             "c": "(c) Conduit (HTTP, gateway, Redis, diffusers engine)"}
    for key in ("a", "b", "e", "c"):
        if key in rows:
            r = rows[key]
            ratio = f"{r['images_per_s'] / ceiling:.0%}" if ceiling else "-"
            out.append(f"| {names[key]} | {r['images']} x {r['runs']} | {r['images_per_s']:.2f} | {r['p50_s']:.3f} "
                       f"| {r['p95_s']:.3f} | {ratio} | {r['errors']} |")
    return "\n".join(out)


def short_table(d: dict[str, Any], args: argparse.Namespace) -> str:
    out = [f"| short request ({args.short_steps} steps) | latency (s) | x alone |", "|---|---|---|",
           f"| alone, through Conduit | {d['short_alone_s']:.3f} | 1.0 |",
           f"| behind {args.long_count} x {args.long_steps} steps, through Conduit | {d['short_behind_long_s']:.3f} "
           f"| {d['short_behind_long_s'] / d['short_alone_s']:.1f} |"]
    for key, label in (("raw_fifo_s", "behind them, one-at-a-time server (computed from raw times)"),
                       ("raw_batch_s", "behind them, whole-request batching (computed from raw times)")):
        if key in d:
            out.append(f"| {label} | {d[key]:.3f} | {d[key] / d['short_alone_s']:.1f} |")
    out.append(f"\nlong requests through Conduit: alone {d['long_alone_s']:.3f} s; in the scenario p50 "
               f"{d['long_p50_s']:.3f} s, max {d['long_max_s']:.3f} s; errors {d['errors']}")
    return "\n".join(out)


# ---- main ----------------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="tiny", help="tiny | sd15 | a pipeline directory (default tiny)")
    p.add_argument("--size", default="64", help="N (square) or WxH (default 64)")
    p.add_argument("--steps", default="4,16", help="step counts, assigned to the requests in turn (default 4,16)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-batch", type=int, help="(b)'s images per call (default: 16 x 512 x 512 pixels' worth)")
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--dtype", help="float32, float16, bfloat16 (default: float32 on cpu, float16 on cuda)")
    p.add_argument("--compile", action="store_true", help="torch.compile + channels_last (raw and engine)")
    p.add_argument("--engine-arg", action="append", default=[], help="extra `conduit engine` argument (repeat)")
    p.add_argument("--long-steps", type=int, default=40)
    p.add_argument("--long-count", type=int, default=8)
    p.add_argument("--short-steps", type=int, default=4)
    p.add_argument("--short-delay", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="a,b,e,c,d", help="which measurements (default a,b,e,c,d)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "conduit-bench-images"),
                   help="where pipelines are built and logs go")
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds for the engine to come up")
    p.add_argument("-o", "--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)
    w, _, h = args.size.partition("x")
    args.width, args.height = int(w), int(h or w)
    args.step_list = [int(s) for s in args.steps.split(",")]
    args.part_set = set(args.parts.split(","))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = [args.step_list[i % len(args.step_list)] for i in range(args.requests)]
    size = f"{args.width}x{args.height}"
    cap = args.max_batch or max(1, 16 * 512 * 512 // (args.width * args.height))
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    path = pipeline_dir(args)
    results: dict[str, Any] = {"model": str(path), "size": size, "plan": plan, "max_batch": cap}
    rows: dict[str, dict[str, Any]] = {}
    raw_times: dict[str, float] = {}
    print(f"# images benchmark: {args.model} at {size}, {args.requests} requests, steps {args.steps}, "
          f"device {args.device or 'auto'}, dtype {args.dtype or 'auto'}{', compiled' if args.compile else ''}",
          flush=True)

    if args.part_set & {"a", "b", "d"}:
        raw = Raw(path, args)
        results["device"] = raw.device
        for steps in sorted(set(plan)):  # warm-up (and compile) for each shape used below
            raw.call(steps, 1)
            raw.call(steps, min(cap, plan.count(steps)))
        if "a" in args.part_set:
            rows["a"] = summary(repeat(lambda: one_at_a_time(raw, plan), args.repeats), len(plan))
        if "b" in args.part_set:
            rows["b"] = summary(repeat(lambda: max_batch(raw, plan, cap), args.repeats), len(plan))
        if "d" in args.part_set:
            raw.call(args.long_steps, min(cap, args.long_count))
            raw_times = {"short_1": statistics.median(raw.call(args.short_steps, 1) for _ in range(args.repeats)),
                         "long_1": raw.call(args.long_steps, 1),
                         "long_batch": raw.call(args.long_steps, min(cap, args.long_count))}
        raw.close()
    if "e" in args.part_set:
        if args.part_set == {"e"}:
            rows["e"] = summary(engine_in_process(path, args, plan, size), len(plan))
        else:
            # In a process of its own: torch run from a second thread of a process whose main
            # thread already ran it (the raw rows) gets a second OpenMP team, and on a small
            # CPU the two teams' spinning threads halve the engine's speed.
            rows["e"] = engine_in_child(argv)
    if args.part_set & {"a", "b", "d", "e"}:
        if args.part_set & {"c", "d"}:  # the final tables come after Conduit's run
            print(table(rows), flush=True)

    if args.part_set & {"c", "d"}:
        logs = Path(tempfile.mkdtemp(prefix="logs-", dir=args.workdir))
        stack = Conduit(path, args, logs)
        try:
            stack.wait_ready(args.ready_timeout)
            asyncio.run(through_conduit(stack.url, sorted(set(plan)) * 2, size))  # warm-up
            if "c" in args.part_set:
                rows["c"] = summary([asyncio.run(through_conduit(stack.url, plan, size))
                                     for _ in range(args.repeats)], len(plan))
            if "d" in args.part_set:
                d = asyncio.run(short_behind_long(stack.url, args, size))
                if raw_times:
                    lead = args.short_delay
                    d["raw_fifo_s"] = max(args.long_count * raw_times["long_1"] - lead, 0) + raw_times["short_1"]
                    d["raw_batch_s"] = max(raw_times["long_batch"] - lead, 0) + raw_times["short_1"]
                    d["raw"] = raw_times
                results["short_behind_long"] = d
        finally:
            stack.stop()
        results["logs"] = str(logs)

    results["rows"] = rows
    print()
    print(table(rows))
    if "short_behind_long" in results:
        print()
        print(short_table(results["short_behind_long"], args))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 1 if any(r["errors"] for r in rows.values()) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
