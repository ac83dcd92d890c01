"""``GET /v1/models`` and ``GET /v1/models/{model_id}``: the models a request may name now.

Those with a live engine, and the *cold* ones (declared in the settings' ``models``, no live engine,
``cold_start_timeout_s`` > 0: a request for one waits for an engine, ``gateway.cold``), so a client
that picks its model from the list can pick one scaled to zero, and its request is the demand that
starts an engine. A cold model's ``created`` is 0 (no engine of it has started).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response
from litestar.di import NamedDependency
from litestar.params import FromPath

from gateway.apispec import AUTH_ERRORS, REQUEST_ID, Operation, documented
from gateway.common.routing import get_and_head
from gateway.context import principal_of
from gateway.errors import ModelNotFound
from gateway.models.protocol import Model, ModelList
from gateway.services import Services

_JSON = msgspec.json.Encoder()

LIST_MODELS = Operation("listModels", "The models a request may name now", "Models",
                        {**AUTH_ERRORS, 500: "`internal_error`."}, json=ModelList, parameters=(REQUEST_ID,),
                        description="Those with a live engine, and the declared models a request waits for while "
                                    "they scale from zero (`cold_start_timeout_s`; `created` 0); only those the "
                                    "request's API key may use.")
RETRIEVE_MODEL = Operation(
    "retrieveModel", "One model a request may name now", "Models",
    {**AUTH_ERRORS, 404: "`model_not_found`.", 500: "`internal_error`."}, json=Model,
    parameters=({"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "The model's id (it may contain `/`)."}, REQUEST_ID))


@get_and_head("/v1/models", opt=documented(LIST_MODELS))
async def list_models(request: Request[Any, Any, Any],
                      services: NamedDependency[Services]) -> Response[bytes]:
    """The models with a live engine and the cold ones (those the request's key may use)."""
    reg = services.registry
    principal = principal_of(request.scope)
    names = set(reg.models) | {m for m in reg.declared() if services.dispatcher.cold.admits(m)}
    models = ModelList(data=[Model(id=m, created=reg.created(m)) for m in sorted(names) if principal.allows(m)])
    return Response(_JSON.encode(models), media_type="application/json")


@get_and_head("/v1/models/{model_id:path}", opt=documented(RETRIEVE_MODEL))
async def get_model(model_id: FromPath[str], request: Request[Any, Any, Any],
                    services: NamedDependency[Services]) -> Response[bytes]:
    """One live or cold model (that the request's key may use)."""
    model_id = model_id.lstrip("/")
    reg = services.registry
    servable = reg.is_live(model_id) or services.dispatcher.cold.admits(model_id)
    if not servable or not principal_of(request.scope).allows(model_id):
        raise ModelNotFound(model_id)
    return Response(_JSON.encode(Model(id=model_id, created=reg.created(model_id))), media_type="application/json")
