"""An engine's media intake: a job's media URLs checked against the media policy, and fetched
here when the policy lets them be, never by vLLM.

vLLM fetches the http(s) URL of an image part itself, from inside the network the engine runs in,
resolving the name when it connects and following redirects. The gateway refuses such URLs before
queueing (``engines.contract.media``), but an engine must be safe on its own too: a job may reach
its stream another way (an older or misconfigured gateway, anything else that can write to Redis).
So before the backend sees a chat job (or an ``input_tokens`` job: a chat body vLLM renders the same
way, images included), :class:`MediaGate`:

* rebuilds every content part from the fields vLLM reads for it (``text``, ``refusal``,
  ``image_url.url`` and ``detail``) and refuses any other kind of part: vLLM also reads URLs from
  ``video_url``, ``audio_url``, ``image_embeds``, a bare ``image_url`` string beside a ``uuid``...,
  none of which the gateway accepts, so no such field can ride along unchecked;
* passes ``data:`` URLs, refuses what the policy refuses (a 400 naming the part), and fetches the
  URLs it allows itself: the name resolved once, at connect time, every address it resolves to
  (and the one connected to) public, no redirect followed, no proxy, bounded in bytes and time (one
  limit for all of a job's fetches, within its deadline; a few at once per job);
  the image then goes to vLLM as a ``data:`` URL, so what was checked is what was fetched.

Kind-independent: the worker runs it on every job (``engines.running``); a kind without media
passes through untouched.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec

from engines.backend import JobRejected
from engines.contract.media import (
    INVALID_URL,
    MediaPolicy,
    MediaRefused,
    MediaTarget,
    check_address,
)
from engines.contract.messages import Job

#: A fetch that could not complete (unreachable, an error status, too large, not an image).
FETCH_FAILED = "media_fetch_failed"
#: A fetch answered with a redirect: not followed (its target was never checked).
REDIRECTED = "media_url_redirected"
#: A content part of a kind the gateway does not accept either.
UNSUPPORTED_PART = "unsupported_content_part"

#: Media fetches one engine runs at once, all jobs together.
MAX_FETCHES = 16
#: Media fetches one job runs at once: a request with many images takes a few of the engine's
#: slots, never all of them.
MAX_FETCHES_PER_JOB = 4


class _RefusedAddress(OSError):
    """A connection the socket factory refused (aiohttp wraps what it raises in its own errors)."""

    def __init__(self, refused: MediaRefused) -> None:
        super().__init__(refused.message)
        self.refused = refused


class MediaGate:
    """Checks, and where allowed fetches, the media of every job an engine runs.

    ``address_check`` judges each address a name resolves to and each one connected to (default:
    :func:`~engines.contract.media.check_address`, public addresses only).
    """

    def __init__(self, policy: MediaPolicy, *, max_bytes: int = 50 * 1024 * 1024, timeout_s: float = 10.0,
                 address_check: Callable[[str, str], None] = check_address) -> None:
        self.policy = policy
        #: Bytes one job's fetched media may total (OpenAI's bound on a request's payload: 50 MB).
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._address_check = address_check
        self._session: Any = None
        self._fetching = asyncio.Semaphore(MAX_FETCHES)

    async def prepare(self, job: Job) -> Job:
        """``job`` as its backend may see it: content parts rebuilt, allowed media fetched and
        inlined; raises :class:`~engines.backend.JobRejected` (400) for what the policy refuses."""
        if job.kind not in ("chat", "input_tokens"):  # an input_tokens body is a chat body: vLLM reads its parts
            return job
        try:
            body = json.loads(job.body)
        except ValueError:
            return job  # the backend answers a body it cannot read
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list):
            return job
        changed = False
        fetches: list[tuple[dict[str, Any], MediaTarget, str]] = []
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kept = _rebuilt(part, where)
                changed = changed or kept != part
                content[j] = kept
                if isinstance(kept, dict) and kept["type"] == "image_url":
                    target = self._check(kept["image_url"]["url"], f"{where}.image_url.url")
                    if target is not None:
                        fetches.append((kept["image_url"], target, f"{where}.image_url.url"))
        if fetches:
            budget = [self.max_bytes]
            timeout = self.timeout_s
            if job.deadline_ms:
                timeout = min(timeout, max(job.deadline_ms / 1000 - time.time(), 0.001))
            slots = asyncio.Semaphore(MAX_FETCHES_PER_JOB)
            tasks: list[asyncio.Task[str]] = []
            try:
                # One time limit for the whole step, waiting for a slot included.
                async with asyncio.timeout(timeout):
                    async with asyncio.TaskGroup() as group:  # the first refusal stops the others
                        tasks = [group.create_task(self._inline(target, param, budget, slots))
                                 for _, target, param in fetches]
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0] from None
            except TimeoutError:
                late = next((fetch for fetch, task in zip(fetches, tasks) if task.cancelled()), fetches[0])
                raise JobRejected(f"Fetching the request's images took longer than {timeout:.1f} s "
                                  f"(the image at {late[1].url} was not fetched in time).",
                                  code=FETCH_FAILED, param=late[2]) from None
            for (image_url, _, _), task in zip(fetches, tasks):
                image_url["url"] = task.result()
            changed = True
        return msgspec.structs.replace(job, body=json.dumps(body).encode()) if changed else job

    async def picture(self, url: str, param: str, deadline_ms: int = 0, budget: list[int] | None = None) -> bytes:
        """The picture at an http(s) ``url`` an edit names (its ``param``): checked against the policy and
        fetched as a chat job's images are (``budget``: the bytes the job may still fetch, shared by its
        fetches; the time within its deadline); raises :class:`JobRejected`."""
        target = self._check(url, param)
        if target is None:
            raise JobRejected(f"'{param}' is a data: URL; the gateway sends those as uploads.", code=INVALID_URL,
                              param=param)
        timeout = self.timeout_s
        if deadline_ms:
            timeout = min(timeout, max(deadline_ms / 1000 - time.time(), 0.001))
        try:
            async with asyncio.timeout(timeout), self._fetching:
                return (await self.fetch(target, budget))[0]
        except MediaRefused as exc:
            raise JobRejected(exc.message, code=exc.code, param=param) from None
        except TimeoutError:
            raise JobRejected(f"Fetching {target.url} took longer than {timeout:.1f} s.", code=FETCH_FAILED,
                              param=param) from None

    def _check(self, url: object, param: str) -> MediaTarget | None:
        if not isinstance(url, str):
            raise JobRejected("An image's `url` must be a string.", code=INVALID_URL, param=param)
        try:
            return self.policy.check(url)
        except MediaRefused as exc:
            raise JobRejected(exc.message, code=exc.code, param=param) from None

    async def _inline(self, target: MediaTarget, param: str, budget: list[int], slots: asyncio.Semaphore) -> str:
        """The image at ``target`` as a ``data:`` URL (``budget``: bytes the job may still fetch;
        ``slots``: the job's own, taken before one of the engine's)."""
        try:
            async with slots, self._fetching:
                data, media_type = await self.fetch(target, budget)
        except MediaRefused as exc:
            raise JobRejected(exc.message, code=exc.code, param=param) from None
        return f"data:{media_type};base64,{base64.b64encode(data).decode()}"

    async def fetch(self, target: MediaTarget, budget: list[int] | None = None) -> tuple[bytes, str]:
        """The image at ``target`` and its media type (``budget``: a one-item list of the bytes the
        job may still fetch, shared by its fetches); raises :class:`MediaRefused`."""
        import aiohttp

        budget = budget if budget is not None else [self.max_bytes]

        session = self._open()
        try:
            async with session.get(target.url, allow_redirects=False, headers={"Accept": "image/*"}) as resp:
                if 300 <= resp.status < 400:
                    raise MediaRefused(f"{target.url} answered with a redirect ({resp.status}), which is not "
                                       "followed: give the URL it points to.", REDIRECTED)
                if resp.status != 200:
                    raise MediaRefused(f"{target.url} answered {resp.status}.", FETCH_FAILED)
                media_type = resp.content_type
                if not media_type.startswith("image/"):
                    raise MediaRefused(f"{target.url} is not an image ({media_type}).", FETCH_FAILED)
                chunks = []
                while chunk := await resp.content.read(65_536):
                    budget[0] -= len(chunk)
                    if budget[0] < 0:
                        raise MediaRefused(f"The request's images are larger than {self.max_bytes} bytes in all.",
                                           FETCH_FAILED)
                    chunks.append(chunk)
                return b"".join(chunks), media_type
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, _RefusedAddress):
                raise exc.os_error.refused from None
            raise MediaRefused(f"{target.url} could not be reached ({exc.os_error}).", FETCH_FAILED) from None
        except aiohttp.ClientError as exc:
            raise MediaRefused(f"Fetching {target.url} failed ({exc}).", FETCH_FAILED) from None

    def _open(self) -> Any:
        """The engine's one HTTP session, made at the first fetch (a gate that fetches nothing never
        imports aiohttp): its resolver and its socket factory both refuse addresses that are not public."""
        if self._session is None:
            import aiohttp

            connector = aiohttp.TCPConnector(resolver=_PublicResolver(self._address_check),
                                              socket_factory=self._socket)
            # trust_env=False: no proxy from the environment (a proxy would resolve the name itself).
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                                  timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    def _socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """Every connection's socket: made only for an address the check allows (a literal
        address in a URL never reaches the resolver)."""
        family, type_, proto, _, address = addr_info
        try:
            self._address_check(str(address[0]), str(address[0]))
        except MediaRefused as exc:
            raise _RefusedAddress(exc) from None
        return socket.socket(family=family, type=type_, proto=proto)

    async def close(self) -> None:
        """Close the HTTP session, if one was opened."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def _rebuilt(part: object, where: str) -> object:
    """A content part as vLLM gets it: only the fields it reads for the part's type."""
    if isinstance(part, str):
        return part  # vLLM reads a bare string as text
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):  # type: ignore[union-attr]
        return {"type": "text", "text": part["text"]}  # type: ignore[index]
    if kind == "refusal" and isinstance(part.get("refusal"), str):  # type: ignore[union-attr]
        return {"type": "refusal", "refusal": part["refusal"]}  # type: ignore[index]
    if kind == "image_url":
        image = part.get("image_url")  # type: ignore[union-attr]
        if not isinstance(image, dict) or "url" not in image:
            raise JobRejected("An `image_url` part needs an `image_url` object with a `url`.", code=INVALID_URL,
                              param=f"{where}.image_url")
        kept = {"url": image["url"]}
        if isinstance(image.get("detail"), str):
            kept["detail"] = image["detail"]
        return {"type": "image_url", "image_url": kept}
    raise JobRejected(f"Content parts of type {kind!r} are not accepted here (text, image_url and refusal are).",
                      code=UNSUPPORTED_PART, param=f"{where}.type")


class _PublicResolver:
    """aiohttp's threaded resolver, refusing any name that resolves to an address the check refuses:
    the connection is made only to the addresses checked here, once."""

    def __init__(self, address_check: Callable[[str, str], None]) -> None:
        from aiohttp.resolver import ThreadedResolver

        self._inner = ThreadedResolver()
        self._check = address_check

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> Any:
        found = await self._inner.resolve(host, port, family)
        for result in found:
            self._check(host, result["host"])
        return found

    async def close(self) -> None:
        await self._inner.close()
