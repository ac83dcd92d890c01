"""Usage accounting: requests, prompt and completion tokens, images and the bytes of stored responses
per API key, per UTC day and per model.

One Redis hash per key per day (``Keys.usage``), field ``<model>|<counter>``. A finished
request only adds its counts to a table in memory (:meth:`UsageLog.add`, no I/O); every
``flush_s`` (1 s) the table is written with one HINCRBY per key, day, model and counter, and
exported as OpenTelemetry counters labelled by the key's name (``conduit.gateway.key.*``), so
a key's thousand requests a second cost a handful of commands, not thousands. A gateway that
dies loses at most its last second of counts; a write Redis refuses is kept for the next flush.
Each day's hash expires ``usage_ttl_days`` after its last write.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any

import msgspec

from engines.contract.keys import Keys

COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "images", "stored_bytes")

log = logging.getLogger("conduit.gateway")


class ModelUsage(msgspec.Struct):
    """One model's counts on one day."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    #: Bytes of responses stored (``store``; ``gateway.responses.store``): counted when written, never
    #: given back by a deletion or an expiry.
    stored_bytes: int = 0


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

    def __init__(self, redis: Any, keys: Keys, *, ttl_days: int = 400, metrics: Any = None,
                 flush_s: float = 1.0) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_s = ttl_days * 86_400
        self._metrics = metrics
        self.flush_s = flush_s
        #: (key id, key name, day, model) -> [requests, prompt tokens, completion tokens, images, stored bytes]
        self._pending: dict[tuple[str, str, str, str], list[int]] = {}
        self._day = ("", 0.0)  # (yyyymmdd, the Unix time its day ends): day_of() once a day
        self.closed = False

    def add(self, key_id: str, key_name: str, model: str, *, prompt_tokens: int = 0, completion_tokens: int = 0,
            images: int = 0) -> None:
        """Count one finished request (in memory; written by the next flush)."""
        counts = self._counts(key_id, key_name, model)
        counts[0] += 1
        counts[1] += prompt_tokens
        counts[2] += completion_tokens
        counts[3] += images

    def stored(self, key_id: str, key_name: str, model: str, size: int) -> None:
        """Count the bytes of one stored response (in memory; written by the next flush)."""
        self._counts(key_id, key_name, model)[4] += size

    def _counts(self, key_id: str, key_name: str, model: str) -> list[int]:
        day, ends = self._day
        now = time.time()
        if now >= ends:
            day = day_of(now)
            ends = (now // 86_400 + 1) * 86_400
            self._day = (day, ends)
        counts = self._pending.get((key_id, key_name, day, model))
        if counts is None:
            counts = self._pending[(key_id, key_name, day, model)] = [0, 0, 0, 0, 0]
        return counts

    async def flush(self) -> None:
        """Write what was counted since the last flush (kept for the next one if Redis refuses)."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        pipe = self._redis.pipeline(transaction=False)
        for (key_id, _name, day, model), counts in pending.items():
            key = self._keys.usage(key_id, day)
            for counter, n in zip(COUNTERS, counts, strict=True):
                if n:
                    pipe.hincrby(key, f"{model}|{counter}", n)
            pipe.expire(key, self._ttl_s)
        try:
            await pipe.execute()
        except Exception:
            for k, counts in pending.items():  # back in front of what came meanwhile
                mine = self._pending.setdefault(k, [0, 0, 0, 0, 0])
                for i, n in enumerate(counts):
                    mine[i] += n
            raise
        if self._metrics is not None:
            for (_key_id, name, _day, model), (requests, prompt, completion, images, _stored) in pending.items():
                self._metrics.key_used(name, model, requests, prompt, completion, images)

    async def run(self) -> None:
        """Flush every ``flush_s`` until closed (a failed flush is retried by the next)."""
        while not self.closed:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - counted, kept, retried
                log.warning("writing usage failed (%s); kept for the next flush", exc)
                if self._metrics is not None:
                    self._metrics.background_error("usage-flush")

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
