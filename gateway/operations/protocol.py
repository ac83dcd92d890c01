"""Conduit's own operational answers: liveness and readiness."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct


class Health(Struct):
    """``GET /health``: the process is alive."""

    status: Literal["ok"] = "ok"


class Readiness(Struct):
    """``GET /ready``: whether Redis answers and at least one engine is live."""

    status: Literal["ready", "not_ready"]
    redis: bool
    engines: int
    #: Models with a live engine now.
    models: list[str]
