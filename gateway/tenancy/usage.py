"""Usage accounting: requests, prompt and completion tokens and images per API key, per UTC day
and per model.

One Redis hash per key per day (``Keys.usage``), field ``<model>|<counter>``, incremented with
HINCRBY after the answer went out (the dispatcher sends them with the request's limit release,
pipelined with every other request's on the tenancy lane: no round trip of its own, none on the
response's path). Each day's hash expires ``usage_ttl_days`` after its last write. The same
numbers are exported as OpenTelemetry counters labelled by the key's name
(``conduit.gateway.key.*``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec

from engines.wire import Keys

COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "images")


class ModelUsage(msgspec.Struct):
    """One model's counts on one day."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0


class DayUsage(msgspec.Struct):
    """A key's usage on one UTC day, per model."""

    #: ``YYYY-MM-DD``.
    date: str
    models: dict[str, ModelUsage]


class KeyUsage(msgspec.Struct):
    """A key's usage over some days, newest first (days without usage included)."""

    key_id: str
    days: list[DayUsage]


def day_of(ts: float) -> str:
    """The UTC day of a Unix time, as used in key names (``yyyymmdd``)."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y%m%d")


class UsageLog:
    """Writes and reads the per-key daily usage counters."""

    def __init__(self, redis: Any, keys: Keys, *, ttl_days: int = 400) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_s = ttl_days * 86_400

    def commands(self, key_id: str, model: str, ts: float, *, prompt_tokens: int = 0, completion_tokens: int = 0,
                 images: int = 0) -> list[tuple[Any, ...]]:
        """The commands that count one finished request (for a lane's pipeline)."""
        key = self._keys.usage(key_id, day_of(ts))
        cmds: list[tuple[Any, ...]] = [("HINCRBY", key, f"{model}|requests", 1)]
        for name, n in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens),
                        ("images", images)):
            if n:
                cmds.append(("HINCRBY", key, f"{model}|{name}", n))
        cmds.append(("EXPIRE", key, self._ttl_s))
        return cmds

    async def read(self, key_id: str, days: int, now: float) -> KeyUsage:
        """``key_id``'s usage over the ``days`` UTC days ending with ``now``'s, newest first."""
        today = dt.datetime.fromtimestamp(now, dt.UTC).date()
        dates = [today - dt.timedelta(days=i) for i in range(days)]
        pipe = self._redis.pipeline(transaction=False)
        for d in dates:
            pipe.hgetall(self._keys.usage(key_id, d.strftime("%Y%m%d")))
        replies = await pipe.execute()
        out: list[DayUsage] = []
        for d, fields in zip(dates, replies, strict=True):
            models: dict[str, ModelUsage] = {}
            for field, value in fields.items():
                model, _, counter = field.decode().rpartition("|")
                if counter in COUNTERS:
                    m = models.setdefault(model, ModelUsage())
                    setattr(m, counter, int(value))
            out.append(DayUsage(date=d.isoformat(), models=dict(sorted(models.items()))))
        return KeyUsage(key_id=key_id, days=out)
