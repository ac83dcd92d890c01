"""Steady load against gateways, every answer checked token by token.

The engines run with ``--numbered``: token i of every answer is ``"<i> "``, so an answer's
text shows whether a token went missing or came twice. Each client sends one chat
completion after another (streaming or not, at random) until told to stop; every request
ends as exactly one of:

* **completed**: 200, tokens ``0 .. N-1`` exactly once and in order, a ``finish_reason``,
  and for a stream the closing ``[DONE]``;
* **clean error**: OpenAI's error envelope, as a non-2xx body or as a stream's
  ``data: {"error": ...}`` event followed by ``[DONE]``, and whatever text came before it a
  gap-free prefix of the answer;
* **duplicated**: some token number appears twice (whatever else happened);
* **lost**: anything else: missing tokens in an answer claiming success, a gap before an
  error event, a client timeout, a dropped connection or a 5xx without envelope, or an
  answer (even a clean one) only at or after the request's deadline: a job the system lost
  shows up as the gateway's 504 at the deadline, which no client should have to wait for.

The load runs in a thread of its own (its own event loop), so a test injects faults with
plain blocking calls meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

COMPLETED = "completed"
CLEAN_ERROR = "clean error"
LOST = "lost"
DUPLICATED = "duplicated"
KINDS = (COMPLETED, CLEAN_ERROR, LOST, DUPLICATED)
LABELS = ("completed", "clean errors", "lost", "duplicated")
#: A client's pause after a request that did not complete.
RETRY_PAUSE_S = 0.25


@dataclass(slots=True)
class Answer:
    """What one request got back, as it arrived."""

    stream: bool
    status: int | None = None
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    error: object = None
    done: bool = False  # a stream's [DONE] arrived
    #: When a stream's first token arrived (seconds since the load began; None: none did).
    first: float | None = None


@dataclass(slots=True)
class Outcome:
    """One request's fate; times in seconds since the load began."""

    stream: bool
    url: str
    start: float
    end: float
    kind: str
    detail: str
    #: When a stream's first token arrived (None: none did, or not a stream).
    first: float | None = None


def _envelope(error: object) -> str | None:
    """The error's code if ``error`` is the inside of OpenAI's envelope, else None."""
    if isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str) \
            and "code" in error and "param" in error:
        return str(error["code"])
    return None


def judge(answer: Answer, failure: str | None, tokens: int) -> tuple[str, str]:
    """Classify one request (``failure``: what broke on the client side, if anything)."""
    try:
        numbers = [int(t) for t in "".join(answer.text).split()]
    except ValueError:
        return LOST, "text that is not numbered tokens"
    if len(set(numbers)) < len(numbers):
        return DUPLICATED, "a token came twice" + (f" ({failure})" if failure else "")
    prefix = numbers == list(range(len(numbers)))
    if failure is not None:
        return LOST, failure
    if answer.error is not None:
        code = _envelope(answer.error)
        if code is None:
            return LOST, f"{answer.status}: malformed error {answer.error!r}"[:200]
        if code == "deadline_exceeded":
            return LOST, f"{answer.status} deadline_exceeded"
        if not prefix:
            return LOST, f"gap before the error ({code})"
        if answer.stream and answer.status == 200 and not answer.done:
            return LOST, f"no [DONE] after the error ({code})"
        return CLEAN_ERROR, f"{answer.status} {code}"
    if answer.status != 200:
        return LOST, f"{answer.status} without an error envelope"
    if answer.stream and not answer.done:
        return LOST, "stream ended without [DONE]"
    if numbers != list(range(tokens)):
        return LOST, f"{len(numbers)} of {tokens} tokens" if prefix else "gap in the answer"
    if answer.finish_reason is None:
        return LOST, "no finish_reason"
    return COMPLETED, ""


class Report:
    """Every request of one load run."""

    def __init__(self, fault: str, outcomes: list[Outcome]) -> None:
        self.fault = fault
        self.outcomes = outcomes

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    def of(self, kind: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == kind]

    def open_at(self, t: float, url: str | None = None) -> list[Outcome]:
        """Requests in flight at ``t`` (sent to ``url``, if given)."""
        return [o for o in self.outcomes if o.start <= t < o.end and (url is None or o.url == url)]

    def table(self) -> str:
        """The fault's row, then why requests failed (how many, by reason, streaming or not)."""
        row = f"{self.fault:<34} {len(self.outcomes):>8} " + " ".join(
            f"{self.count(k):>{len(label)}}" for k, label in zip(KINDS, LABELS, strict=True))
        reasons = Counter((o.kind, o.detail, "stream" if o.stream else "non-stream")
                          for o in self.outcomes if o.kind != COMPLETED)
        lines = [row] + [f"    {n:>4} {kind}: {detail} ({how})"
                         for (kind, detail, how), n in sorted(reasons.items(), key=lambda x: -x[1])]
        return "\n".join(lines)

    @staticmethod
    def header() -> str:
        return f"{'fault':<34} {'requests':>8} " + " ".join(LABELS)

    def publish(self) -> None:
        """Print the table; also append it to ``$CONDUIT_FAULT_REPORT`` when that is set."""
        print(f"\n{self.header()}\n{self.table()}")
        path = os.environ.get("CONDUIT_FAULT_REPORT")
        if path:
            with open(path, "a") as f:
                if f.tell() == 0:
                    f.write(self.header() + "\n")
                f.write(self.table() + "\n")


