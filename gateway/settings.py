"""The gateway's settings: one object per process, built at the entrypoint and passed down."""

from __future__ import annotations

import os
import socket
from typing import Any

import msgspec

ENV_PREFIX = "CONDUIT_"


class GatewaySettings(msgspec.Struct, kw_only=True):
    """Everything a gateway process is configured with.

    Built from a TOML/JSON file and/or ``CONDUIT_*`` environment variables by
    :meth:`from_env`; environment variables win.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "conduit"
    #: Names this process's reply stream; must be unique among live gateway processes.
    gateway_id: str = ""
    #: A request not finished after this many seconds gets a 504 and is cancelled.
    request_timeout_s: float = 600.0
    #: Bodies larger than this get a 413.
    max_body_bytes: int = 8 * 1024 * 1024
    #: Jobs queued or running per model above which new requests get a 429.
    max_backlog: int = 1024
    #: Retry-After sent with a 429.
    retry_after_s: int = 1
    #: How often the live-engine view is refreshed from Redis.
    registry_refresh_s: float = 0.5
    #: How often waiting requests check that Redis still holds their job (a job found gone
    #: twice in a row, with no answer, is submitted again or failed).
    job_check_s: float = 1.0
    #: How often one request's job may be submitted again after Redis lost it.
    max_resubmits: int = 2
    #: Models a client may name even while no engine serves them (they get 503, not 404).
    models: list[str] = []
    #: HTTP workers (processes) for ``conduit gateway``.
    workers: int = 1
    log_level: str = "info"

    def with_gateway_id(self) -> GatewaySettings:
        """A copy with a unique ``gateway_id`` (each worker process needs its own)."""
        gid = self.gateway_id or "gw"
        return msgspec.structs.replace(self, gateway_id=f"{gid}-{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, file: str | None = None, **overrides: Any) -> GatewaySettings:
        """Settings from an optional file, then ``CONDUIT_*`` variables, then explicit overrides."""
        return load_settings(cls, environ, file, overrides)


def load_settings(cls: type[Any], environ: dict[str, str] | None, file: str | None, overrides: dict[str, Any]) -> Any:
    """Build a settings Struct from file < environment < overrides, validating types."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if file:
        with open(file, "rb") as f:
            data = f.read()
        if file.endswith(".toml"):
            import tomllib

            raw.update(tomllib.loads(data.decode()))
        else:
            raw.update(msgspec.json.decode(data))
    for field in msgspec.structs.fields(cls):
        value = env.get(ENV_PREFIX + field.name.upper())
        if value is None:
            continue
        raw[field.name] = value.split(",") if field.type == list[str] else value
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return msgspec.convert(raw, cls, strict=False)
