"""Background responses (``background: true``): queued jobs whose events any replica can read.

A background response is answered ``queued`` at once; its job runs through the normal queue (the
key's limits and fair queueing, reclaimed by another engine when its engine dies: run again, never
lost). The job names a **result record** (``JobOptions.result``, ``Keys.result``): a stream the
gateway makes before queueing it, to which the engine appends every event of the job, exactly as to
the accepting gateway's reply stream. Everything a client sees of the response is *rendered* from
that record (:class:`Replay`), by whichever replica it asks, the same way every time: ``GET`` (its
state now), a stream (``stream: true``, or ``GET ?stream=true&starting_after=n`` after a disconnect:
the same events with the same ``sequence_number``\\ s, so a resumed stream has no gap and no
duplicate), and the final stored response (``gateway.responses.store``), saved by the first replica
that renders it finished. The accepting gateway drives the job's run (its deadline, a job Redis lost
submitted again, its usage settled), but nothing depends on it living: if it dies, the engine still
finishes the job into the record, and the next ``GET`` stores the result.

The gateway writes to the record the job's deadline (its first entry), each resubmission's job id
(a ``job`` entry: the job Redis lost, queued again), and a job's end that no engine reports: a
cancellation (``POST /v1/responses/{id}/cancel``), a run that failed (its deadline, a job lost too
often), a response overdue (``gateway.responses.records``), as a ``Failed`` of attempt 0, which ends
the response whatever follows. Making, reading and storing records: ``gateway.responses.records``.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from msgspec import UNSET

from engines.contract.messages import Codec, Delta, Done, Event, Failed, Generated, Started, Unknown, Usage
from gateway.errors import ConduitError
from gateway.responses.objects import ResponseObject
from gateway.responses.output import ResponseOutput

log = logging.getLogger("conduit.gateway")

#: A response's status once it ended (nothing changes it after).
FINAL = frozenset(("completed", "incomplete", "failed", "cancelled"))
_CODEC = Codec()
_HEAD = msgspec.json.Decoder(ResponseObject)


def job_of(response_id: str) -> str:
    """The first job id of a response (``resp_<hex>`` is job ``resp-<hex>``)."""
    return "resp-" + response_id.partition("_")[2]


def head_of_record(raw: bytes) -> ResponseObject:
    return _HEAD.decode(raw)


def queued(head: ResponseObject) -> ResponseObject:
    """The response as it was queued (a stored one may have ended since): what its rendering starts from."""
    return msgspec.structs.replace(head, status="queued", output=[], completed_at=None, error=None,
                                   incomplete_details=None, usage=UNSET)


class Replay:
    """One background response rendered from its result record's entries, in order.

    The exactly-once rules of a run (``gateway.run``) apply: an event of a job given up (an earlier
    submission) or of an attempt given up is dropped, a repeated number is dropped, a new attempt (an
    engine died, another runs the job from scratch) or a new submission (announced in the record by
    the gateway that made it: a ``job`` entry) starts the output over, and a gap in the numbering
    (events the record lost) fails it ``output_lost``. The first final event ends it; a gateway's
    ``Failed`` (attempt 0) ends it whatever came before.
    """

    __slots__ = ("output", "job", "announced", "given_up", "attempt", "seq", "started", "final", "usage",
                 "deadline_ms")

    def __init__(self, head: ResponseObject, *, stream: bool) -> None:
        self.output = ResponseOutput(msgspec.structs.replace(queued(head), status="in_progress"), stream=stream)
        self.output.begun = True  # the opening events are this class's: created and queued, then in_progress
        self.job = job_of(head.id)
        #: Job ids the gateway announced (resubmissions), and those given up.
        self.announced: set[str] = set()
        self.given_up: set[str] = set()
        self.attempt, self.seq = 1, 0
        self.started = False
        #: The response once it ended (None: still queued or in progress), and what it is charged: its
        #: final usage, or what the answering attempt generated so far (``Delta.total``: cancelled, failed).
        self.final: ResponseObject | None = None
        self.usage: Usage | Generated = Usage()
        #: The job's deadline (epoch ms), from the record's first entry (0: not read).
        self.deadline_ms = 0

    def open(self, head: ResponseObject, out: bytearray) -> None:
        """A stream's first events: ``response.created`` and ``response.queued``."""
        start = queued(head)
        self.output._event(out, "response.created", {"response": start})
        self.output._event(out, "response.queued", {"response": start})

    def entry(self, entry_id: bytes, fields: Any, out: bytearray) -> None:
        """Render one entry of the record: the gateway's (its deadline, a resubmission) or an engine's."""
        if not isinstance(fields, dict):
            fields = dict(zip(fields[::2], fields[1::2], strict=False))
        blob = fields.get(b"e")
        if blob is not None:
            self.feed(entry_id, _decoded(blob), out)
        elif b"job" in fields:
            self.announced.add(fields[b"job"].decode())
        elif b"deadline" in fields:
            self.deadline_ms = int(fields[b"deadline"])

    def feed(self, entry_id: bytes, events: list[Event | Unknown], out: bytearray) -> None:
        """Render one entry's events (``entry_id``: its time, a finished response's ``completed_at``)."""
        for event in events:
            if self.final is not None:
                return
            if not self._admit(event, out):
                continue
            kind = type(event)
            if kind is Started:
                self._in_progress(out)
            elif kind is Delta:
                self._in_progress(out)
                if event.total is not None:  # type: ignore[union-attr]
                    self.usage = event.total  # type: ignore[union-attr]
                for c in event.choices:  # type: ignore[union-attr]
                    if c.index == 0:
                        self.output.add(c, out)
            elif kind is Done:
                self._in_progress(out)
                self.usage = event.usage  # type: ignore[union-attr]
                self.final = self.output.finished(event.usage, out, now=int(entry_id.split(b"-")[0]) // 1000)  # type: ignore[union-attr]
            elif kind is Failed:
                self.fail(event, out)  # type: ignore[arg-type]

    def fail(self, event: Failed, out: bytearray) -> None:
        if event.code == "cancelled":
            # (OpenAI's stream has no event for it: a cancelled response's stream ends.)
            self.final = msgspec.structs.replace(self.output.head, status="cancelled",
                                                 output=self.output.so_far("incomplete"))
        else:
            self.final = self.output.failure(ConduitError(event.message, status=event.status, code=event.code,
                                                          param=event.param), out)

    def _in_progress(self, out: bytearray) -> None:
        if not self.started:
            self.started = True
            self.output._event(out, "response.in_progress", {"response": self.output.head})

    def _admit(self, event: Event | Unknown, out: bytearray) -> bool:
        if event.attempt == 0:  # a gateway's: the end
            return isinstance(event, Failed)
        if event.job != self.job:
            if event.job in self.given_up or event.job not in self.announced:
                return False  # an earlier submission's, or no submission of this response
            self.given_up.add(self.job)  # submitted again (Redis lost the job): from scratch
            self.job, self.attempt, self.seq = event.job, event.attempt, 0
            self._restart()
        elif event.attempt != self.attempt:
            if event.attempt < self.attempt:
                return False
            self.attempt, self.seq = event.attempt, 0
            self._restart()  # another engine runs it from scratch
        if event.seq:
            if event.seq <= self.seq:
                return False
            if event.seq != self.seq + 1:
                self.fail(GAP, out)
                return False
            self.seq = event.seq
        return not isinstance(event, Unknown)

    def _restart(self) -> None:
        self.output.restart()
        self.usage = Usage()  # only the answering attempt is charged

    def now(self) -> ResponseObject:
        """The response as it stands."""
        if self.final is not None:
            return self.final
        return msgspec.structs.replace(self.output.head, status="in_progress" if self.started else "queued",
                                       output=self.output.so_far("in_progress"))


GAP = Failed(job="", message="Part of this response's output was lost from its record; create it again.",
             code="output_lost", status=502, attempt=0)
LOST = Failed(job="", message="The background response's job was lost and could not be run again; create it "
                              "again.", code="job_lost", status=503, attempt=0)


def _decoded(blob: bytes) -> list[Event | Unknown]:
    try:
        return _CODEC.decode_events(blob)[0]
    except Exception:  # noqa: BLE001 - a damaged entry is skipped, as the reply router does
        log.error("skipping an undecodable result record entry")
        return []