class LoadThread:
    """``clients`` clients (:meth:`_main`, on an event loop in a thread of its own) sending
    requests from :meth:`start` until :meth:`stop`, which returns their :class:`Report`.

    ``deadline_s`` is the gateways' ``request_timeout_s``; a client gives up on a request
    after ``client_timeout_s`` (set it above the deadline).
    """

    def __init__(self, *, model: str, tokens: int, clients: int, deadline_s: float, client_timeout_s: float) -> None:
        self.model = model
        self.tokens = tokens
        self.clients = clients
        self.deadline_s = deadline_s
        self.client_timeout_s = client_timeout_s
        self.outcomes: list[Outcome] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._error: BaseException | None = None
        self.t0 = 0.0

    def now(self) -> float:
        """Seconds since the load began (the clock of every :class:`Outcome`)."""
        return time.monotonic() - self.t0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._thread.start()

    def stop(self, fault: str) -> Report:
        """Send no new requests; wait for those in flight (each ends by its client timeout)."""
        self._stopping.set()
        self._thread.join(timeout=self.client_timeout_s + 15)
        if self._thread.is_alive():
            raise AssertionError("the load driver did not stop: a client ignored its timeout")
        if self._error is not None:
            raise AssertionError(f"the load driver failed: {self._error!r}") from self._error
        return Report(fault, sorted(self.outcomes, key=lambda o: o.start))

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread by stop()
            self._error = exc

    async def _main(self) -> None:
        raise NotImplementedError


class Load(LoadThread):
    """``clients`` clients sending chat completions to ``urls`` (plain HTTP, no key) until :meth:`stop`."""

    def __init__(self, urls: list[str], *, model: str, tokens: int, clients: int, deadline_s: float,
                 client_timeout_s: float) -> None:
        super().__init__(model=model, tokens=tokens, clients=clients, deadline_s=deadline_s,
                         client_timeout_s=client_timeout_s)
        self.targets = list(urls)
        #: Streams whose output began and that have not ended yet (written by the load's thread only).
        self.mid_stream = 0

    def wait_mid_stream(self, streams: int, timeout: float) -> int:
        """Wait until at least ``streams`` streams are mid-answer (output began, not ended); how many are."""
        deadline = time.monotonic() + timeout
        while self.mid_stream < streams and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.mid_stream

    def drop_target(self, url: str) -> None:
        """Send no new requests to ``url`` (as a load balancer drains a gateway it stops)."""
        self.targets.remove(url)

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.clients * 2, max_keepalive_connections=self.clients * 2)
        async with httpx.AsyncClient(timeout=self.client_timeout_s, limits=limits) as client:
            await asyncio.gather(*(self._client(client, random.Random(i)) for i in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        while not self._stopping.is_set():
            url = rng.choice(self.targets)
            stream = rng.random() < 0.5
            answer = Answer(stream=stream)
            failure: str | None = None
            start = self.now()
            try:
                async with asyncio.timeout(self.client_timeout_s):
                    await self._request(client, url, answer)
            except TimeoutError:
                failure = f"client timeout ({self.client_timeout_s:g}s)"
            except httpx.HTTPError as exc:
                failure = f"{type(exc).__name__} without an error envelope"
            finally:
                if answer.first is not None:
                    self.mid_stream -= 1
            end = self.now()
            kind, detail = judge(answer, failure, self.tokens)
            if kind in (COMPLETED, CLEAN_ERROR) and end - start >= self.deadline_s:
                kind, detail = LOST, f"answered after its deadline ({detail or kind})"
            self.outcomes.append(Outcome(stream, url, start, end, kind, detail, answer.first))
            if kind != COMPLETED:
                # As a client told "retry shortly" would: no tight loop of instant refusals.
                await asyncio.sleep(RETRY_PAUSE_S)

    async def _request(self, client: httpx.AsyncClient, url: str, answer: Answer) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "count"}], "stream": answer.stream}
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            answer.status = r.status_code
            if not answer.stream or r.status_code != 200:
                _read_body(answer, await r.aread())
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    answer.done = True
                    return
                event = json.loads(data)
                if "error" in event:
                    answer.error = event["error"]
                    continue
                for choice in event.get("choices", []):
                    if choice["delta"].get("content"):
                        if answer.first is None:
                            answer.first = self.now()
                            self.mid_stream += 1
                        answer.text.append(choice["delta"]["content"])
                    if choice.get("finish_reason"):
                        answer.finish_reason = choice["finish_reason"]


def _read_body(answer: Answer, raw: bytes) -> None:
    try:
        body = json.loads(raw)
    except ValueError:
        answer.error = raw[:200].decode(errors="replace") if answer.status != 200 else None
        return
    if not isinstance(body, dict):
        return
    if "error" in body or answer.status != 200:
        answer.error = body.get("error", body)
        return
    for choice in body.get("choices", []):
        answer.text.append(choice["message"].get("content") or "")
        answer.finish_reason = choice.get("finish_reason")
