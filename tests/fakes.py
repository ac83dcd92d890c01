"""A fake engine that speaks the wire contract on Redis with the plain redis-py client, and a fake
gateway's one job (:func:`run_job`).

No product engine code runs here: the fake plays a peer of a chosen protocol version (an
"older" engine that numbers nothing, a "newer" one with event types or fields this version
does not know) so tests can check that a real gateway reads it; :func:`run_job` plays a gateway
sending a job kind no endpoint sends yet, so tests can check that a real engine answers it. Only the key names come from
:class:`engines.contract.messages.Keys`, so they stay right when they change.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis
from redis.exceptions import ResponseError

from engines.contract.keys import ENGINE_GROUP, Keys


def now_ms() -> int:
    return int(time.time() * 1000)


def run_job(r: redis.Redis, prefix: str, model: str, kind: str, body: bytes,
            timeout: float = 60) -> list[dict[str, Any]]:
    """Queue one job of ``kind`` for ``model`` as a gateway would (on a reply stream of its own) and
    return the events engines answered it with, up to its final one (``f`` or ``e``)."""
    keys = Keys(prefix)
    reply_to = keys.replies(f"fake-gw-{os.urandom(4).hex()}")
    r.xadd(reply_to, {b"h": b"1"})  # a gateway's reply stream exists while it lives
    r.pexpire(reply_to, 60_000)
    job_id = f"fake-{os.urandom(6).hex()}"
    job = {"id": job_id, "kind": kind, "model": model, "body": body, "reply_to": reply_to,
           "deadline_ms": now_ms() + int(timeout * 1000), "created_ms": now_ms(), "stream": False}
    r.xadd(keys.jobs(model), {b"j": msgspec.msgpack.encode(job)})
    deadline = time.monotonic() + timeout
    try:
        while True:
            events = [e for _id, fields in r.xrange(reply_to) if b"e" in fields
                      for e in msgspec.msgpack.decode(fields[b"e"])]
            if events and events[-1]["t"] in ("f", "e"):
                assert all(e["job"] == job_id for e in events), events
                return events
            assert time.monotonic() < deadline, f"no final event for {job_id}: {events}"
            time.sleep(0.05)
    finally:
        r.delete(reply_to)


@dataclass
class FakeJob:
    """A job the fake read: its stream entry and its decoded msgpack map."""

    stream: str
    entry_id: bytes
    #: The job entry's ``j`` field as written, and decoded.
    raw: bytes
    body: dict[str, Any]
    #: Number of the last event written for it (protocol >= 2 numbers them from 1).
    seq: int = field(default=0)

    @property
    def id(self) -> str:
        return str(self.body["id"])

    @property
    def reply_to(self) -> str:
        return str(self.body["reply_to"])


class FakeEngine:
    """An engine of ``protocol`` serving ``model``: registers, heart-beats, reads jobs; the
    test writes the reply entries (``reply``) and acks (``ack``) itself.

    Use as a context manager: entering registers it and starts its heartbeat thread;
    leaving stops the heartbeat, deregisters it and closes its client.
    """

    def __init__(self, redis_url: str, prefix: str, model: str, *, protocol: int = 2,
                 engine_id: str | None = None, kinds: list[str] | None = None) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.keys = Keys(prefix)
        self.model = model
        self.protocol = protocol
        self.id = engine_id or f"fake-{os.urandom(4).hex()}"
        self.kinds = kinds or ["chat", "completion"]
        self.stream = self.keys.jobs(model)
        self.started_ms = now_ms()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def info(self) -> dict[str, Any]:
        """The engine-info map, with the fields EngineInfo had in ``protocol``'s version."""
        info: dict[str, Any] = {"id": self.id, "kind": "fake", "models": [self.model], "max_concurrency": 8,
                                "host": "fake-host", "pid": os.getpid(), "started_ms": self.started_ms}
        if self.protocol >= 2:
            info["protocol"] = self.protocol
            info["kinds"] = self.kinds
        return info

    def __enter__(self) -> FakeEngine:
        try:
            self.redis.xgroup_create(self.stream, ENGINE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.heartbeat()
        self._beat = threading.Thread(target=self._beat_loop, name=f"heartbeat-{self.id}", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.keys.engines, self.id)
        pipe.hdel(self.keys.engine_info, self.id)
        pipe.execute()
        self.redis.close()

    def heartbeat(self) -> None:
        now = now_ms()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.engines, {self.id: now + 5000})
        pipe.hset(self.keys.engine_info, self.id, msgspec.msgpack.encode(self.info()))
        pipe.hset(self.keys.models_seen, self.model, now)
        pipe.execute()

    def _beat_loop(self) -> None:
        while not self._stop.wait(1.0):
            self.heartbeat()

    def next_job(self, timeout: float = 10) -> FakeJob:
        """The next job queued for the model (raises TimeoutError after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.redis.xreadgroup(ENGINE_GROUP, self.id, {self.stream: ">"}, count=1, block=200)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    return FakeJob(self.stream, entry_id, fields[b"j"], msgspec.msgpack.decode(fields[b"j"]))
        raise TimeoutError(f"no job for {self.model!r} within {timeout}s")

    def reply(self, job: FakeJob, events: list[dict[str, Any]]) -> None:
        """Write ``events`` (maps with ``t`` and the event's fields) as one reply entry.

        ``job`` is filled in where missing; a protocol >= 2 engine numbers the events that do
        not carry a ``seq`` of their own, one sequence per job.
        """
        out = []
        for event in events:
            event = {"job": job.id, **event}
            if self.protocol >= 2 and "seq" not in event:
                job.seq += 1
                event["seq"] = job.seq
            out.append(event)
        self.redis.xadd(job.reply_to, {b"e": msgspec.msgpack.encode(out)})

    def ack(self, job: FakeJob) -> None:
        """XACK + XDEL the job (and, protocol >= 2, delete its job key, as engines do)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(job.stream, ENGINE_GROUP, job.entry_id)
        pipe.xdel(job.stream, job.entry_id)
        if self.protocol >= 2 and hasattr(self.keys, "job"):  # a Keys without job keys: protocol 1
            pipe.delete(self.keys.job(self.model, job.id))
        pipe.execute()
