"""``GET`` and ``DELETE /v1/responses/{response_id}`` and ``GET /v1/responses/{response_id}/input_items``:
the stored responses of the request's API key (``gateway.responses.store``), on any gateway replica.

A key sees only its own: another key's id is the same 404 as an unknown one (the record's name holds
the key's id, so there is nothing of another key's to find, and no answer tells one apart).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, delete, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Stream

from engines.contract.lane import REDIS_ERRORS
from gateway.apispec import AUTH_ERRORS, REQUEST_ID, Operation, documented
from gateway.common.routing import get_and_head
from gateway.context import principal_of
from gateway.errors import ConduitError, InvalidRequest, NotFound
from gateway.flow import SSE_HEADERS
from gateway.responses.objects import ResponseEvent, ResponseObject
from gateway.responses.background import FINAL, head_of_record
from gateway.responses.store import StoredRecord, store_unavailable
from gateway.tenancy.principal import Principal
from gateway.services import Services

log = logging.getLogger("conduit.gateway")
_JSON = msgspec.json.Encoder()
_ITEMS = msgspec.json.Decoder(list[dict[str, Any]])


class DeletedResponse(msgspec.Struct):
    """``DELETE /v1/responses/{response_id}``'s answer (OpenAI's example of it: the spec gives no schema)."""

    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class ResponseItemList(msgspec.Struct):
    """OpenAI's ``ResponseItemList``: one page of a response's input items (``ItemResource``s)."""

    data: list[dict[str, Any]]
    #: The ids of the page's first and last items (null on an empty page).
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


class ItemsQuery(msgspec.Struct, forbid_unknown_fields=False):
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": description}


_RESPONSE_ID = _path("response_id", "The response's id (`resp_...`), as its creation answered it.")
_ERRORS = {**AUTH_ERRORS, 404: "`not_found`: no stored response of this API key has this id (unknown, expired, "
                               "deleted, another key's, or created with `store: false`).",
           500: "`internal_error`.", 503: AUTH_ERRORS[503] + " `response_store_unavailable`."}
RETRIEVE_RESPONSE = Operation(
    "getResponse", "A stored model response", "Responses",
    {**_ERRORS, 400: "`invalid_value` (`stream` for a response that is not a background one, or whose events are no "
                     "longer kept; a `starting_after` that is no integer)."}, json=ResponseObject,
    stream=(("response.*", (ResponseEvent,)), ("error", (ResponseEvent,))),
    parameters=(_RESPONSE_ID,
                {"name": "stream", "in": "query", "required": False, "schema": {"type": "boolean", "default": False},
                 "description": "A background response's events, as server-sent events, to its end."},
                {"name": "starting_after", "in": "query", "required": False, "schema": {"type": "integer"},
                 "description": "With `stream`: the events after the one with this `sequence_number` (resuming a "
                                "stream after a disconnect: no gap, no event twice)."}, REQUEST_ID),
    description="The response as it was answered (completed or incomplete), kept `response_ttl_s` (30 days) after "
                "its creation with `store` true (the default); a background response as it stands (`queued`, "
                "`in_progress`, then how it ended), from any replica. Its events can be streamed again, from the "
                "start or after `starting_after`, for `response_events_keep_s` (10 minutes) once it has ended.")
CANCEL_RESPONSE = Operation(
    "cancelResponse", "Cancel a background response", "Responses",
    {**_ERRORS, 400: "`invalid_value`: the response is not a background one."}, json=ResponseObject,
    parameters=(_RESPONSE_ID, REQUEST_ID),
    description="Its job is dropped by the engines, queued or running, and the response ends `cancelled` with the "
                "output made so far (on every replica at once; its stream ends). A response that had already ended "
                "is answered as it ended.")
DELETE_RESPONSE = Operation(
    "deleteResponse", "Delete a stored model response", "Responses", _ERRORS, json=DeletedResponse,
    parameters=(_RESPONSE_ID, REQUEST_ID),
    description="Deleted at once for every replica: it can no longer be retrieved or continued. (A response "
                "continuing it holds its own copy of the conversation and stays whole.)")
LIST_INPUT_ITEMS = Operation(
    "listInputItems", "A stored response's input items", "Responses",
    {**_ERRORS, 400: "`invalid_value` (`limit` outside 1-100, `order` not `asc` or `desc`, an `after` that is "
                     "no item of this response)."}, json=ResponseItemList,
    parameters=(_RESPONSE_ID,
                {"name": "limit", "in": "query", "required": False, "description": "Items per page, 1 to 100.",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                {"name": "order", "in": "query", "required": False, "description": "`asc`: first item first.",
                 "schema": {"type": "string", "enum": ["asc", "desc"], "default": "desc"}},
                {"name": "after", "in": "query", "required": False, "schema": {"type": "string"},
                 "description": "An item's id: the page starts after it (in `order`)."}, REQUEST_ID),
    description="Every item the model saw, each with its id (those sent without one got one when stored: "
                "`msg_`, `fc_`, `fco_`): for a response with a `previous_response_id`, the conversation's "
                "(the previous responses' input and output items), then its own `input`.")


async def _record(services: Services, request: Request[Any, Any, Any], response_id: str) -> StoredRecord:
    record = await services.response_store.load(principal_of(request.scope).key_id, response_id)
    if record is None:
        raise NotFound(f"Response with id '{response_id}' not found.")
    return record


def _starting_after(request: Request[Any, Any, Any]) -> int | None:
    """``stream`` and ``starting_after`` (None: not streamed; -1: from the first event)."""
    if request.query_params.get("stream", "false").lower() in ("false", "0"):
        if "starting_after" in request.query_params:
            raise InvalidRequest("`starting_after` is only allowed when `stream` is true.", param="starting_after")
        return None
    raw = request.query_params.get("starting_after", "-1")
    try:
        after = int(raw)
    except ValueError:
        after = -2
    if not -1 <= after < 2**31:
        raise InvalidRequest(f"Invalid 'starting_after': {raw!r}; expected an event's sequence_number (an integer, "
                             "0 or more).", param="starting_after", code="invalid_value")
    return after


async def current(services: Services, owner: Principal, record: StoredRecord) -> bytes:
    """A stored response as it stands (a background one rendered from its result record)."""
    try:
        return await services.result_records.current(owner, record)
    except REDIS_ERRORS as exc:
        log.warning("a background response's record cannot be read: %s", exc)
        raise store_unavailable() from None


@get_and_head("/v1/responses/{response_id:str}", opt=documented(RETRIEVE_RESPONSE))
async def retrieve_response(response_id: FromPath[str], request: Request[Any, Any, Any],
                            services: NamedDependency[Services]) -> Response[Any]:
    """One stored response of the request's API key; a background one's events with ``stream``."""
    after = _starting_after(request)
    record = await _record(services, request, response_id)
    if after is None:
        return Response(await current(services, principal_of(request.scope), record), media_type="application/json")
    head = head_of_record(record.response)
    if not head.background:
        raise InvalidRequest("Only a background response's events can be streamed again (this response was "
                             "answered on its request's connection).", param="stream", code="invalid_value")
    records = services.result_records
    try:
        kept = await records.kept(head.id)
    except REDIS_ERRORS as exc:
        log.warning("a background response's record cannot be read: %s", exc)
        raise store_unavailable() from None
    if not kept:
        raise InvalidRequest(f"The events of response '{response_id}' are no longer kept (a background response's "
                             "are kept `response_events_keep_s` once it has ended); retrieve it without `stream`.",
                             param="stream", code="invalid_value")
    return Stream(records.open_stream(principal_of(request.scope), head, after), media_type="text/event-stream",
                  headers=SSE_HEADERS)


@post("/v1/responses/{response_id:str}/cancel", status_code=200, opt=documented(CANCEL_RESPONSE))
async def cancel_response(response_id: FromPath[str], request: Request[Any, Any, Any],
                          services: NamedDependency[Services]) -> Response[bytes]:
    """Cancel a background response of the request's API key (a finished one is answered as it ended)."""
    record = await _record(services, request, response_id)
    head = head_of_record(record.response)
    if not head.background:
        raise InvalidRequest("Only a background response can be cancelled (this one was answered on its request's "
                             "connection).", param="response_id", code="invalid_value")
    owner = principal_of(request.scope)
    if head.status not in FINAL:
        records = services.result_records
        try:
            replay = await records.render(head)
            if replay.final is None:
                job = replay.job
                await records.end(head.id, job, ConduitError("The response was cancelled.", status=499,
                                                             code="cancelled"))
                await records.cancel_job(job, replay.deadline_ms or (head.created_at * 1000 + records.timeout_ms))
        except REDIS_ERRORS as exc:
            log.warning("a background response cannot be cancelled now: %s", exc)
            raise store_unavailable() from None
    return Response(await current(services, owner, record), media_type="application/json")


