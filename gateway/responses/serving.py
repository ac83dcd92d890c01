"""``POST /v1/responses`` and ``POST /v1/responses/input_tokens``: the Responses API as endpoints of
the shared request flow (``gateway.flow``), over chat jobs (``gateway.responses.convert``).

A response with ``store`` true (the default) is kept once answered, streamed or not, completed or
incomplete (never a failed one), with its input items (``gateway.responses.store``); one with a
``previous_response_id`` is run on the conversation rebuilt from the store (``gateway.responses.chain``),
read before its cost is asked, so the admission counts the whole conversation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from msgspec import UNSET
from litestar import Request, Response, post
from litestar.response import Stream
from litestar.di import NamedDependency

from engines.contract.lane import REDIS_ERRORS
from engines.contract.messages import Delta, Done, Event, Failed, JobOptions, Started, Usage
from gateway.apispec import GENERATION, JOB_ERRORS, RATELIMIT, STORED, Operation, documented
from gateway.common.bounds import ModelContext
from gateway.common.decoding import RequestDecoder
from gateway.context import RequestContext
from gateway.dispatch import JobKind
from gateway.errors import ConduitError, InvalidRequest
from gateway.flow import SSE_HEADERS
from gateway.registry import EngineRegistry
from gateway.responses.records import ResultRecords, Watch
from gateway.responses.chain import continued, stored_items
from gateway.responses.convert import Translated, translate
from gateway.responses.objects import (
    FunctionToolEcho,
    InputTokens,
    ReasoningConfig,
    ResponseEvent,
    ResponseObject,
    TextConfig,
    ToolChoiceFunction,
)
from gateway.responses.output import ResponseOutput
from gateway.responses.protocol import ResponseRequest, TextFormatText
from gateway.responses.store import ResponseStore, store_unavailable
from gateway.run import JobRun, Restarted
from gateway.services import Services
from gateway.settings import RequestBounds

log = logging.getLogger("conduit.gateway")
_ENC = msgspec.json.Encoder()
_SINK = bytearray()  # a collected response's events go nowhere
_TEXT = TextFormatText()


class ResponsesDecoder:
    """Decodes and validates a Responses body, then translates it into its chat request."""

    __slots__ = ("_decoder", "_bounds", "_counting")

    def __init__(self, bounds: RequestBounds, *, counting: bool = False) -> None:
        self._decoder = RequestDecoder(ResponseRequest, bounds)
        self._bounds = bounds
        self._counting = counting

    def decode(self, body: bytes) -> Translated:
        return translate(self._decoder.decode(body), self._bounds, counting=self._counting)


def head_of(req: ResponseRequest, run: JobRun, created: int) -> ResponseObject:
    """The response as asked, before any output: what it echoes of the request."""
    fmt = req.text.format if req.text is not None else None
    choice: Any = req.tool_choice
    if isinstance(choice, dict):
        choice = ToolChoiceFunction(name=choice["name"])
    # (The tools were read by the translation: a function tool's name, description and parameters are
    # checked; a ``strict`` that is not a boolean was not used.)
    tools = [FunctionToolEcho(name=t["name"], description=t.get("description"), parameters=t.get("parameters"),
                              strict=t["strict"] if isinstance(t.get("strict"), bool) else None)
             for t in req.tools or ()]
    reasoning = req.reasoning
    return ResponseObject(
        id="resp_" + run.rid.partition("-")[2], created_at=created, status="in_progress",
        instructions=req.instructions, max_output_tokens=req.max_output_tokens, max_tool_calls=req.max_tool_calls,
        model=req.model, output=[], parallel_tool_calls=req.parallel_tool_calls is not False,
        previous_response_id=req.previous_response_id, prompt_cache_key=req.prompt_cache_key,
        reasoning=ReasoningConfig(reasoning.effort, reasoning.summary) if reasoning else ReasoningConfig(),
        safety_identifier=req.safety_identifier, temperature=1.0 if req.temperature is None else req.temperature,
        text=TextConfig(format=fmt if fmt is not None else _TEXT,
                        verbosity=req.text.verbosity or "medium" if req.text is not None else "medium"),
        tool_choice=choice if choice is not None else "auto", tools=tools, top_logprobs=req.top_logprobs or 0,
        top_p=1.0 if req.top_p is None else req.top_p, user=UNSET if req.user is None else req.user,
        metadata=req.metadata or {})


async def keep(store: ResponseStore, t: Translated, response: ResponseObject, encoded: bytes | None = None,
               items: bytes | None = None) -> bool:
    """Store ``response`` with its input items (the conversation's, for a chained one) when its request
    asked (``store`` true or absent), before its end reaches the client: a ``previous_response_id`` sent
    as soon as it arrives, to any replica, finds it. Not stored when Redis refuses, the record is too
    large or a ledger filled up since admission: the answer goes out all the same (False). (A response
    not stored is logged by the store, with why.)"""
    if items is None:
        items = _ENC.encode([*(t.prior or ()), *stored_items(t.request.input, t.prior or ())])
    try:
        return bool(await store.save(t.owner, t.model, response.id, encoded or _ENC.encode(response), items))
    except REDIS_ERRORS as exc:
        log.warning("a response could not be stored (it is answered, not kept): %s", exc)
        return False


class _Collected:
    """A non-streamed response: its output collected, then the whole ``Response`` (stored if asked)."""

    __slots__ = ("req", "output", "store")

    def __init__(self, req: Translated, store: ResponseStore | None) -> None:
        self.req = req
        self.output: ResponseOutput | None = None
        self.store = store

    def add(self, run: JobRun, event: Event | Restarted) -> None:
        if type(event) is Delta:
            if run.ttft is None:
                run.ttft = time.perf_counter() - run.started_at
            output = self.output
            if output is None:
                output = self.output = ResponseOutput(head_of(self.req.request, run, int(time.time())), stream=False)
            for c in event.choices:
                if c.index == 0:
                    output.add(c, _SINK)
        elif type(event) is Restarted and self.output is not None:
            self.output.restart()

    async def answer(self, run: JobRun, created: int, usage: Usage) -> Response[Any]:
        output = ResponseOutput(head_of(self.req.request, run, created), stream=False) if self.output is None else \
            self.output
        output.head.created_at = created
        response = output.finished(usage, _SINK)
        body = _ENC.encode(response)
        if self.store is not None:
            await keep(self.store, self.req, response, body)
        return Response(content=body, media_type="application/json")


class _Events:
    """A streamed response: OpenAI's events as the job's deltas arrive (``ResponseOutput``); stored if
    asked at its last event (``response.completed`` or ``response.incomplete``), before it is sent."""

    __slots__ = ("req", "created", "output", "store")

    def __init__(self, req: Translated, created: int, store: ResponseStore | None) -> None:
        self.req = req
        self.created = created
        self.output: ResponseOutput | None = None
        self.store = store

    def _output(self, run: JobRun) -> ResponseOutput:
        if self.output is None:
            self.output = ResponseOutput(head_of(self.req.request, run, self.created), stream=True)
        return self.output

    def add(self, run: JobRun, event: Event | Restarted, out: bytearray) -> None:
        output = self._output(run)
        if type(event) is Delta:
            if run.ttft is None:
                run.ttft = time.perf_counter() - run.started_at
            # The opening events go out with the first output, not before: until something the model
            # made is shown, a job its engine lost is run again elsewhere (``JobRun.shown``).
            output.begin(out)
            for c in event.choices:
                if c.index == 0:
                    output.add(c, out)
        elif type(event) is Restarted:
            output.restart()

    def done(self, run: JobRun, event: Any, out: bytearray) -> Any:
        response = self._output(run).finished(event.usage, out)
        return None if self.store is None else keep(self.store, self.req, response)

    def failed(self, run: JobRun, exc: ConduitError) -> bytes:
        return self._output(run).failed(exc)


class ResponsesEndpoint:
    """``/v1/responses`` as an endpoint of the shared flow: chat jobs, Responses objects, the store;
    background responses (``gateway.responses.background``) as jobs that outlive their request."""

    __slots__ = ("decoder", "store", "bounds", "records", "registry", "running")

    job_kind = JobKind("chat", "resp")
    read = None  # a JSON body

    def __init__(self, bounds: RequestBounds, store: ResponseStore, records: ResultRecords,
                 registry: EngineRegistry) -> None:
        self.decoder = ResponsesDecoder(bounds)
        self.store = store
        self.bounds = bounds
        self.records = records
        self.registry = registry
        #: This process's background runs (kept referenced until they end).
        self.running: set[asyncio.Task[None]] = set()

    async def resolve(self, req: Translated, ctx: RequestContext) -> Translated:
        """The request as it runs: its key's, and with its conversation when it continues one; 400
        ``response_store_full`` when it would be stored and its key's (or every key's) store is full."""
        owner = ctx.principal
        if req.request.store is not False and await self.store.full(owner):
            raise InvalidRequest("The response store is full for this API key: delete stored responses "
                                 "(DELETE /v1/responses/{id}), or send `store: false`.", param="store",
                                 code="response_store_full")
        if req.request.previous_response_id is not None:
            req = await continued(req, self.records, owner, self.bounds)
        req.owner = owner
        return req

    def _store(self, req: Translated) -> ResponseStore | None:
        return None if req.request.store is False else self.store

    def prepare(self, req: Translated, body: bytes, model: ModelContext, bounds: RequestBounds) -> bytes:
        return req.job_body(model, bounds)

    def collector(self, req: Translated, request: Request[Any, Any, Any]) -> _Collected:
        return _Collected(req, self._store(req))

    def writer(self, req: Translated, first: Event) -> _Events:
        created = first.created if isinstance(first, Started) and first.created else int(time.time())
        return _Events(req, created, self._store(req))

    async def stage(self, req: Translated, run: JobRun) -> Response[Any] | None:
        """A background response: its record made and its queued response stored, then its job
        submitted (a refusal is the request's answer: 429, 503), run here without the client, and
        ``queued`` answered at once (or its events streamed from its record)."""
        if not req.request.background:
            return None
        if not self.registry.keeps_results(req.model):
            raise InvalidRequest(f"The engines of the model `{req.model}` cannot run background responses (they do "
                                 "not keep result records: an older version); send `background: false`.",
                                 param="background", code="unsupported_value")
        head = msgspec.structs.replace(head_of(req.request, run, int(time.time())), background=True, status="queued")
        records = self.records
        # First: a key with too many streams open gets its 429 with nothing made or queued.
        events = records.open_stream(req.owner, head, -1) if req.stream else None
        try:
            return await self._detach(req, run, head, events)
        except BaseException:
            if events is not None:
                events.release()
            raise

    async def _detach(self, req: Translated, run: JobRun, head: ResponseObject, events: Watch | None) -> Response[Any]:
        records = self.records
        try:
            key = await records.make(head.id, run.job.deadline_ms)
        except REDIS_ERRORS as exc:
            log.warning("could not make a background response's record: %s", exc)
            raise store_unavailable() from None
        items = _ENC.encode([*(req.prior or ()), *stored_items(req.request.input, req.prior or ())])
        if not await keep(self.store, req, head, items=items):
            await records.drop(head.id)
            raise ConduitError("The background response could not be stored (its API key's stored responses are at "
                               "their limit, or the store is unavailable); delete stored responses or retry.",
                               status=503, code="response_store_unavailable")
        run.detached = True
        options = run.job.options or JobOptions()
        run.job = msgspec.structs.replace(run.job, options=msgspec.structs.replace(options, result=key), stream=False)
        try:
            await run.__aenter__()  # submitted: admission's refusals are this request's answer
        except BaseException:
            await self.store.delete(req.owner.key_id, head.id)
            await records.drop(head.id)
            raise
        task = asyncio.get_running_loop().create_task(self._run(req, run, head, items))
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        if events is not None:
            return Stream(events, media_type="text/event-stream", headers=SSE_HEADERS)
        return Response(content=_ENC.encode(head), media_type="application/json")

    async def _run(self, req: Translated, run: JobRun, head: ResponseObject, items: bytes) -> None:
        """Drive a background response's run to its end (its events reach the record from the engine),
        then store what its record renders."""
        try:
            try:
                while True:
                    event = await run.next()
                    if type(event) is Done:
                        run.usage = event.usage
                        break
                    if type(event) is Failed:
                        break
            except ConduitError as exc:  # its deadline, or its job lost too often: written to its record
                await self.records.end(head.id, run.job_id, exc)
                await self.records.cancel_job(run.job_id, run.job.deadline_ms)
            finally:
                run.close()
            await self.records.finish(req.owner, head, items)  # stored and charged, once it has ended
        except REDIS_ERRORS as exc:  # the next GET stores it
            log.warning("a background response's end could not be recorded here: %s", exc)
        except Exception:  # noqa: BLE001 - logged; the response ends in its record all the same
            log.exception("a background response's run failed here")


class _Count:
    """What the engine counted: an input tokens answer (charged as a request, never as tokens)."""

    __slots__ = ()

    def add(self, run: JobRun, event: Event | Restarted) -> None:
        return None

    async def answer(self, run: JobRun, created: int, usage: Usage) -> Response[Any]:
        return Response(content=_ENC.encode(InputTokens(input_tokens=usage.prompt_tokens)),
                        media_type="application/json")


class InputTokensEndpoint:
    """``/v1/responses/input_tokens``: the translated chat request's prompt, tokenized by an engine
    of the model that can (job kind ``input_tokens``; a model whose engines cannot is a 404)."""

    __slots__ = ("decoder", "records", "bounds")

    job_kind = JobKind("input_tokens", "tok", charges_tokens=False)
    read = None
    stage = None  # counted while the client waits

    def __init__(self, bounds: RequestBounds, records: ResultRecords) -> None:
        self.decoder = ResponsesDecoder(bounds, counting=True)
        self.records = records
        self.bounds = bounds

    async def resolve(self, req: Translated, ctx: RequestContext) -> Translated:
        """The input counted with its conversation when it continues one (as a response would run it)."""
        if req.request.previous_response_id is None:
            return req
        return await continued(req, self.records, ctx.principal, self.bounds)

    def prepare(self, req: Translated, body: bytes, model: ModelContext, bounds: RequestBounds) -> bytes:
        req.check_context(model)
        return msgspec.json.encode(req.body)

    def collector(self, req: Translated, request: Request[Any, Any, Any]) -> _Count:
        return _Count()

    def writer(self, req: Translated, first: Event) -> Any:
        raise AssertionError("input_tokens never streams")  # pragma: no cover: stream is forced off




#: The errors of a Responses request: a generation's, and the store's.
RESPONSE_ERRORS = {**JOB_ERRORS, 400: JOB_ERRORS[400] + " `previous_response_not_found` (param "
                   "`previous_response_id`: unknown, expired, deleted, another key's, or stored with `store: false`); "
                   "`response_store_full` (param `store`: the key's stored responses, or all keys', hold their cap).",
                   503: JOB_ERRORS[503] + " `response_store_unavailable`."}

CREATE_RESPONSE = Operation(
    "createResponse", "Create a model response", "Responses", {**RESPONSE_ERRORS, 422: "`unprocessable_entity`."},
    body=ResponseRequest, json=ResponseObject,
    stream=(("response.*", (ResponseEvent,)), ("error", (ResponseEvent,))),
    description="With `store` true (the default) the response is kept with its input items for `response_ttl_s` "
                "(30 days), within the bytes the API key may hold (`response_max_stored_bytes`; while it holds them, "
                "a 400 `response_store_full`), for `GET`/`DELETE /v1/responses/{response_id}` and `previous_response_id` on any "
                "replica; a failed response is never kept. `previous_response_id` runs on the previous "
                "response's input and output items, then `input` (its `instructions` are not carried over). "
                "`background: true` answers `queued` at once (its events then from its result record, on any "
                "replica: `GET`, `GET ?stream=true&starting_after=n`, `POST .../cancel`). Streamed as server-sent "
                "events when "
                "`stream` is true: `event: <type>` lines with OpenAI's response events, each with its "
                "`sequence_number`, ending with `response.completed`, `response.incomplete` or `response.failed`. "
                "Every request field's outcome: `openapi/responses-fields.md`.",
    parameters=GENERATION, ok_headers=RATELIMIT, replayed=STORED)

COUNT_INPUT_TOKENS = Operation(
    "getInputTokenCounts", "Count input tokens", "Responses", RESPONSE_ERRORS, body=ResponseRequest,
    json=InputTokens,
    description="The tokens the input (with `instructions` and `tools`) takes, counted by an engine of the model "
                "through its own chat template (with the conversation a `previous_response_id` continues). Charged as a request, never as tokens; an input certainly longer "
                "than the model's context is a 400 `context_length_exceeded`, as for a response.",
    parameters=GENERATION, ok_headers=RATELIMIT)


@post("/v1/responses", status_code=200, opt=documented(CREATE_RESPONSE))
async def create_response(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    """A model response, streamed as SSE events when ``stream`` is true."""
    return await services.flow.respond(request, services.responses)


@post("/v1/responses/input_tokens", status_code=200, opt=documented(COUNT_INPUT_TOKENS))
async def count_input_tokens(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    """The input's tokens, as the model's engine counts them."""
    return await services.flow.respond(request, services.input_tokens)
