"""``conduit keys ...``: API key management against the configured Redis.

``create`` prints the key's text once, on stdout and alone (``KEY=$(conduit keys create ...)``);
nothing here ever prints a hash. ``hash-admin`` turns an admin credential read from stdin into
the argon2id hash for ``CONDUIT_ADMIN_KEY_HASH``; ``hash-metrics`` does the same for Prometheus's
credential (``CONDUIT_METRICS_KEY_HASH``). (Usage reports, ``conduit keys usage``, live
with the usage accounting and are added to the parser beside these.)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from engines.contract.lane import REDIS_ERRORS, connect
from engines.contract.keys import Keys
from engines.contract.reach import LoginRefused, Unreachable, first_contact, unreachable_message
from gateway.tenancy.keys import HASHER, KeyChanges, KeyInfo, KeyRecord, KeyStore, InvalidKeyField
from gateway.tenancy.principal import KeyLimits

_LIMITS = ("rpm", "tpm", "ipm", "concurrency", "priority", "backlog_share")
_JSON = msgspec.json.Encoder()
#: The settings that hold ``conduit keys``' Redis login, named when Redis refuses it.
LOGIN_SETTINGS = "CONDUIT_REDIS_PASSWORD (and CONDUIT_REDIS_USERNAME for an ACL user: `admin` in the deployments)"
#: A one-shot command fails fast: seconds to connect, and for any one reply.
FAIL_FAST = {"socket_connect_timeout": 5.0, "socket_timeout": 10.0}


def _models(value: str) -> list[str] | None:
    return None if value.strip().lower() in ("", "all") else [m.strip() for m in value.split(",") if m.strip()]


def _limits(args: argparse.Namespace, base: KeyLimits) -> KeyLimits:
    given = {name: getattr(args, name) for name in _LIMITS if hasattr(args, name)}
    return msgspec.structs.replace(base, **given)


def _expires(args: argparse.Namespace) -> int | None:
    return int((time.time() + args.expires_in_days * 86400) * 1000)


def _show(info: KeyInfo) -> str:
    return _JSON.encode(info).decode()


async def _create(store: KeyStore, args: argparse.Namespace) -> int:
    if not args.name:
        print("conduit keys create: --name is required", file=sys.stderr)
        return 2
    text, record = await store.create(
        args.name, owner=args.owner or "", models=_models(args.models) if args.models is not None else None,
        limits=_limits(args, KeyLimits()), expires_ms=_expires(args) if args.expires_in_days is not None else None,
        disabled=bool(args.disable))
    print(text, flush=True)
    print(f"created key {record.id} ({record.name}); it is shown this once: store it now.\n{_show(record.info())}",
          file=sys.stderr)
    return 0


async def _list(store: KeyStore, args: argparse.Namespace) -> int:
    records = await store.list()
    if args.json:
        for r in records:
            print(_show(r.info()))
        return 0
    print(f"{'ID':<13} {'NAME':<24} {'OWNER':<20} {'STATE':<9} MODELS")
    for r in records:
        state = "disabled" if r.disabled else "expired" if r.expired() else "active"
        models = "all" if r.models is None else ",".join(r.models)
        print(f"{r.id:<13} {r.name[:24]:<24} {r.owner[:20]:<20} {state:<9} {models}")
    return 0


async def _found(store: KeyStore, key_id: str) -> KeyRecord | None:
    record = await store.get(key_id)
    if record is None:
        print(f"no API key with id {key_id!r}", file=sys.stderr)
    return record


async def _show_cmd(store: KeyStore, args: argparse.Namespace) -> int:
    record = await _found(store, args.id)
    if record is None:
        return 1
    print(_show(record.info()))
    return 0


async def _update(store: KeyStore, args: argparse.Namespace) -> int:
    record = await _found(store, args.id)
    if record is None:
        return 1
    fields: dict[str, Any] = {}
    if args.name is not None:
        fields["name"] = args.name
    if args.owner is not None:
        fields["owner"] = args.owner
    if args.models is not None:
        fields["models"] = _models(args.models)
    limits = _limits(args, record.limits)
    if limits != record.limits:
        fields["limits"] = limits
    if args.expires_in_days is not None:
        fields["expires_ms"] = _expires(args)
    if args.never_expires:
        fields["expires_ms"] = None
    if args.disable or args.enable:
        fields["disabled"] = bool(args.disable)
    updated = await store.update(args.id, KeyChanges(**fields))
    if updated is None:
        print(f"no API key with id {args.id!r}", file=sys.stderr)
        return 1
    print(_show(updated.info()))
    return 0


async def _revoke(store: KeyStore, args: argparse.Namespace) -> int:
    if not await store.revoke(args.id):
        print(f"no API key with id {args.id!r}", file=sys.stderr)
        return 1
    print(f"revoked key {args.id}", file=sys.stderr)
    return 0


COMMANDS: dict[str, Callable[[KeyStore, argparse.Namespace], Awaitable[int]]] = {
    "create": _create, "list": _list, "show": _show_cmd, "update": _update, "revoke": _revoke,
}


def cmd_keys(args: argparse.Namespace) -> int:
    """Run one ``conduit keys`` command (``args.keys_command``)."""
    if args.keys_command in ("hash-admin", "hash-metrics"):
        return hash_admin()

    redis = connect(args.redis_url, cluster=args.redis_cluster, username=args.redis_username,
                    password=args.redis_password, **FAIL_FAST)

    async def work(redis: Any) -> int:
        try:
            return await COMMANDS[args.keys_command](KeyStore(redis, Keys(args.key_prefix)), args)
        except InvalidKeyField as exc:
            print(f"conduit keys {args.keys_command}: {exc}", file=sys.stderr)
            return 2

    return against_redis(f"keys {args.keys_command}", redis, args.redis_url, username=args.redis_username,
                         password=args.redis_password, work=work)


def against_redis(command: str, redis: Any, url: str, *, username: str, password: str,
                  work: Callable[[Any], Awaitable[int]]) -> int:
    """Run ``work(redis)`` once Redis has let this command in; a refused login or an unreachable
    Redis is one line on stderr naming what to fix, and exit status 1."""

    async def run() -> int:
        try:
            await first_contact(redis, url, username=username, password=password, fix=LOGIN_SETTINGS)
            return await work(redis)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except (LoginRefused, Unreachable) as exc:
        print(f"conduit {command}: {exc}", file=sys.stderr)
    except REDIS_ERRORS as exc:  # it went away mid-command
        print(f"conduit {command}: {unreachable_message(url, exc)}", file=sys.stderr)
    return 1


def hash_admin() -> int:
    """Read a credential (admin or metrics) from stdin (first line) and print its argon2id hash."""
    credential = sys.stdin.readline().rstrip("\r\n")
    if len(credential) < 16:
        print("conduit keys: give a credential of at least 16 characters on stdin", file=sys.stderr)
        return 2
    print(HASHER.hash(credential))
    return 0