@delete("/v1/responses/{response_id:str}", status_code=200, opt=documented(DELETE_RESPONSE))
async def delete_response(response_id: FromPath[str], request: Request[Any, Any, Any],
                          services: NamedDependency[Services]) -> Response[bytes]:
    """Delete one stored response of the request's API key."""
    if not await services.response_store.delete(principal_of(request.scope).key_id, response_id):
        raise NotFound(f"Response with id '{response_id}' not found.")
    return Response(_JSON.encode(DeletedResponse(id=response_id)), media_type="application/json")


def _query(request: Request[Any, Any, Any]) -> ItemsQuery:
    params = {k: v for k, v in request.query_params.items() if k in ("limit", "order", "after")}
    try:
        return msgspec.convert(params, ItemsQuery, strict=False)
    except msgspec.ValidationError as exc:
        param = str(exc).rpartition("$.")[2].rstrip("`") or None
        raise InvalidRequest(f"Invalid query parameter: {exc}.", param=param, code="invalid_value") from None


def page(items: list[dict[str, Any]], query: ItemsQuery) -> ResponseItemList:
    """One page of ``items`` (kept in the order the model saw them) as ``query`` asks."""
    ordered = items if query.order == "asc" else items[::-1]
    start = 0
    if query.after is not None:
        at = next((i for i, item in enumerate(ordered) if item.get("id") == query.after), None)
        if at is None:
            raise InvalidRequest(f"Invalid 'after': no input item of this response has the id '{query.after}'.",
                                 param="after", code="invalid_value")
        start = at + 1
    data = ordered[start:start + query.limit]
    return ResponseItemList(data=data, first_id=data[0]["id"] if data else None,
                            last_id=data[-1]["id"] if data else None, has_more=start + query.limit < len(ordered))


@get_and_head("/v1/responses/{response_id:str}/input_items", opt=documented(LIST_INPUT_ITEMS))
async def list_input_items(response_id: FromPath[str], request: Request[Any, Any, Any],
                           services: NamedDependency[Services]) -> Response[bytes]:
    """A page of one stored response's input items."""
    query = _query(request)
    record = await _record(services, request, response_id)
    return Response(_JSON.encode(page(_ITEMS.decode(record.input), query)), media_type="application/json")
