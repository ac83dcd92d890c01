"""``/health``, ``/ready``, ``/metrics`` and ``/openapi.json``: Conduit's routes for operators."""

from __future__ import annotations

import logging

import msgspec
from litestar import Response
from litestar.di import NamedDependency

from engines.contract.lane import REDIS_ERRORS
from gateway.apispec import AUTH_ERRORS, REQUEST_ID, Operation, documented
from gateway.common.routing import get_and_head
from gateway.errors import NotFound
from gateway.operations.protocol import Health, Readiness
from gateway.services import Services
from gateway.tenancy.guard import METRICS_ACCESS, PUBLIC

log = logging.getLogger("conduit.gateway")
_JSON = msgspec.json.Encoder()
_HEALTHY = _JSON.encode(Health())

GET_HEALTH = Operation("getHealth", "The process is alive", "Operations", {500: "`internal_error`."},
                       json=Health, extension="conduit", parameters=(REQUEST_ID,))
GET_READINESS = Operation(
    "getReadiness", "Ready for traffic: Redis answers and an engine is live", "Operations",
    {500: "`internal_error`.", 503: "Not ready: the body says why (a `Readiness`, not an error)."},
    json=Readiness, extension="conduit", parameters=(REQUEST_ID,))
GET_METRICS = Operation(
    "getMetrics", "Prometheus exposition of the gateway's instruments", "Operations",
    {**AUTH_ERRORS, 401: "`invalid_api_key` (only with `metrics_auth`: the metrics credential).",
     404: "`not_found`: metrics are off (`CONDUIT_METRICS=false`).", 500: "`internal_error`."},
    text=True, extension="conduit", parameters=(REQUEST_ID,))
GET_OPENAPI = Operation("getOpenApi", "This document", "Operations", {500: "`internal_error`."},
                        json_schema={"type": "object", "description": "The OpenAPI 3.1 document of this API."},
                        extension="conduit", parameters=(REQUEST_ID,))


@get_and_head("/health", opt=documented(GET_HEALTH, PUBLIC))
async def health() -> Response[bytes]:
    """The process is alive (says nothing about Redis or engines)."""
    return Response(_HEALTHY, media_type="application/json")


@get_and_head("/ready", opt=documented(GET_READINESS, PUBLIC))
async def ready(services: NamedDependency[Services]) -> Response[bytes]:
    """Redis reachable and at least one live engine: ready for traffic."""
    try:
        await services.redis.ping()
        redis_ok = True
    except REDIS_ERRORS:
        redis_ok = False
    engines = len(services.registry.engines)
    ok = redis_ok and engines > 0
    body = _JSON.encode(Readiness(status="ready" if ok else "not_ready", redis=redis_ok, engines=engines,
                                  models=sorted(services.registry.models)))
    return Response(body, status_code=200 if ok else 503, media_type="application/json")


@get_and_head("/metrics", opt=documented(GET_METRICS, METRICS_ACCESS))
async def metrics(services: NamedDependency[Services]) -> Response[bytes]:
    """Prometheus exposition of this process's OpenTelemetry instruments."""
    if not services.metrics:
        raise NotFound("Metrics are off on this gateway (CONDUIT_METRICS=false).")
    try:
        await services.registry.read_backlog()
    except REDIS_ERRORS as exc:
        log.warning("could not read the queue backlog for /metrics: %s", exc)  # the last values are exported
    return Response(services.telemetry.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@get_and_head("/openapi.json", opt=documented(GET_OPENAPI, PUBLIC))
async def openapi_document(services: NamedDependency[Services]) -> Response[bytes]:
    """This API's OpenAPI 3.1 document (``openapi/openapi.json``), built once per process."""
    return Response(services.openapi(), media_type="application/json")
