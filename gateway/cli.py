"""The ``conduit`` command: ``up``, ``gateway``, ``engine``, ``models``, ``keys``.

Imports are deferred to the subcommand that needs them, so ``conduit gateway`` never imports an
ML library. ``conduit engine`` and ``conduit models build-tiny`` are the engine's own program
(``python -m engines``, :mod:`engines.cli`), run in this process's place: this package never
imports engine code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.settings import RedisSettings


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
    server, telemetry = settings.server, settings.telemetry
    _logging(telemetry.log_level, telemetry.log_format, "conduit-gateway")
    refused = first_contact(settings.redis)
    if refused:
        print(f"conduit gateway: {refused}", file=sys.stderr)
        return 2
    # Each worker configures logging itself (asgi_from_env): uvicorn's own config would replace it.
    uvicorn.run("gateway.app:asgi_from_env", factory=True, host=server.host, port=server.port,
                workers=args.workers or server.workers, loop="uvloop",
                http="gateway.server:BoundedHttpToolsProtocol", ws="none", access_log=False,
                log_level=telemetry.log_level.lower(), log_config=None, lifespan="on", timeout_graceful_shutdown=30,
                # Off: uvicorn would believe X-Forwarded-For from 127.0.0.1 (or FORWARDED_ALLOW_IPS) with
                # rules of its own; the gateway decides who the client is (trusted_proxies, gateway.proxies).
                proxy_headers=False)
    return 0


#: The settings that hold a gateway's Redis login, named when Redis refuses it.
GATEWAY_LOGIN = ("CONDUIT_REDIS_PASSWORD (and CONDUIT_REDIS_USERNAME for an ACL user: `gateway` in the deployments; "
                 "or redis_password and redis_username in the --config file)")


def first_contact(redis: RedisSettings) -> str:
    """Why Redis refused the gateway's login, asked once before any worker starts, or "" (an
    unreachable Redis is waited for: 503s until it answers)."""
    from engines.contract.reach import login_problem

    return login_problem(redis.redis_url, cluster=redis.redis_cluster, username=redis.redis_username,
                         password=redis.redis_password, fix=GATEWAY_LOGIN, log=logging.getLogger("conduit.gateway"),
                         meanwhile="starting anyway: 503s until it answers")


def cmd_up(args: argparse.Namespace) -> int:
    from gateway.stack import LocalStack

    _logging("info")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it polls the gateway: one line a request
    stack = LocalStack(port=args.port, redis_port=args.redis_port, engine=args.engine, workdir=Path(args.workdir),
                       images=args.engine != "synthetic" and not args.no_images, embeddings=not args.no_embeddings)
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
    # The Redis user (`admin` in the deployments); its password only ever from the environment.
    conn.add_argument("--redis-username", default=os.environ.get("CONDUIT_REDIS_USERNAME", ""))
    conn.set_defaults(redis_password=os.environ.get("CONDUIT_REDIS_PASSWORD", ""))
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
    ks.add_parser("hash-metrics", help="Read the metrics credential (Prometheus's) on stdin; print its argon2id "
                                       "hash (for CONDUIT_METRICS_KEY_HASH).")
    add_keys_usage(ks)


def cmd_keys_usage(args: argparse.Namespace) -> int:
    """Print a key's usage per UTC day and model (newest first), as a table or JSON."""
    import time

    import msgspec

    from engines.contract.keys import Keys
    from gateway.settings import GatewaySettings
    from gateway.tenancy.keys_cli import FAIL_FAST, against_redis
    from gateway.tenancy.usage import UsageLog

    settings = GatewaySettings.from_env(file=args.config, redis_url=args.redis_url, key_prefix=args.key_prefix)
    redis_settings = settings.redis
    found: list[Any] = []

    async def read(redis: Any) -> int:
        found.append(await UsageLog(redis, Keys(redis_settings.key_prefix)).read(args.id, args.days, time.time()))
        return 0

    failed = against_redis("keys usage", redis_settings.connect(**FAIL_FAST), redis_settings.redis_url,
                           username=redis_settings.redis_username, password=redis_settings.redis_password, work=read)
    if failed:
        return failed
    usage = found[0]
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
                                   "(a Llama for chat and for embeddings, a Stable Diffusion pipeline for images).")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--redis-port", type=int, default=6390)
    up.add_argument("--engine", choices=["vllm", "synthetic"], default="vllm",
                    help="the chat engine; 'synthetic' (no model) starts no image engine either")
    up.add_argument("--no-images", action="store_true", help="no diffusers engine (chat only)")
    up.add_argument("--no-embeddings", action="store_true",
                    help="no vLLM embedding engine (tiny-embed, for /v1/embeddings)")
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

    # Engine processes are their own program (engines/cli.py): `main` runs it in this one's place.
    sub.add_parser("engine", add_help=False, help="Run an engine process (`conduit engine --help`: its options).")
    mo = sub.add_parser("models", help="Model utilities.")
    mo_sub = mo.add_subparsers(dest="models_command", required=True)
    mo_sub.add_parser("build-tiny", add_help=False, help="Build the tiny random-weight Llama and Stable Diffusion "
                                                       "pipeline used by tests and `conduit up`; prints their paths.")

    _add_keys_parser(sub)

    acl = sub.add_parser("redis-acl", help="Print Conduit's Redis users (ACL rules per role: gateway, engine, "
                                           "admin), as compose/redis/start.sh reads them.")
    acl.add_argument("--key-prefix", default=os.environ.get("CONDUIT_KEY_PREFIX", "conduit"))
    acl.add_argument("--autoscaler", action="store_true", help="add the autoscaler user (KEDA: XLEN of job streams)")
    acl.set_defaults(func=cmd_redis_acl)
    return p


def cmd_redis_acl(args: argparse.Namespace) -> int:
    """Print the users of ``engines.contract.acl`` for the key prefix, passwords as placeholders."""
    from engines.contract.acl import BASE_ROLES, ROLES, acl_file

    print(acl_file(args.key_prefix, ROLES if args.autoscaler else BASE_ROLES), end="")
    return 0


#: ``conduit`` subcommands that are the engine's own program: ``conduit <these> ARGS`` runs
#: ``python -P -m engines <command> ARGS`` in this process's place (same pid: signals reach the
#: engine; ``-P``: the working directory is not put on ``sys.path``, as a console script's is not).
ENGINE_COMMANDS = {("engine",): "serve", ("models", "build-tiny"): "build-tiny"}


def engine_command(argv: list[str]) -> list[str] | None:
    """The engine program's command line for ``argv`` when it names an engine subcommand, else None."""
    for prefix, command in ENGINE_COMMANDS.items():
        if tuple(argv[:len(prefix)]) == prefix:
            return [sys.executable, "-P", "-m", "engines", command, *argv[len(prefix):]]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = engine_command(argv)
    if command is not None:
        sys.stdout.flush()
        os.execv(command[0], command)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
