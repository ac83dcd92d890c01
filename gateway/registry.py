"""The gateway's view of live engines, refreshed from their heartbeats in Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Protocol

import msgspec
import redis.asyncio as aioredis

from engines.contract.lane import REDIS_ERRORS
from engines.contract.keys import Keys
from engines.contract.messages import Codec, EngineInfo
from gateway.common.bounds import ModelContext
from telemetry.instruments import GatewayMetrics

log = logging.getLogger("conduit.gateway")


class EngineRegistry:
    """Which models have a live engine now, read every ``refresh_s`` (not per request).

    An engine is live while its heartbeat entry has not expired. A model is *known* if it
    is configured or any engine served it before: a known model without a live engine is
    a 503 (try later), an unknown one a 404.
    """

    def __init__(self, redis: aioredis.Redis, keys: Keys, codec: Codec, *, refresh_s: float,
                 configured: list[str], metrics: GatewayMetrics | None = None) -> None:
        self._redis = redis
        self._keys = keys
        self._codec = codec
        self._refresh_s = refresh_s
        self._configured = set(configured)
        self.engines: dict[str, EngineInfo] = {}
        self.models: dict[str, list[EngineInfo]] = {}
        #: The live models every live engine of which announces cold (``EngineInfo.cold``: a
        #: serverless upstream scaled to zero; its requests wait out a wake: ``gateway.cold``).
        self.cold: set[str] = set()
        self._contexts: dict[str, ModelContext] = {}
        #: model -> (jobs in its stream: queued or running, jobs waiting in fair queueing's lists),
        #: for every known model, as :meth:`read_backlog` last found them (``conduit.queue.*``).
        self.backlog: dict[str, tuple[int, int]] = {}
        self._seen: set[str] = set()
        #: model -> the job kinds its live engines last announced (kept once they are gone: what a
        #: cold model's engines will run, as far as this process saw; ``may_run``).
        self._kinds: dict[str, frozenset[str]] = {}
        self.redis_ok = False
        self.refreshed = asyncio.Event()
        self.metrics = metrics or GatewayMetrics.noop()
        self._bad_entries: set[bytes] = set()
        #: Ends :meth:`run` (a cancellation landing inside a Redis call can be swallowed).
        self.closed = False

    def is_live(self, model: str) -> bool:
        return model in self.models

    def is_declared(self, model: str) -> bool:
        """Whether ``model`` is in the settings' ``models`` (cold while no engine serves it: ``gateway.cold``)."""
        return model in self._configured

    def declared(self) -> set[str]:
        """The settings' ``models``."""
        return set(self._configured)

    def is_known(self, model: str) -> bool:
        return model in self.models or model in self._configured or model in self._seen

    def known(self) -> set[str]:
        """Every model that is configured, served now, or was served before."""
        return self._configured | self._seen | set(self.models)

    def engine_counts(self) -> list[tuple[str, int, int]]:
        """(model, live engines, their slots) for every known model (0, 0: none serves it now)."""
        out = []
        for m in sorted(self.known()):
            engines = self.models.get(m, [])
            out.append((m, len(engines), sum(e.max_concurrency for e in engines)))
        return out

    def backlog_counts(self) -> list[tuple[str, int, int]]:
        """(model, jobs queued or running in its stream, jobs waiting) from the last refresh."""
        return [(m, q, w) for m, (q, w) in sorted(self.backlog.items())]

    def runs(self, model: str, kind: str) -> bool:
        """Whether a live engine of ``model`` announces the job kind ``kind`` (``EngineInfo.kinds``)."""
        return any(kind in e.kinds for e in self.models.get(model, ()))

    def takes_token_inputs(self, model: str) -> bool:
        """Whether every live engine of ``model`` takes token ids as its embedding input (``EngineInfo.
        token_inputs``: its operator said they are the model's own vocabulary's)."""
        engines = self.models.get(model, ())
        return bool(engines) and all(model in e.token_inputs for e in engines)

    def keeps_results(self, model: str) -> bool:
        """Whether every live engine of ``model`` writes result records (``EngineInfo.results``): a job
        any of them may take can be a background response's (True while none is live: a cold model's
        engines are this version's)."""
        return all(e.results for e in self.models.get(model, ()))

    def may_run(self, model: str, kind: str) -> bool:
        """Whether an engine of ``model``, live or not, may run ``kind`` jobs: those its live engines
        announce now, else those they announced when this process last saw one (any, if it never did)."""
        kinds = self._kinds.get(model)
        return kinds is None or kind in kinds

    def context(self, model: str) -> ModelContext:
        """What ``model``'s live engines announce (worked out at each refresh, not per request)."""
        return self._contexts.get(model, _NOTHING_KNOWN)

    def created(self, model: str) -> int:
        """When the longest-running engine of ``model`` started (seconds since epoch)."""
        return min((e.started_ms for e in self.models.get(model, [])), default=0) // 1000

    async def refresh(self) -> None:
        now = int(time.time() * 1000)
        ids = await self._redis.zrangebyscore(self._keys.engines, now, "+inf")
        infos = await self._redis.hmget(self._keys.engine_info, ids) if ids else []
        seen = await self._redis.hkeys(self._keys.models_seen)
        engines: dict[str, EngineInfo] = {}
        models: dict[str, list[EngineInfo]] = {}
        bad = 0
        for engine_id, raw in zip(ids, infos, strict=False):
            if raw is None:
                continue
            try:
                info = self._codec.decode_info(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                # One engine's entry (damaged, or from a version whose shape we cannot read)
                # must not blind us to the others.
                bad += 1
                if engine_id not in self._bad_entries:
                    log.error("ignoring unreadable registry entry of engine %r", engine_id)
                continue
            engines[info.id] = info
            for m in info.models:
                models.setdefault(m, []).append(info)
        self._bad_entries = {i for i, raw in zip(ids, infos, strict=False) if raw is not None
                             and i not in {e.encode() for e in engines}} if bad else set()
        if bad:
            self.metrics.skipped("registry_entry", bad)
        self.engines, self.models = engines, models
        self.cold = {m for m, infos in models.items() if all(m in e.cold for e in infos)}
        self._contexts = {m: _context(infos) for m, infos in models.items()}
        self._kinds.update({m: frozenset(k for e in infos for k in e.kinds) for m, infos in models.items()})
        # Accumulated, not replaced: a model served once stays "known" (503, not 404) even
        # if Redis loses its data.
        self._seen.update(s.decode() for s in seen)
        self._seen.update(models)
        self.redis_ok = True
        self.refreshed.set()

    async def read_backlog(self) -> None:
        """Each known model's stream length and waiting jobs, in one pipelined round trip (when
        metrics are scraped, not with every refresh: only the ``conduit.queue.*`` gauges read them)."""
        known = sorted(self.known())
        if not known:
            self.backlog = {}
            return
        pipe = self._redis.pipeline(transaction=False)
        for m in known:
            pipe.xlen(self._keys.jobs(m))
            pipe.hget(self._keys.fair_state(m), "waiting")
        replies = await pipe.execute()
        self.backlog = {m: (int(replies[2 * i] or 0), int(replies[2 * i + 1] or 0)) for i, m in enumerate(known)}

    async def _prune(self) -> None:
        # Engines that died without deregistering: drop their entries after a grace period.
        cutoff = int(time.time() * 1000) - 60_000
        dead = await self._redis.zrangebyscore(self._keys.engines, "-inf", cutoff)
        if dead:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrem(self._keys.engines, *dead)
            pipe.hdel(self._keys.engine_info, *dead)
            await pipe.execute()

    async def run(self) -> None:
        """Refresh until :attr:`closed`, outliving Redis outages and bad entries."""
        ticks = 0
        while not self.closed:
            try:
                await self.refresh()
                if ticks % 120 == 0:
                    await self._prune()
            except REDIS_ERRORS as exc:
                if self.redis_ok:
                    log.warning("cannot reach Redis: %s", exc)
                self.redis_ok = False
                self.metrics.background_error("engine-registry")
            except Exception:
                # Bad data must never end the refresh: a frozen view would send jobs to dead
                # engines and 404 new models for the rest of the process's life.
                log.exception("refreshing the engine registry failed; carrying on")
                self.metrics.background_error("engine-registry")
            ticks += 1
            await asyncio.sleep(self._refresh_s)


_NOTHING_KNOWN = ModelContext()


def _context(engines: list[EngineInfo]) -> ModelContext:
    """What a model's live engines announce: the smallest ``max_model_len`` and ``max_sequences`` and
    the largest ``max_chars_per_token`` among them (a request must fit whichever engine takes it);
    None where one of them does not say."""
    lens = [e.max_model_len for e in engines if e.max_model_len]
    chars = [e.max_chars_per_token for e in engines if e.max_chars_per_token]
    seqs = [e.max_sequences for e in engines if e.max_sequences]
    sizes = [e.embedding_size for e in engines if e.embedding_size]
    every = len(engines)
    return ModelContext(min(lens) if lens and len(lens) == every else None,
                        max(chars) if chars and len(chars) == every else None,
                        min(seqs) if seqs and len(seqs) == every else None, max(sizes) if sizes else None)


class _Counts(Protocol):
    def background_error(self, task: str) -> None: ...


async def outliving(task: str, step: Awaitable[None], metrics: _Counts) -> None:
    """Await one ``step`` of the background duty ``task``: a Redis outage is a warning, any other
    error a logged traceback, both counted under ``task``; either way the duty carries on."""
    try:
        await step
    except REDIS_ERRORS as exc:
        log.warning("%s: redis unavailable (%s)", task, exc)
        metrics.background_error(task)
    except Exception:
        log.exception("%s failed; carrying on", task)
        metrics.background_error(task)
