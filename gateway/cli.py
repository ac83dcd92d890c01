"""The ``conduit`` command: ``up``, ``gateway``, ``engine``, ``models``, ``keys``.

Imports are deferred to the subcommand that needs them, so ``conduit gateway`` never
imports an ML library and ``conduit engine`` never imports Litestar.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engines.diffusers_engine import DiffusersSettings
    from engines.vllm_engine import VllmSettings

CPU_ENGINE_ENV = {
    # vLLM-CPU grabs ~7 GB of KV cache unless told; 1 GiB is plenty for tiny models.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def _logging(level: str, fmt: str = "text", service: str = "") -> None:
    from telemetry.logs import configure_logging

    configure_logging(level, fmt, service=service)


def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    # Each uvicorn worker builds its settings from the environment (with its own gateway id).
    for name in ("host", "port", "redis_url", "key_prefix", "request_timeout_s", "max_backlog", "max_body_bytes",
                 "log_level", "log_format", "otlp_endpoint", "trace_sample_ratio"):
        value = getattr(args, name, None)
        if value is not None:
            os.environ[f"CONDUIT_{name.upper()}"] = str(value)
    if args.config:
        os.environ["CONDUIT_CONFIG"] = args.config
    from gateway.settings import GatewaySettings

    settings = GatewaySettings.from_env(file=args.config)
    _logging(settings.log_level, settings.log_format, "conduit-gateway")
    # Each worker configures logging itself (asgi_from_env): uvicorn's own config would replace it.
    uvicorn.run("gateway.app:asgi_from_env", factory=True, host=settings.host, port=settings.port,
                workers=args.workers or settings.workers, loop="uvloop",
                http="gateway.server:BoundedHttpToolsProtocol", ws="none", access_log=False,
                log_level=settings.log_level.lower(), log_config=None, lifespan="on", timeout_graceful_shutdown=30)
    return 0


def cmd_engine(args: argparse.Namespace) -> int:
    from engines.main import serve
    from engines.worker import WorkerSettings

    _logging(args.log_level, args.log_format, f"conduit-engine-{args.kind}")
    settings = WorkerSettings(redis_url=args.redis_url, redis_cluster=args.redis_cluster, key_prefix=args.key_prefix,
                              engine_id=args.engine_id or "",
                              reclaim_idle_ms=args.reclaim_idle_ms, image_store=args.image_store,
                              image_ttl_s=args.image_ttl_s, drain_timeout_s=args.drain_timeout_s,
                              stall_s=args.stall_s)
    if args.kind == "synthetic":
        from engines.synthetic import SyntheticBackend, SyntheticSettings

        backend = SyntheticBackend(SyntheticSettings(
            models=(args.served_name or "synthetic").split(","), tokens=args.tokens, token_delay_s=args.token_delay,
            first_token_delay_s=args.first_token_delay, max_concurrency=args.max_concurrency or 256,
            numbered=args.numbered, block_s=args.block))
    elif args.kind == "diffusers":
        from engines.diffusers_engine import DiffusersBackend

        model = args.model
        tiny = model in (None, "tiny")
        if tiny:
            from engines.tiny import build_tiny_sd, default_sd_dir

            model = str(build_tiny_sd(default_sd_dir()))
        backend = DiffusersBackend(diffusers_settings(args, model))
    else:
        from engines.vllm_engine import VllmBackend

        for k, v in cpu_engine_environment(cpu_flag=args.cpu, cpu_build=_is_cpu_build()).items():
            os.environ.setdefault(k, v)
        model = args.model
        if model in (None, "tiny"):
            from engines.tiny import build_tiny_llama, default_model_dir

            model = str(build_tiny_llama(default_model_dir()))
        backend = VllmBackend(vllm_settings(args, model))
    _run_loop(serve(backend, settings, metrics_port=args.metrics_port, otlp_endpoint=args.otlp_endpoint))
    return 0


def cpu_engine_environment(*, cpu_flag: bool, cpu_build: bool) -> dict[str, str]:
    """The environment a vLLM engine on the CPU needs (``--cpu``, or the ``vllm-cpu`` build):
    a bounded KV cache and no model hub. A GPU engine gets none of it."""
    return dict(CPU_ENGINE_ENV) if cpu_flag or cpu_build else {}


def _is_cpu_build() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def vllm_settings(args: argparse.Namespace, model: str) -> VllmSettings:
    """A vLLM engine's settings from ``conduit engine``'s flags (``model``: a path or model id)."""
    from engines.vllm_engine import VllmSettings

    tiny = args.model in (None, "tiny")
    extra: dict[str, object] = {"distributed_executor_backend": "uni"} if args.cpu else {}
    optional = {name: getattr(args, name) for name in ("gpu_memory_utilization", "tensor_parallel_size")
                if getattr(args, name) is not None}
    return VllmSettings(
        model=model, served_name=args.served_name or ("tiny-llama" if tiny else None),
        max_concurrency=args.max_concurrency or 64, max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager, extra_engine_args=extra,
        # The tiny model's chat template speaks the Hermes tool-call format.
        tool_call_parser=args.tool_call_parser or ("hermes" if tiny else None),
        enable_auto_tool_choice=args.enable_auto_tool_choice or tiny,
        reasoning_parser=args.reasoning_parser, **optional)


def diffusers_settings(args: argparse.Namespace, model: str) -> DiffusersSettings:
    """A diffusers engine's settings from ``conduit engine``'s flags (``model``: the pipeline directory)."""
    from engines.diffusers_engine import DiffusersSettings

    tiny = args.model in (None, "tiny")
    limits = {name: getattr(args, name) for name in ("max_batch_pixels", "max_size", "max_steps", "default_steps")
              if getattr(args, name) is not None}
    return DiffusersSettings(
        model=model, served_name=args.served_name or ("tiny-sd" if tiny else None), device=args.device,
        dtype=args.dtype, compile=args.compile, compile_backend=args.compile_backend, batching=args.batching,
        max_concurrency=args.max_concurrency or 64, threads=args.threads, **limits)


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (as the gateway does): far cheaper loop turns."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        asyncio.run(main)
    else:
        uvloop.run(main)


def cmd_models(args: argparse.Namespace) -> int:
    """Build the tiny models (both unless ``--only``) and print their paths, one a line, Llama first."""
    from engines.tiny import build_tiny_llama, build_tiny_sd, default_model_dir, default_sd_dir

    if args.only in (None, "llama"):
        print(build_tiny_llama(Path(args.path) if args.path else default_model_dir()), flush=True)
    if args.only in (None, "sd"):
        print(build_tiny_sd(Path(args.sd_path) if args.sd_path else default_sd_dir()), flush=True)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from gateway.stack import LocalStack

    _logging("info")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it polls the gateway: one line a request
    stack = LocalStack(port=args.port, redis_port=args.redis_port, engine=args.engine, workdir=Path(args.workdir),
                       images=args.engine != "synthetic" and not args.no_images)
    return stack.run_forever()


def cmd_keys(args: argparse.Namespace) -> int:
    from gateway.tenancy.keys_cli import cmd_keys as run

    return run(args)


def _opt_int(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def _opt_float(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def _add_key_options(p: argparse.ArgumentParser) -> None:
    """The options ``create`` and ``update`` share (a limit left out: unchanged on update)."""
    p.add_argument("--name")
    p.add_argument("--owner")
    p.add_argument("--models", help="comma-separated models the key may use ('all': every model)")
    for name in ("rpm", "tpm", "ipm", "concurrency"):
        p.add_argument(f"--{name}", type=_opt_int, default=argparse.SUPPRESS, help=f"{name} limit ('none': unlimited)")
    p.add_argument("--priority", type=int, default=argparse.SUPPRESS, help="weight in fair queueing (default 1)")
    p.add_argument("--backlog-share", type=_opt_float, default=argparse.SUPPRESS,
                   help="fraction of a model's backlog this key may hold ('none': the gateway's default)")
    p.add_argument("--expires-in-days", type=float, help="the key stops working this many days from now")


def _add_keys_parser(sub: Any) -> None:
    """``conduit keys ...`` (implemented in gateway/tenancy/keys_cli.py)."""
    # Connection options go after the subcommand (`conduit keys list --redis-url ...`).
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--redis-url", default=os.environ.get("CONDUIT_REDIS_URL", "redis://127.0.0.1:6379/0"))
    conn.add_argument("--redis-cluster", action="store_true",
                      default=os.environ.get("CONDUIT_REDIS_CLUSTER", "").lower() in ("1", "true", "yes"))
    conn.add_argument("--key-prefix", default=os.environ.get("CONDUIT_KEY_PREFIX", "conduit"))
    keys = sub.add_parser("keys", help="Manage API keys (in the gateway's Redis).")
    keys.set_defaults(func=cmd_keys)
    ks = keys.add_subparsers(dest="keys_command", required=True)
    create = ks.add_parser("create", parents=[conn], help="Make a key; prints its text once, alone on stdout.")
    _add_key_options(create)
    create.add_argument("--disable", action="store_true", help="make it disabled")
    ls = ks.add_parser("list", parents=[conn], help="Every key (never hashes or secrets).")
    ls.add_argument("--json", action="store_true", help="one JSON object a line")
    ks.add_parser("show", parents=[conn], help="One key, as JSON.").add_argument("id")
    update = ks.add_parser("update", parents=[conn], help="Change a key (options left out stay as they are).")
    update.add_argument("id")
    _add_key_options(update)
    state = update.add_mutually_exclusive_group()
    state.add_argument("--disable", action="store_true")
    state.add_argument("--enable", action="store_true")
    update.add_argument("--never-expires", action="store_true")
    ks.add_parser("revoke", parents=[conn], help="Delete a key for good (every gateway refuses it within a "
                                                 "second).").add_argument("id")
    ks.add_parser("hash-admin", help="Read an admin credential on stdin; print its argon2id hash "
                                     "(for CONDUIT_ADMIN_KEY_HASH).")
    add_keys_usage(ks)


def cmd_keys_usage(args: argparse.Namespace) -> int:
    """Print a key's usage per UTC day and model (newest first), as a table or JSON."""
    import asyncio
    import time

    import msgspec

    from engines.lane import connect
    from engines.wire import Keys
    from gateway.settings import GatewaySettings
    from gateway.tenancy.usage import UsageLog

    settings = GatewaySettings.from_env(file=args.config, redis_url=args.redis_url, key_prefix=args.key_prefix)

    async def read() -> Any:
        redis = connect(settings.redis_url, cluster=settings.redis_cluster)
        try:
            return await UsageLog(redis, Keys(settings.key_prefix)).read(args.id, args.days, time.time())
        finally:
            await redis.aclose()

    usage = asyncio.run(read())
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(usage).decode(), indent=2))
        return 0
    rows = [(day.date, model, m.requests, m.prompt_tokens, m.completion_tokens, m.images)
            for day in usage.days for model, m in day.models.items()]
    header = ("date", "model", "requests", "prompt_tokens", "completion_tokens", "images")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def add_keys_usage(keys_sub: Any) -> None:
    """``conduit keys usage <id> [--days N]``."""
    us = keys_sub.add_parser("usage", help="A key's requests, tokens and images per UTC day and model.")
    us.add_argument("id", help="the key's public id (the 12 hex digits after `cdt-`)")
    us.add_argument("--days", type=int, default=7, help="how many days back, today included (default 7)")
    us.add_argument("--json", action="store_true", help="print JSON")
    us.add_argument("--redis-url")
    us.add_argument("--key-prefix")
    us.add_argument("--config", help="TOML or JSON settings file (CONDUIT_* variables override it)")
    us.set_defaults(func=cmd_keys_usage)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conduit", description="OpenAI-compatible inference gateway.")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="Run the local stack: Redis + gateway + CPU engines on tiny models "
                                   "(a Llama for chat, a Stable Diffusion pipeline for images).")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--redis-port", type=int, default=6390)
    up.add_argument("--engine", choices=["vllm", "synthetic"], default="vllm",
                    help="the chat engine; 'synthetic' (no model) starts no image engine either")
    up.add_argument("--no-images", action="store_true", help="no diffusers engine (chat only)")
    up.add_argument("--workdir", default=os.path.expanduser("~/.cache/conduit/stack"))
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="Run a gateway process.")
    gw.add_argument("--host")
    gw.add_argument("--port", type=int)
    gw.add_argument("--redis-url")
    gw.add_argument("--key-prefix", help="prefix of every Redis key (several stacks can share one Redis)")
    gw.add_argument("--workers", type=int)
    gw.add_argument("--request-timeout-s", type=float)
    gw.add_argument("--max-backlog", type=int)
    gw.add_argument("--max-body-bytes", type=int)
    gw.add_argument("--log-level")
    gw.add_argument("--log-format", choices=["text", "json"], help="json: one JSON object a line (log collectors)")
    gw.add_argument("--otlp-endpoint", help="OTLP/HTTP collector for traces (http://collector:4318); off if unset")
    gw.add_argument("--trace-sample-ratio", type=float, help="share of new traces recorded (default 0.1)")
    gw.add_argument("--config", help="TOML or JSON settings file (CONDUIT_* variables override it)")
    gw.set_defaults(func=cmd_gateway)

    en = sub.add_parser("engine", help="Run an engine process.")
    en.add_argument("--kind", choices=["vllm", "synthetic", "diffusers"], default="vllm")
    en.add_argument("--model", help="model path or name (vllm), pipeline directory (diffusers); 'tiny' builds "
                                    "the offline tiny Llama (vllm) or tiny Stable Diffusion (diffusers)")
    en.add_argument("--device", help="diffusers: cpu, cuda, cuda:1... (default: cuda when available)")
    en.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                    help="diffusers: weights' type (default: float32 on cpu, float16 on a GPU)")
    en.add_argument("--compile", action="store_true", help="diffusers: torch.compile UNet and VAE (slow start)")
    en.add_argument("--compile-backend", default="inductor", help="diffusers: torch.compile's backend")
    en.add_argument("--batching", choices=["auto", "step", "request"], default="auto",
                    help="diffusers: step-level continuous batching, whole-request batching, or auto")
    en.add_argument("--max-batch-pixels", type=int, help="diffusers: sum of width*height per denoising step")
    en.add_argument("--max-size", type=int, help="diffusers: largest width or height in pixels (default 2048)")
    en.add_argument("--max-steps", type=int, help="diffusers: most denoising steps a request may take (default 150)")
    en.add_argument("--default-steps", type=int, help="diffusers: steps of quality 'auto' (default 30)")
    en.add_argument("--threads", type=int, help="diffusers: torch CPU threads (1 suits small shared CPUs)")
    en.add_argument("--served-name", help="the model name clients use (synthetic: several, comma-separated)")
    en.add_argument("--redis-url", default=os.environ.get("CONDUIT_REDIS_URL", "redis://127.0.0.1:6379/0"))
    en.add_argument("--redis-cluster", action="store_true",
                    default=os.environ.get("CONDUIT_REDIS_CLUSTER", "").lower() in ("1", "true", "yes"),
                    help="Redis is a cluster (also chosen by a redis+cluster:// URL)")
    en.add_argument("--key-prefix", default=os.environ.get("CONDUIT_KEY_PREFIX", "conduit"))
    en.add_argument("--engine-id")
    en.add_argument("--image-store", default=os.environ.get("CONDUIT_IMAGE_STORE", "redis"),
                    help="where images go: redis (default) or a directory the gateways read too")
    en.add_argument("--image-ttl-s", type=float, default=3600.0,
                    help="how long a stored image stays readable when its job does not say")
    en.add_argument("--max-concurrency", type=int)
    en.add_argument("--max-model-len", type=int)
    en.add_argument("--gpu-memory-utilization", type=float,
                    help="vllm: share of the GPU's memory vLLM takes (default 0.9; lower it to share a GPU)")
    en.add_argument("--tensor-parallel-size", type=int, help="vllm: GPUs one model is split across (default 1)")
    en.add_argument("--enforce-eager", action="store_true")
    en.add_argument("--cpu", action="store_true", help="run vLLM in-process on the CPU")
    en.add_argument("--tool-call-parser", help="vLLM tool-call parser (hermes, llama3_json, mistral, ...)")
    en.add_argument("--enable-auto-tool-choice", action="store_true", help='allow tool_choice "auto"')
    en.add_argument("--reasoning-parser", help="vLLM reasoning parser (deepseek_r1, qwen3, ...)")
    en.add_argument("--metrics-port", type=int)
    en.add_argument("--reclaim-idle-ms", type=int, default=5000)
    en.add_argument("--stall-s", type=float, default=20.0,
                    help="an event loop that takes no turn for this long stops the heartbeat: other engines take "
                         "over this one's jobs")
    en.add_argument("--drain-timeout-s", type=float, default=30.0,
                    help="on SIGTERM, how long in-flight jobs may run on before they are left to another "
                         "engine (give long generations their whole deadline: the gateways' request_timeout_s)")
    en.add_argument("--tokens", type=int, default=16, help="synthetic: tokens per choice")
    en.add_argument("--token-delay", type=float, default=0.0, help="synthetic: seconds between tokens")
    en.add_argument("--first-token-delay", type=float, default=0.0, help="synthetic: seconds before the first")
    en.add_argument("--block", type=float, default=0.0,
                    help="synthetic: seconds each job blocks the engine's event loop (a wedged engine, for fault tests)")
    en.add_argument("--numbered", action="store_true",
                    help="synthetic: token i's text is '<i> ', so clients can check for gaps and duplicates")
    en.add_argument("--log-level", default="info")
    en.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("CONDUIT_LOG_FORMAT", "text"),
                    help="json: one JSON object a line (log collectors)")
    en.add_argument("--otlp-endpoint", default=os.environ.get("CONDUIT_OTLP_ENDPOINT", ""),
                    help="OTLP/HTTP collector for traces; the engine continues the traces gateways sample")
    en.set_defaults(func=cmd_engine)

    mo = sub.add_parser("models", help="Model utilities.")
    mo_sub = mo.add_subparsers(dest="models_command", required=True)
    bt = mo_sub.add_parser("build-tiny", help="Build the tiny random-weight Llama and Stable Diffusion pipeline "
                                              "used by tests and `conduit up`; prints their paths, Llama first.")
    bt.add_argument("--only", choices=["llama", "sd"], help="build only this one (prints one path)")
    bt.add_argument("--path", help="where the Llama goes (default: ~/.cache/conduit/models/tiny-llama, "
                                   "or under $CONDUIT_CACHE_DIR)")
    bt.add_argument("--sd-path", help="where the Stable Diffusion pipeline goes (default: beside the Llama's "
                                      "default, models/tiny-sd)")
    bt.set_defaults(func=cmd_models)

    _add_keys_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
